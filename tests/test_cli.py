import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import detox_sft
from detox_sft import cli
from detox_sft.cli import SUBCOMMANDS, build_parser, main
from detox_sft.config import recipe_parser

PIPELINE = ["rephrase", "train", "evaluate", "export", "upload", "download", "query"]


def test_help_lists_the_nine_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "detox_sft.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in PIPELINE:
        assert f"    {name}" in out
    assert list(SUBCOMMANDS) == PIPELINE


def test_every_subcommand_is_built_and_has_help(capsys):
    # "not built yet" (exit 3) must not be the answer of any shipped subcommand
    for name in PIPELINE:
        try:
            code = main([name, "--help"])
        except SystemExit as exc:  # argparse exits 0 after printing help
            code = exc.code
        assert code == 0, name
        assert f"detox-sft {name}" in capsys.readouterr().out


def test_unknown_subcommand_fails(capsys):
    try:
        code = main(["frobnicate"])
    except SystemExit as exc:
        code = exc.code
    assert code != 0


# --- recipe fields as flags ------------------------------------------------------------------------------------------

RECIPE_STEPS = ["rephrase", "train", "evaluate", "export"]


def _step_parser(name):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("step", RECIPE_STEPS)
def test_every_recipe_field_is_a_documented_flag(step, capsys):
    """Each recipe step's help lists every field of the recipe's dataclasses as --<dotted name>, with its docstring
    help (jsonargparse's parser of the recipe), and the shortcut flags."""
    try:
        main([step, "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    fields = [
        a
        for a in recipe_parser()._actions
        if a.option_strings and "CONFIG" not in str(a.metavar) and a.help != "==SUPPRESS=="
    ]
    for action in fields:
        assert action.option_strings[0] in out and action.help, action.option_strings
    assert "sampled continuations per prompt (k)" in out and "--training.sft.learning_rate 1e-4" in out
    assert "--run-dir" in out


def test_hand_written_duplicates_are_aliases_of_the_fields():
    options = {flag: action.dest for action in _step_parser("rephrase")._actions for flag in action.option_strings}
    assert options["--engine"] == "recipe:rephrase.engine" and options["--device"] == "recipe:rephrase.device"
    assert options["--run-dir"] == "recipe:run_dir"


def _capture_evaluate(monkeypatch):
    seen = {}

    def fake_evaluate_models(recipe, run_dir, models, progress):
        seen.update(recipe=recipe, models=models)
        return "results"

    monkeypatch.setattr(cli, "evaluate_models", fake_evaluate_models)
    monkeypatch.setattr(cli, "summary_markdown", lambda results: "| table |")
    return seen


def test_good_overrides_change_the_recipe_the_step_uses(monkeypatch, tmp_path, capsys):
    seen = _capture_evaluate(monkeypatch)
    argv = ["evaluate", "--recipe", "offline", "--run-dir", str(tmp_path / "run"), "--models", "base"]
    argv += ["--evaluation.num_samples", "2", "--seed", "7", "--data.num_train_samples", "null"]
    argv += ["--training.sft.learning_rate", "1e-4", "--training.lora.r=8", "--evaluation.scorers", "[a, b]"]
    assert main(argv) == 0
    recipe = seen["recipe"]
    assert recipe.evaluation.num_samples == 2 and recipe.seed == 7 and recipe.data.num_train_samples is None
    assert recipe.training.sft["learning_rate"] == 1e-4 and recipe.training.sft["max_length"] == 64  # merged
    assert recipe.training.lora["r"] == 8 and recipe.evaluation.scorers == ["a", "b"]
    assert recipe.run_path == tmp_path / "run" and seen["models"] == ["base"]
    assert "| table |" in capsys.readouterr().out


def test_rephrase_shortcuts_set_the_recipe_fields(monkeypatch, tmp_path):
    from detox_sft.rephrase import RephraseResult, RephraseSummary

    seen = {}

    def fake_rephrase_dataset(records, cfg, **kwargs):
        seen.update(cfg=cfg, **kwargs)
        return RephraseResult(records, RephraseSummary(total=len(records)))

    monkeypatch.setattr(cli, "rephrase_dataset", fake_rephrase_dataset)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"text": "hi"}\n')
    argv = ["rephrase", "--input", str(src), "--output", str(out), "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--engine", "trustyai", "--device", "cpu", "--rephrase.mask_threshold", "1.5"]) == 0
    assert (seen["cfg"].engine, seen["cfg"].device, seen["cfg"].mask_threshold) == ("trustyai", "cpu", 1.5)
    assert seen["cfg"].executor == "local"
    assert main([*argv, "--ray"]) == 0
    assert seen["cfg"].executor == "ray"
    assert seen["cache_dir"] == tmp_path / "run" / "rephrase" / "cache"
    assert out.read_text() == '{"text": "hi"}\n'


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--training.sft.learning_rate", "fast"], ["training.sft.learning_rate: expected float, got fast"]),
        (["--evaluation.num_samples", "two"], ["evaluation.num_samples", "expected int"]),
        (["--rephrase.combine_original", "maybe"], ["rephrase.combine_original", "expected bool"]),
        (["--evaluation.num_sample", "2"], ["evaluation.num_sample:", "did you mean evaluation.num_samples?"]),
        (["--num_samples", "2"], ["did you mean evaluation.num_samples?"]),
        (["--training.sft.learnig_rate", "1e-4"], ["not a trl.SFTConfig field", "training.sft.learning_rate,"]),
        (["--training.lora.rank", "8"], ["not a peft.LoraConfig field"]),
        (["--training.lora.bias", "some"], ["'none', 'all', 'lora_only'"]),
        (["--rephrase.mask_threshold", "-1"], ["rephrase.mask_threshold", "1.2 is the MaRCo paper's value"]),
        (["--seed"], ["--seed", "expected one argument"]),  # argparse's own usage error
    ],
)
def test_bad_key_or_value_fails_at_load_naming_the_field(monkeypatch, tmp_path, capsys, flags, names):
    seen = _capture_evaluate(monkeypatch)
    try:
        code = main(["evaluate", "--recipe", "offline", "--run-dir", str(tmp_path), *flags])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and not seen  # failed before the step ran
    for name in names:
        assert name in err
    assert "Traceback" not in err


