"""The four notebooks: committed clean, executed headless end to end (`make demo` on a small offline recipe, once per
session: the ``demo_run`` fixture), and read back for what a person sees: the real objects of each step displayed,
every figure as an image, no upstream warning, every progress bar finished, the report's tables formatted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import DEMO_TOKEN

from detox_sft_dev.demo import NOTEBOOKS, NOTEBOOKS_DIR, _overwritten, _tidy_streams

ROOT = Path(__file__).resolve().parents[1]
ESTIMATE = re.compile(r"\d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\]")  # "0.263 [0.234, 0.291]"
# What the executed notebooks printed before they were cleaned up (issue 18): upstream warnings, library bars, repr
NOISE = (
    "FutureWarning",
    "is_gradient_checkpointing",
    "clean_up_tokenization_spaces",
    "generation flags are not valid",
    "Kernel is running over TCP",
    "Failed to load CPU gemm_4bit_forward",
    "is still in the BETA phase",
    "`torch_dtype` is deprecated",
    "Loading weights",
    "Writing model shards",
    "Map:",
    "Tokenizing",
    "Generating train split",
    "<Figure size",
    "RephraseSummary(",
    "PosixPath(",
)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_are_clean_and_parameterised(name):
    nb = json.loads((NOTEBOOKS_DIR / f"{name}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert 'recipe = "tutorial"' in "".join(tagged[0]["source"]), "the default parameters are the tutorial profile"
    assert nb["cells"][0]["cell_type"] == "markdown" and "".join(nb["cells"][0]["source"]).startswith("# ")
    assert "Next step" in "".join(nb["cells"][-1]["source"])
    # thin: no function or class is defined in a notebook; the logic lives in detox_sft
    assert not any("def " in "".join(c["source"]) or "class " in "".join(c["source"]) for c in code)
    # figures display inline in JupyterLab as in the executed notebooks: the package returns Figure objects
    plots = [c for c in code if "plot_" in "".join(c["source"])]
    assert not plots or "%matplotlib inline" in "".join(code[0]["source"])


def _code(name: str) -> dict[str, str]:
    """The committed notebook's code cells by their first line (IPython magics left out: plain Python to exec)."""
    nb = json.loads((NOTEBOOKS_DIR / f"{name}.ipynb").read_text())
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    plain = ["\n".join(line for line in s.splitlines() if not line.startswith("%")) for s in sources]
    return {s.splitlines()[0]: s for s in plain}


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_notebook_1_builds_the_configs_the_mappers_build(offline_recipe, zoo, load_in_4bit):
    """Notebook 1's cells construct BitsAndBytesConfig, LoraConfig and SFTConfig (one per arm) from the recipe; the
    pure mappers `detox-sft train` uses give the same objects (``to_dict()``): both paths train with one recipe."""
    from detox_sft import training

    offline_recipe.training.load_in_4bit = load_in_4bit
    cells = _code("1-sft")
    namespace = {"cfg": offline_recipe}
    for first in ("import pandas", "device = resolve_device(", "model_path = refs.resolve_ref(", "sft_configs = {"):
        (source,) = [s for line, s in cells.items() if line.startswith(first)]
        exec(compile(source, f"1-sft: {first}", "exec"), namespace)  # noqa: S102 - the notebook's own cells
    cfg, device = offline_recipe.training, namespace["device"]
    bnb = training.get_quantization_config(cfg, device)
    assert (bnb is None) == (not load_in_4bit) == (namespace["bnb_config"] is None)
    if bnb is not None:
        assert namespace["bnb_config"].to_dict() == bnb.to_dict()
    lora = training.get_peft_config(cfg, training._meta_model(namespace["model_path"]))
    assert namespace["lora_config"].to_dict() == lora.to_dict()
    assert set(namespace["sft_configs"]) == set(training.ARMS)
    for arm, built in namespace["sft_configs"].items():
        mapped = training.get_sft_config(
            cfg, offline_recipe.paths.adapter(arm) / "checkpoints", offline_recipe.seed, device
        )
        assert built.to_dict() == mapped.to_dict()


