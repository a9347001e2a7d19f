import contextlib
import importlib
import json
import os
import pkgutil
import resource
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
    # bad input exits 2, a failed step 1 (EngineFailed, a RephraseError raised when the engine itself breaks, is one);
    # no room 3, an unreachable S3 endpoint 4, model server 5, hub 6
    failed_step = issubclass(cls, cli.STEP_ERRORS) or not issubclass(cls, cli.INPUT_ERRORS)
    unreachable = {"detox_sft.storage.S3UnavailableError": 4, "detox_sft.clients.ServerUnavailable": 5}
    unreachable |= {"detox_sft.files.NoRoomError": 3, "detox_sft.cli.HubUnavailable": 6}
    assert code == unreachable.get(name, 1 if failed_step else 2)
    if name.endswith("EngineFailed"):
        assert code == 1


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, tmp_path):
    """A bug is not dressed up as a message: anything but the package's errors propagates."""

    def fail(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(cli, "export_model", fail)
    with pytest.raises(KeyError):
        main(["export", "--recipe", "offline", "--run-dir", str(tmp_path)])


def _write_safetensors(path):
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"w": torch.zeros(50_000)}, path)


def _write_torch(path):
    import torch

    torch.save({"w": torch.zeros(50_000)}, path)  # as the Trainer saves optimizer.pt


def _write_tokenizer(path):
    from tokenizers import Tokenizer, models

    vocab = {f"word{i}": i for i in range(20_000)}
    Tokenizer(models.WordLevel(vocab, unk_token="word0")).save(path)  # as a checkpoint saves the tokenizer


def _write_sqlite(path):
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as conn:  # as the rephrase cache
        conn.executescript("CREATE TABLE t (x); INSERT INTO t VALUES (zeroblob(200000));")


def _write_plain(path):
    with open(path, "wb") as fh:  # as json, matplotlib's savefig or boto3's download write
        fh.write(b"x" * 200_000)


WRITERS = {"safetensors": _write_safetensors, "torch.save": _write_torch, "sqlite": _write_sqlite, "open": _write_plain}
WRITERS["tokenizers"] = _write_tokenizer