def test_a_yaml_recipe_with_a_bad_sft_value_fails_at_load(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("profile: offline\ntraining:\n  sft:\n    learning_rate: fast\n")
    assert main(["train", "--recipe", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "training.sft.learning_rate: expected float, got fast" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# --- the package's errors reach the user as their message --------------------------------------------------------


def _package_error_classes():
    """Every exception class the package defines (walked from its modules, so a new one is noticed)."""
    found = {}
    for info in pkgutil.walk_packages(detox_sft.__path__, "detox_sft."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__.startswith("detox_sft"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


# Not raised under `detox-sft`: the slides are built by `make slides`, StepMissing by notebook cells.
NOT_CLI_ERRORS = {"detox_sft_dev.slides.SlidesError", "detox_sft.notebook.StepMissing"}
PACKAGE_ERRORS = {name: cls for name, cls in _package_error_classes().items() if name not in NOT_CLI_ERRORS}


def test_the_error_classes_are_all_found():
    short = {name.rsplit(".", 1)[-1] for name in PACKAGE_ERRORS}
    assert {
        "RecipeError",
        "DataError",
        "RephraseError",
        "TrainingError",
        "EvaluationError",
        "ExportError",
        "StorageError",
        "S3AuthError",
        "ScorerError",
        "ModelServerError",
        "Unauthorized",
    } <= short


@pytest.mark.parametrize("name", sorted(PACKAGE_ERRORS))
def test_every_package_error_reaches_the_user_without_a_traceback(monkeypatch, tmp_path, capsys, name):
    cls = PACKAGE_ERRORS[name]

    def fail(*args, **kwargs):
        raise cls("the message of the error. Fix: what to do")

    monkeypatch.setattr(cli, "export_model", fail)
    code = main(["export", "--recipe", "offline", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "detox-sft export: the message of the error. Fix: what to do" in err
    assert "Traceback" not in err
    # bad input exits 2, a failed step 1 (EngineFailed, a RephraseError raised when the engine itself breaks, is one)
    failed_step = issubclass(cls, cli.STEP_ERRORS) or not issubclass(cls, cli.INPUT_ERRORS)
    assert code == (1 if failed_step else 2)
    if name.endswith("EngineFailed"):
        assert code == 1


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, tmp_path):
    """A bug is not dressed up as a message: anything but the package's errors propagates."""

    def fail(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(cli, "export_model", fail)
    with pytest.raises(KeyError):
        main(["export", "--recipe", "offline", "--run-dir", str(tmp_path)])


@pytest.mark.parametrize("code", ["ENOSPC", "EFBIG"])
def test_no_room_on_the_disk_is_a_message_with_the_fix_not_a_traceback(monkeypatch, tmp_path, capsys, code):
    import errno
    import os

    def fail(*args, **kwargs):
        number = getattr(errno, code)
        raise OSError(number, os.strerror(number), str(tmp_path / "export" / "model.safetensors"))

    monkeypatch.setattr(cli, "export_model", fail)
    assert main(["export", "--recipe", "offline", "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"no room to write {tmp_path / 'export' / 'model.safetensors'}" in err and "rerun the same command" in err
    assert "Traceback" not in err


def test_a_missing_hub_is_one_message_naming_the_fix(tmp_path):
    """Issue 24: the tutorial recipe without the hub (HF_HUB_OFFLINE=1, nothing cached) gives our message, no
    traceback. The gate (profanity-check) runs, then TMaRCo's BART load raises transformers' OSError."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "you are a stupid idiot"}\n')
    argv = ["rephrase", "--recipe", "tutorial", "--input", str(src), "--output", str(tmp_path / "out.jsonl")]
    argv += ["--run-dir", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    done = subprocess.run([sys.executable, "-m", "detox_sft.cli", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "the Hugging Face hub cannot be reached (HF_HUB_OFFLINE or no network); use --recipe offline" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr[-2000:]
    assert not (tmp_path / "out.jsonl").exists()


def test_a_zoo_reference_without_the_dev_package_is_bad_input(monkeypatch, tmp_path, capsys):
    """zoo: references resolve through detox_sft_dev's entry point; without it, exit 2 and the fix, no traceback."""
    from detox_sft import refs

    monkeypatch.setattr(refs, "entry_points", lambda **kwargs: [])
    assert main(["rephrase", "--recipe", "offline", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "detox-sft rephrase: zoo:<name> references need the offline zoo" in err and "Fix: install" in err
    assert "Traceback" not in err