def test_notebook_1_trains_in_its_own_cells_and_leaves_the_cluster_jobs_to_instructions():
    """Notebook 1 builds SFTTrainer and calls trainer.train itself, between the package's steps, and never calls the
    package's arm loop; the cluster-only submission lives in instructions.md (section 8), the notebook points there."""
    cells = _code("1-sft")
    (loop,) = [s for s in cells.values() if "SFTTrainer(" in s]
    calls = re.findall(r"training\.(\w+)\(|(SFTTrainer)\(|trainer\.(train)\(", loop)
    assert [next(c for c in call if c) for call in calls] == [
        "base_tokenizer",
        "finished_arm",
        "check_training_inputs",
        "sft_splits",
        "train_stats",
        "quiet",
        "SFTTrainer",
        "prepare_trainer",
        "train",
        "last_complete_checkpoint",
        "save_arm",
    ]
    assert not any("train_arm" in s or "subprocess" in s or "on_cluster" in s for s in cells.values())
    nb = json.loads((NOTEBOOKS_DIR / "1-sft.ipynb").read_text())
    pointer, last = ("".join(c["source"]) for c in nb["cells"][-2:])  # nothing but Markdown after section 7
    assert pointer.startswith("## 7. At scale") and last.startswith("## Next step")
    assert "`instructions.md`" in pointer and "section 8" in pointer
    instructions = (ROOT / "instructions.md").read_text()
    assert "## 8. At scale" in instructions and "### 8e. The same from a notebook" in instructions
    assert "TrainerClient" in instructions and "manifests/distributed/ray-detoxify" in instructions