@contextlib.contextmanager
def _full_dir(tmp_path, how):
    """A directory where writes fail as on a full disk: a 64 KiB tmpfs (ENOSPC; root only) or a 64 KiB file-size
    limit on this process (EFBIG, as ``ulimit -f`` sets it; lifted right after)."""
    if how == "tmpfs":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path)], check=True)
        try:
            yield tmp_path
        finally:
            subprocess.run(["umount", "--lazy", str(tmp_path)], check=True)  # (the failed writer may hold a file)
    else:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            yield tmp_path
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("how", ["tmpfs", "fsize"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_under_any_library_exits_3_with_the_fix(monkeypatch, tmp_path, capsys, writer, how):
    """Issue 24: safetensors, tokenizers, torch.save, SQLite and a plain write each report a full disk their own way
    (an errno in the text, no errno, SQLITE_FULL, OSError 27/28); the command turns each into one message, exit 3, no traceback."""
    if (writer, how) == ("sqlite", "fsize"):
        pytest.skip("SQLite reports a write past the file-size limit as SQLITE_IOERR_WRITE, not as a full disk")
    (tmp_path / "full").mkdir()
    with _full_dir(tmp_path / "full", how) as full, pytest.raises(Exception) as raised:
        WRITERS[writer](str(full / "out.bin"))
    assert cli.no_room(raised.value) is not None, repr(raised.value)

    def fail(*args, **kwargs):
        raise raised.value

    monkeypatch.setattr(cli, "export_model", fail)
    assert main(["export", "--recipe", "offline", "--run-dir", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("detox-sft export: no room to write") and "Fix: free disk space" in err, err
    assert "rerun the same command" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_package_error_caused_by_a_full_disk_keeps_its_message_and_exits_3(monkeypatch, tmp_path, capsys):
    """The rephrase cache's own error (it names what is kept) wraps SQLite's "database or disk is full": exit 3."""
    from detox_sft.rephrase import CacheWriteError

    def fail(*args, **kwargs):
        import sqlite3

        conn = sqlite3.connect(":memory:")
        try:  # SQLite's own SQLITE_FULL, from a page limit in place of a disk
            conn.executescript("PRAGMA max_page_count = 2; CREATE TABLE t (x); INSERT INTO t VALUES (zeroblob(9999));")
        except sqlite3.OperationalError as exc:
            raise CacheWriteError("could not write the rephrase cache. Fix: free disk space, rerun") from exc

    monkeypatch.setattr(cli, "export_model", fail)
    assert main(["export", "--recipe", "offline", "--run-dir", str(tmp_path)]) == 3
    assert (
        capsys.readouterr().err == "detox-sft export: could not write the rephrase cache. Fix: free disk space, rerun\n"
    )


def test_a_step_error_that_only_passes_the_hubs_text_on_gets_the_fix_and_exits_6(monkeypatch, tmp_path, capsys):
    """evaluation's "cannot load the model" wraps transformers' OSError without a fix: the hub's fix is added."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from detox_sft.evaluation import EvaluationError

    def fail(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        except LocalEntryNotFoundError as exc:
            raise EvaluationError("cannot load the model 'x/y' (x/y): We couldn't connect") from exc

    monkeypatch.setattr(cli, "export_model", fail)
    assert main(["export", "--recipe", "offline", "--run-dir", str(tmp_path)]) == 6
    err = capsys.readouterr().err
    assert err.startswith("detox-sft export: cannot load the model 'x/y' (x/y): We couldn't connect Fix: use --recipe")


def test_other_os_errors_are_not_a_full_disk():
    import errno

    assert cli.no_room(OSError(errno.EACCES, "Permission denied")) is None
    assert cli.no_room(RuntimeError("expected scalar type Float")) is None


_HUB_PROBE = """
import json, sys, datasets, transformers
from detox_sft.cli import _error_message
loaders = {
    "model": lambda: transformers.AutoModelForCausalLM.from_pretrained("facebook/opt-350m"),
    "tokenizer": lambda: transformers.AutoTokenizer.from_pretrained("facebook/opt-350m"),
    "no such id": lambda: transformers.AutoModelForSeq2SeqLM.from_pretrained("no-such-org/no-such-model"),
    "scorer": lambda: transformers.pipeline(
        "text-classification", model="facebook/roberta-hate-speech-dynabench-r4-target"),
    "dataset": lambda: datasets.load_dataset("allenai/real-toxicity-prompts", split="train"),
}
found = {}
for name, load in loaders.items():
    try:
        load()
    except Exception as exc:
        found[name] = _error_message(exc)
print(json.dumps(found))
"""


def test_every_hub_loader_without_the_hub_exits_6_with_the_fix(tmp_path):
    """transformers (models, tokenizers, pipelines) and datasets raise different errors without the hub
    (HF_HUB_OFFLINE=1, an empty cache) or for an id that does not exist: each is one message and exit 6."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", _HUB_PROBE], capture_output=True, text=True, env=env, check=True)
    found = json.loads(done.stdout.splitlines()[-1])
    assert sorted(found) == ["dataset", "model", "no such id", "scorer", "tokenizer"]
    for message, code in found.values():
        assert (
            code == 6 and "cannot load from the Hugging Face hub" in message and "Fix: use --recipe offline" in message
        )


def test_a_missing_hub_is_one_message_naming_the_fix(tmp_path):
    """Issue 24: the tutorial recipe without the hub (HF_HUB_OFFLINE=1, nothing cached) gives our message, exit 6, no
    traceback. The gate (profanity-check) runs, then TMaRCo's BART load raises transformers' OSError."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "you are a stupid idiot"}\n')
    argv = ["rephrase", "--recipe", "tutorial", "--input", str(src), "--output", str(tmp_path / "out.jsonl")]
    argv += ["--run-dir", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    done = subprocess.run([sys.executable, "-m", "detox_sft.cli", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 6, done.stderr[-2000:]
    assert "detox-sft rephrase: cannot load from the Hugging Face hub" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr[-2000:]
    assert not (tmp_path / "out.jsonl").exists()


def test_an_unreachable_s3_endpoint_and_model_server_exit_4_and_5(monkeypatch, tmp_path, capsys):
    """botocore and urllib3 refused by a closed port: the storage and client errors, exit 4 and 5, with the fix."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens
    argv = ["download", "models/x", str(tmp_path / "d"), "--endpoint", closed, "--bucket", "b", "--no-progress"]
    assert main(argv) == 4
    assert "cannot reach the S3 endpoint" in capsys.readouterr().err
    assert main(["query", "hello", "--url", closed, "--timeout", "1"]) == 5
    err = capsys.readouterr().err
    assert err.startswith("detox-sft query: cannot connect to") and "Fix:" in err


def test_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "3 no room on the disk" in out and "6 the Hugging Face hub cannot be reached" in out
    assert {code for _, _, code in cli.EXIT_STATUS} == {1, 2, 3, 4, 5, 6}


def test_a_zoo_reference_without_the_dev_package_is_bad_input(monkeypatch, tmp_path, capsys):
    """zoo: references resolve through detox_sft_dev's entry point; without it, exit 2 and the fix, no traceback."""
    from detox_sft import refs

    monkeypatch.setattr(refs, "entry_points", lambda **kwargs: [])
    assert main(["rephrase", "--recipe", "offline", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "detox-sft rephrase: zoo:<name> references need the offline zoo" in err and "Fix: install" in err
    assert "Traceback" not in err
