"""Export: merge a LoRA adapter on the offline OPT, write the HF and Caikit directories, load back, generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from detox_sft.config import load_recipe
from detox_sft.export import (
    CHECK_PROMPT,
    LICENCES,
    ExportError,
    check_caikit_model,
    convert_to_caikit,
    merge_adapter,
    model_card,
)

CAIKIT_TEXT_GENERATION_MODULE_ID = "f9181353-4ccf-4572-bd1e-f12bcda26792"  # caikit-nlp's local TextGeneration


@pytest.fixture(scope="module")
def exported(zoo, tmp_path_factory):
    """The offline recipe's run with a LoRA adapter on the zoo OPT, exported through the CLI."""
    from conftest import _make_adapter  # the helper behind the make_adapter fixture (that one is per test)

    from detox_sft.cli import main

    run_dir = tmp_path_factory.mktemp("export") / "run"
    recipe = load_recipe("offline", run_dir=str(run_dir))
    adapter = _make_adapter(recipe, zoo.opt)
    assert main(["export", "--recipe", "offline", "--run-dir", str(run_dir)]) == 0
    return recipe, adapter


def _logits(model, tokenizer, text="Prompt: you are\nContinuation: "):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_merged_model_equals_base_plus_adapter(exported, zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, adapter = exported
    hf_dir = recipe.paths.hf_export
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert (hf_dir / "tokenizer_config.json").is_file()
    assert not (hf_dir / "adapter_config.json").exists()  # a plain model, servable by vLLM as is
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    merged = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_modules())
    base = AutoModelForCausalLM.from_pretrained(zoo.opt).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.opt), adapter).eval()
    merged_logits = _logits(merged, tokenizer)
    assert torch.allclose(merged_logits, _logits(with_adapter, tokenizer), atol=1e-4)
    assert (merged_logits - _logits(base, tokenizer)).abs().max() > 1e-3  # the adapter really changed the model
    assert merged.config.word_embed_proj_dim != merged.config.hidden_size  # opt-350m's quirk survives the merge