def _committed_code(name: str) -> list[str]:
    nb = json.loads((NOTEBOOKS_DIR / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_3_cells_hold_the_merge_caikit_save_and_the_boto3_upload_before_the_checked_one():
    code = "\n".join(_committed_code("3-save_convert_model"))
    calls = ["merge_and_unload()", "TextGeneration.bootstrap(", ".save(", 'boto3.client(\n    "s3"', "s3.upload_file("]
    calls += ["storage.upload_export("]
    where = [code.index(call) for call in calls]
    assert where == sorted(where)


def test_notebook_4_request_cell_checks_the_token_rule_before_sending(monkeypatch):
    """The cell itself, run against a plaintext URL of another host: InsecureTokenError, and nothing is sent."""
    from types import SimpleNamespace

    from detox_sft import clients
    from detox_sft.config import ServingConfig

    cell = next(c for c in _committed_code("4-inference_request") if "requests.post(" in c)
    assert cell.index("clients.check_token(") < cell.index("requests.post(")
    sent = []
    requests = SimpleNamespace(post=lambda *args, **kwargs: sent.append(args))
    monkeypatch.setenv("MODEL_TOKEN", "sha256~not-a-real-token-0123456789")
    for url, refused in (("http://model.example.com", True), ("https://model.example.com", False)):
        cfg = SimpleNamespace(serving=ServingConfig(url=url))
        scope = {"clients": clients, "requests": requests, "cfg": cfg, "body": {}}
        if refused:
            with pytest.raises(clients.InsecureTokenError):
                exec(cell, scope)
            assert not sent
        else:
            with pytest.raises(AttributeError):  # the stub's answer has no raise_for_status: it was sent
                exec(cell, scope)
            assert len(sent) == 1


# --------------------------------------------------------------------------------------------------------------------
# reading an executed notebook


def _executed(demo_run: Path, name: str) -> dict:
    return json.loads((demo_run / f"{name}.ipynb").read_text())


def _text(output: dict) -> str:
    """Everything a person can read in one output: stream text, or each text-like representation."""
    if output.get("output_type") == "stream":
        return "".join(output["text"])
    data = output.get("data", {})
    return "\n".join("".join(data[k]) for k in ("text/plain", "text/html", "text/markdown") if k in data)


def _visible(output: dict) -> str:
    """What a notebook front end shows of one output: its richest representation (an image shows no text)."""
    if output.get("output_type") == "stream":
        return "".join(output["text"])
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", []))
    data = output.get("data", {})
    if "image/png" in data:
        return ""
    return "".join(next((data[k] for k in ("text/html", "text/markdown", "text/plain") if k in data), ""))


def _cell(nb: dict, snippet: str) -> dict:
    """The one code cell whose source holds ``snippet``."""
    found = [c for c in nb["cells"] if c["cell_type"] == "code" and snippet in "".join(c["source"])]
    assert len(found) == 1, f"{len(found)} cells hold {snippet!r}"
    return found[0]


def _shown(nb: dict, snippet: str) -> str:
    """What the cell holding ``snippet`` displayed (its outputs, not its source)."""
    return "\n".join(_text(o) for o in _cell(nb, snippet).get("outputs", []))


def _html(nb: dict, snippet: str) -> str:
    outputs = _cell(nb, snippet).get("outputs", [])
    return "\n".join("".join(o.get("data", {}).get("text/html", "")) for o in outputs)


# --------------------------------------------------------------------------------------------------------------------
# the run


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_four_notebooks_run_end_to_end(demo_run):
    run_dir = demo_run / "run"
    from detox_sft.notebook import recorded

    for name in NOTEBOOKS:
        executed = _executed(demo_run, name)
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[:1]}"

    sft = recorded(run_dir, "1-sft")
    assert sft["rephrase"]["gated"] > 0 and sft["rephrase"]["rephrased"] > 0
    assert sft["rephrase"]["total"] == 216  # 240 samples minus the 10% held out
    assert set(sft["train"]) == {"raw", "detox"}
    for metrics in sft["train"].values():
        assert metrics["train_loss"] > 0 and metrics["train_loss"] < 20

    ev = recorded(run_dir, "2-eval")
    assert set(ev["summary"]["models"]) >= {"base", "raw", "detox"}

    up = recorded(run_dir, "3-save_convert_model")
    caikit = up["uploads"]["caikit"]  # storage.UploadReport: every file uploaded or skipped unchanged, marker last
    assert caikit["files"] > 0 and len(caikit["uploaded"]) + len(caikit["skipped"]) == caikit["files"]
    assert caikit["marker_key"]

    inf = recorded(run_dir, "4-inference_request")
    assert len(inf["answers"]) == 5 and all(isinstance(a["answer"], str) for a in inf["answers"])
    assert any(a["answer"].strip() for a in inf["answers"])
    assert len(inf["comparison"]) == 5

    for figure in ("loss_curves.png", "toxicity_histogram.png"):
        assert (run_dir / "figures" / figure).is_file()


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_notebook_1_shows_tmarco_and_the_qlora_configs_before_running_the_step(demo_run):
    nb = _executed(demo_run, "1-sft")
    assert "trustyai.language.detoxify.tmarco.TMaRCo" in _shown(nb, "compat.load_tmarco(")
    scores = _cell(nb, "tmarco.score(")
    assert any("image/png" in o.get("data", {}) for o in scores["outputs"]), "the token scores are a figure"
    assert "<mask>" in _shown(nb, "tmarco.mask(")
    rephrased = _shown(nb, "tmarco.rephrase(")
    assert rephrased.strip() and "<mask>" not in rephrased
    # the step's summary and the training results as tables, not reprs; the rephrase step under one bar, finished
    assert '<table class="detox-rephrase-summary"' in _html(nb, "detoxify_training_set(")
    assert re.findall(r"(\w+): +(\d+)%\|", _shown(nb, "detoxify_training_set(")) == [("rephrase", "100")]
    table = _html(nb, "metrics = pd.DataFrame(")
    assert "train_loss" in table and "final_eval_loss" in table and "trainable_parameters" in table
    # the three library configs, constructed in their cells and displayed by the fields that matter, one a line
    bnb = _shown(nb, "BitsAndBytesConfig(")
    assert re.search(r"load_in_4bit +True", bnb) and re.search(r"bnb_4bit_quant_type +nf4", bnb)
    lora = _shown(nb, "LoraConfig(")
    assert "out_proj" in lora and re.search(r"\br +16\n", lora) and "bias" not in lora
    sft = _shown(nb, "SFTConfig(")
    assert re.search(r"completion_only_loss +True", sft) and re.search(r"max_length +64\n", sft)
    assert "accelerator_config" not in sft and "PosixPath(" not in sft and len(sft.splitlines()) < 30
    assert "<th>completion</th>" in _html(nb, "to_prompt_completion(")
    # each arm trained by the cell's SFTTrainer: the path it took, the Trainer's own bar to its end, the adapter saved
    trained = _shown(nb, "SFTTrainer(")
    for arm in ("raw", "detox"):
        assert f"[train {arm}] on cpu: 4-bit NF4 base, LoRA r=16" in trained and f"[train {arm}] done in" in trained
    # in a notebook the Trainer shows its own HTML progress (NotebookProgressCallback), one per arm, run to its end
    bars = re.findall(r"<progress value='(\d+)' max='(\d+)'", _html(nb, "SFTTrainer("))
    assert len(bars) == 2 and all(done == total for done, total in bars), bars


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_the_demos_adapters_come_from_notebook_1s_trainer_cells(demo_run):
    """The demo ran notebook 1 in a kernel whose ``detox_sft.training.train_arms`` / ``train_arm`` raise (a
    ``sitecustomize`` on that kernel's PYTHONPATH, from the ``demo_run`` fixture): the adapters it wrote come from the
    notebook's own ``trainer.train``."""
    assert (demo_run.parents[1] / "arm-loop-refused" / "active").is_file(), "the guard ran in notebook 1's kernel"
    nb = _executed(demo_run, "1-sft")
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    for arm in ("raw", "detox"):
        adapter = demo_run / "run" / "adapters" / arm
        metrics = json.loads((adapter / "metrics.json").read_text())
        assert (adapter / "adapter_model.safetensors").is_file() and metrics["global_step"] > 0


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_notebook_2_shows_one_prompt_then_formatted_tables_and_a_formatted_reading(demo_run):
    nb = _executed(demo_run, "2-eval")
    assert _shown(nb, "notebook.require(").strip().endswith("/adapters/detox/adapter_config.json")  # not a repr
    # the whole evaluation (toxic and non-toxic prompts, every model and stage) under one bar, finished
    assert re.findall(r"(\w+): +(\d+)%\|", _shown(nb, "evaluate_models(")) == [("evaluate", "100")]
    # the lesson in the cells: k continuations from model.generate with the recipe's sampling, the scorer on them,
    # scipy's bootstrap on one metric, then the package's evaluation of every model
    generate = "".join(_cell(nb, "model.generate(")["source"])
    for argument in ("do_sample=True", "top_p=", "temperature=", "max_new_tokens=", "num_return_sequences="):
        assert argument in generate
    scored = _html(nb, "scorer(continuations)")
    assert "continuation" in scored and "zoo:lexicon" in scored and scored.count("<tr") == 1 + 2  # header, k=2 samples
    assert "worst continuation (EMT)" in _shown(nb, "scores.max()")
    interval = _shown(nb, "stats.bootstrap(")
    assert (
        "'95% low'" in interval
        and "'95% high'" in interval
        and 'method="BCa"' in "".join(_cell(nb, "stats.bootstrap(")["source"])
    )
    code = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    order = [
        next(i for i in code if s in "".join(nb["cells"][i]["source"]))
        for s in ("model.generate(", "scorer(continuations)", "stats.bootstrap(", "evaluate_models(")
    ]
    assert order == sorted(order)
    # the reading beside the results: why EMT equals TP under the binary judge, why the arms are above the base
    assert "binary judge" in _shown(nb, "evaluation.judge_note(")
    assert "It is not given for base" in _shown(nb, "evaluation.fluency_note(")  # the offline judge is the base model
    assert "mean_toxicity_after" in _shown(nb, 'recorded(cfg.run_path, "1-sft")')
    table = _html(nb, "evaluation.metrics_table(results)")
    assert ESTIMATE.search(table) and "_low" not in table and "_high" not in table
    assert "detox" in table and "EMT" in table
    assert re.search(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", _html(nb, "evaluation.paired_table("))
    scorers = _html(nb, "evaluation.scorer_table(")
    assert all(s in scorers for s in ("zoo:lexicon (headline)", "profanity-check", "hatesonar"))
    assert "spearman" in _html(nb, "evaluation.agreement_table(")
    # the cost of detoxifying: what survives of the rephrased training samples, every model on non-toxic prompts
    survival = _html(nb, "notebook.survival_table(")
    assert "chrF" in survival and "share of words changed" in survival and "all rephrased" in survival
    assert re.search(r"mean over the \d+ rephrased samples", survival)
    cost = _html(nb, "evaluation.cost_table(")
    assert re.search(r"non-toxic \(\d+\)", cost) and re.search(r"(?<![-\w])toxic \(\d+\)", cost)
    assert ESTIMATE.search(cost) and "perplexity" in cost
    reading = [o for o in _cell(nb, "describe_result(")["outputs"] if "text/markdown" in o.get("data", {})]
    assert (
        reading
        and "\n- " in "".join(reading[0]["data"]["text/markdown"])
        and "**" in "".join(reading[0]["data"]["text/markdown"])
    )
    assert not any("_low" in _text(o) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_notebook_3_shows_the_merge_and_caikits_bootstrap_and_save(demo_run):
    nb = _executed(demo_run, "3-save_convert_model")
    assert "lora.Linear(" in _shown(nb, "training.load_adapter_model(") and "lora_A" in _shown(
        nb, "training.load_adapter_model("
    )
    merged = _shown(nb, "merge_and_unload()")
    assert merged.startswith("Linear(in_features=") and "lora" not in merged
    saved = _shown(nb, "TextGeneration.bootstrap(")
    assert "module_id: f9181353-4ccf-4572-bd1e-f12bcda26792" in saved and "artifacts/:" in saved
    listing = _html(nb, "storage.list_prefix(")
    assert "caikit/config.yml" in listing and "hf/config.json" in listing
    # the model card: its model-index read back, its body shown as Markdown, uploaded with both directories
    assert "expected_max_toxicity" in _shown(nb, "ModelCard.load(")
    card = _shown(nb, "Markdown(card.text)")
    assert "Content warning" in card and "Made from synthetic data" in card and ESTIMATE.search(card)
    assert "hf/README.md" in listing and "caikit/README.md" in listing
    run_dir = demo_run / "run"
    assert _shown(nb, "s3.upload_file(").strip() == str((run_dir / "export" / "hf" / "README.md").stat().st_size)


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_notebook_4_shows_one_plain_request_with_its_bearer_header_then_the_clients(demo_run):
    nb = _executed(demo_run, "4-inference_request")
    assert '"model_id"' in _shown(nb, "body = {") or "'model_id'" in _shown(nb, "body = {")
    request = _cell(nb, "requests.post(")
    assert 'f"Bearer {token}"' in "".join(request["source"])
    assert "generated_text" in _shown(nb, "requests.post(")
    assert "token=<set>" in _shown(nb, "http = clients.connect(")  # the demo run sets MODEL_TOKEN
    # issue 24: the answers' token counts are what the request allowed (20 at most), not the local module's
    # generated_tokens (prompt included), which is shown under its own label
    from detox_sft.notebook import recorded

    answers = recorded(demo_run / "run", "4-inference_request")["answers"]
    assert all(1 <= a["new tokens"] <= 20 for a in answers)
    assert all(a["server's generated_tokens"] > a["new tokens"] for a in answers)
    for name in NOTEBOOKS:  # the token itself is never shown
        assert DEMO_TOKEN not in (demo_run / f"{name}.ipynb").read_text()


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_figures_display_inline_with_no_upstream_noise_and_finished_progress_bars(demo_run):
    for name in NOTEBOOKS[:2]:
        nb = _executed(demo_run, name)
        figure_cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "plot_" in "".join(c["source"])]
        assert len(figure_cells) >= 2
        for cell in figure_cells:
            assert any("image/png" in o.get("data", {}) for o in cell["outputs"]), "".join(cell["source"])
    for name in NOTEBOOKS:
        nb = _executed(demo_run, name)
        shown = [(c, o) for c in nb["cells"] for o in c.get("outputs", [])]
        noisy = [(n, "".join(c["source"])[:60]) for c, o in shown for n in NOISE if n in _visible(o)]
        assert not noisy, f"{name}: {noisy}"
        # in red: nothing but the package's own notices (e.g. "[detox-sft zoo] ... waiting for the lock")
        stderr = [line for _, o in shown if o.get("name") == "stderr" for line in _text(o).splitlines() if line.strip()]
        foreign = [line[:200] for line in stderr if not line.startswith("[detox-sft")]
        assert not foreign, f"{name} printed to stderr (shown in red): {foreign}"
        bars = [m for _, o in shown if o.get("output_type") == "stream" for m in re.findall(r"(\d+)%\|", _text(o))]
        assert all(b == "100" for b in bars), f"{name}: a progress bar did not finish or was kept mid-way: {bars}"
    assert any("100%|" in _text(o) for c in _executed(demo_run, "1-sft")["cells"] for o in c.get("outputs", []))


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_report_has_the_formatted_tables_and_reading_within_the_page(demo_run, tmp_path):
    from detox_sft_dev import slides

    report = (demo_run / "report.html").read_text()
    assert "<table" in report and "data:image/png;base64" in report
    assert ESTIMATE.search(report) and "_low" not in report
    assert re.search(r'<div class="reading">.*<ul>.*<strong>', report, flags=re.S)
    chromium = slides.find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed: the report's width is not checked")
    assert slides.check_widths(demo_run / "report.html", chromium) == []


# --------------------------------------------------------------------------------------------------------------------
# the demo's own clean-up of executed notebooks


def test_redrawn_lines_keep_their_last_state():
    assert _overwritten("\rbar:  0%|\rbar: 50%|\rbar: 100%|\ndone\n") == "bar: 100%|\ndone\n"
    assert _overwritten("abc\r") == "abc"


def test_stream_outputs_are_merged_and_bars_end_at_their_last_frame(tmp_path):
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "source": [],
                "outputs": [
                    {"output_type": "stream", "name": "stdout", "text": "\rwork:   0%|"},
                    {"output_type": "stream", "name": "stdout", "text": "\rwork: 100%|\n"},
                    {"output_type": "execute_result", "data": {"text/plain": "1"}, "metadata": {}},
                    {"output_type": "stream", "name": "stdout", "text": "after\n"},
                ],
            },
            {"cell_type": "markdown", "source": []},
        ]
    }
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    _tidy_streams(path)
    outputs = json.loads(path.read_text())["cells"][0]["outputs"]
    assert [o.get("text") for o in outputs] == ["work: 100%|\n", None, "after\n"]