def test_caikit_directory_is_loadable_and_matches_hf_greedy(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, _ = exported
    caikit_dir = recipe.paths.caikit_export(recipe.export.model_id)
    assert caikit_dir.name == recipe.export.model_id == "opt-350m-detox"
    config = yaml.safe_load((caikit_dir / "config.yml").read_text())
    assert config["module_id"] == CAIKIT_TEXT_GENERATION_MODULE_ID
    assert (caikit_dir / config["artifact_path"] / "config.json").is_file()  # what the TGIS container loads
    text = check_caikit_model(caikit_dir, max_new_tokens=8)
    # the same greedy continuation as transformers on the merged HF directory
    hf_dir = recipe.paths.hf_export
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    inputs = tokenizer(CHECK_PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    prompt = tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert text == full[len(prompt) :]
    assert text.strip()


def test_export_dtype_follows_the_recipe(exported, zoo, tmp_path):
    recipe, _ = exported
    half = load_recipe("offline", run_dir=str(recipe.run_path))
    half.export.dtype = "float16"
    half.run_dir = str(tmp_path / "run")
    (tmp_path / "run" / "adapters").mkdir(parents=True)
    (tmp_path / "run" / "adapters" / "detox").symlink_to(recipe.run_path / "adapters" / "detox")
    hf_dir = merge_adapter(half)
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "float16"
    caikit_dir = convert_to_caikit(hf_dir, tmp_path / "caikit" / "m")
    assert yaml.safe_load((caikit_dir / "config.yml").read_text())["torch_dtype"] == "torch.float16"


def test_missing_adapter_says_what_to_do(offline_recipe):
    with pytest.raises(ExportError, match=r"run notebooks/1-sft.ipynb first \(or `detox-sft train"):
        merge_adapter(offline_recipe)


def test_export_cli_reports_missing_adapter(tmp_path, capsys):
    from detox_sft.cli import main

    assert main(["export", "--recipe", "offline", "--run-dir", str(tmp_path / "empty")]) == 1
    assert "No adapter in" in capsys.readouterr().err


def test_an_interrupted_export_leaves_the_previous_one_whole_and_a_rerun_completes(exported, monkeypatch):
    from detox_sft import export

    recipe, _ = exported
    root, export_dir = recipe.run_path, recipe.paths.export

    def snapshot():
        return {p.relative_to(export_dir): p.read_bytes() for p in sorted(export_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    assert any(p.name == "config.yml" for p in before) and any(p.name == "model.safetensors" for p in before)

    # interrupted after both directories were written, before the check: nothing of the new export is visible
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "check_caikit_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_model(recipe)
    assert snapshot() == before
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # its temporary directory is gone

    # a SIGKILL leaves its half-built directory behind: the rerun removes it and completes
    (root / ".export.killed.tmp" / "hf").mkdir(parents=True)
    (root / ".export.killed.tmp" / "hf" / "model.safetensors").write_bytes(b"half")
    monkeypatch.undo()
    result = export.export_model(recipe)
    assert result.hf_dir == recipe.paths.hf_export and (result.caikit_dir / "config.yml").is_file() and result.sample
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    after = snapshot()
    assert after.keys() == before.keys()
    assert all(after[p] == before[p] for p in after if p.name != "config.yml")  # deterministic, but for timestamps


# --- the model card (issue 25): README.md in both directories, numbers from the run's own results ----------------

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "results" / "offline"  # a real `make demo` run's results.json and rephrase summary


@pytest.fixture
def evaluated_run(tmp_path):
    """A run directory holding the recorded offline run's eval/results.json and rephrase summary."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "data").mkdir()
    shutil.copy(RECORD / "results.json", tmp_path / "eval" / "results.json")
    summary = json.loads((RECORD / "rephrase_summary.json").read_text())
    (tmp_path / "data" / "rephrase_summary.jsonl").write_text(json.dumps(summary) + "\n")
    return load_recipe("offline", run_dir=str(tmp_path)), json.loads((RECORD / "results.json").read_text()), summary


def test_model_card_eval_results_round_trip_equal_to_results_json(evaluated_run, tmp_path):
    """model-index holds EMT, TP and mean toxicity of the detox arm under every judge, exactly as results.json."""
    from huggingface_hub import ModelCard

    recipe, results, _ = evaluated_run
    model_card(recipe).save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md").data.eval_results
    got = {(e.metric_config, e.metric_type): e.metric_value for e in loaded}
    want = {
        (judge, metric): stats["value"]
        for judge, by_metric in results["metrics"]["detox"]["toxicity"].items()
        for metric, stats in by_metric.items()
    }
    assert got == want and len(loaded) == 9
    assert {(e.dataset_type, e.dataset_split, e.dataset_args["prompts"]) for e in loaded} == {
        ("zoo:wiki_toxic", "test", 200)
    }


def test_model_card_body_states_intervals_detoxification_licences_and_limits(evaluated_run):
    recipe, results, summary = evaluated_run
    text = model_card(recipe).content
    paired = results["comparisons"]["detox_vs_raw"]["zoo:lexicon"]["mean_toxicity"]
    assert (
        f"{paired['value']:.3f} [{paired['low']:.3f}, {paired['high']:.3f}]" in text
    )  # README's -0.167 [-0.201, -0.132]
    assert f"{summary['rephrased']} of {summary['total']} training samples" in text
    assert "gate scorer `profanity-check`" in text and f">= {summary['gate_threshold']}" in text
    assert "Made from synthetic data" in text and "Content warning" in text
    assert "reduced, not removed" in text and "| judge: `profanity-check`" in text


def test_model_card_without_results_says_so(offline_recipe):
    text = model_card(offline_recipe).content
    assert "No evaluation results yet" in text and "model-index" not in text


def test_card_licences_are_readmes_table(evaluated_run):
    """The card's licence strings are the ones README.md's licence table states."""
    table = (REPO / "README.md").read_text().split("## Licences of the data and models")[1].split("\n## ")[0]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| `")
    }
    for ref, licence in LICENCES.items():
        row = next(value for key, value in rows.items() if ref in key)  # profanity-check: `alt-profanity-check`
        assert row.startswith(licence), (ref, row)


def test_card_is_in_both_export_directories(exported):
    recipe, _ = exported
    hf_card = recipe.paths.hf_export / "README.md"
    caikit_card = recipe.paths.caikit_export(recipe.export.model_id) / "README.md"
    assert hf_card.read_text() == caikit_card.read_text()
    assert "No evaluation results yet" in hf_card.read_text()  # this run was exported before any evaluation