# --------------------------------------------------------------------------------------------------------------------
# helpers without a run


def test_tutorial_profile_without_hub_says_how_to_run_offline(tmp_path, capsys, monkeypatch):
    from detox_sft.notebook import start

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = start("tutorial", str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert cfg.profile == "tutorial" and (tmp_path / "run").is_dir()
    assert "cannot be reached" in out and 'recipe = "offline"' in out and "make demo" in out


def test_guard_names_the_step_that_produces_the_missing_output(tmp_path):
    from detox_sft.notebook import StepMissing, require

    with pytest.raises(StepMissing, match=r"run notebooks/1-sft.ipynb first"):
        require(tmp_path / "adapters" / "detox" / "adapter_config.json", "1-sft")
    (tmp_path / "x").write_text("")
    assert require(tmp_path / "x", "2-eval") == tmp_path / "x"


def test_the_paths_cells_end_with_show_as_plain_paths(tmp_path, offline_recipe):
    from IPython.core.formatters import PlainTextFormatter

    from detox_sft.notebook import ShownPath, record, require

    (tmp_path / "x").write_text("")
    for path in (require(tmp_path / "x", "2-eval"), record(offline_recipe, "t", value=1)):
        assert isinstance(path, ShownPath) and path.is_file()
        assert PlainTextFormatter()(path) == str(path)  # what Jupyter shows: not PosixPath('...')
    assert record(offline_recipe, "t").parent == offline_recipe.run_path / "notebooks"


def test_survival_table_ends_with_the_means_or_says_why_there_are_none(tmp_path):
    from IPython.display import Markdown

    from detox_sft import notebook
    from detox_sft.data import write_jsonl_atomic

    def row(i, rephrased):
        before, after = f"you are a stupid person {i}", f"you are a kind person {i}"
        return {
            "sample": before,
            "rephrased_text": after if rephrased else before,
            "rephrased": rephrased,
            "original_continuation": before,
            "continuation": after if rephrased else before,
        }

    path = tmp_path / "train_detox.jsonl"
    write_jsonl_atomic([row(i, i % 2 == 0) for i in range(8)], path)
    table = notebook.survival_table(path, n=2)
    assert list(table.index) == ["sample 0", "sample 1", "all rephrased"]
    assert table.loc["all rephrased", "original"] == "mean over the 4 rephrased samples"
    assert table.loc["all rephrased", "share of words changed"] == pytest.approx(1 / 6, abs=1e-3)
    write_jsonl_atomic([row(0, False)], path)
    assert isinstance(notebook.survival_table(path), Markdown)
