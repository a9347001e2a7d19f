"""The tutorial rehearsed at full size: hub-shaped random models built on demand (never by the demo zoo's build), the
rehearsal recipes, and (marked slow) the four notebooks on the shortened CPU rehearsal."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from detox_sft.config import load_recipe
from detox_sft.files import atomic_write_text
from detox_sft_dev.zoo import rehearsal

ROOT = Path(__file__).resolve().parents[1]


def _record_run():
    """benchmarks/record_run.py (a script, not a package module): for its ``machine()``."""
    spec = importlib.util.spec_from_file_location("record_run", ROOT / "benchmarks" / "record_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parameters(model_cls, config_cls, values):
    import torch

    with torch.device("meta"):  # shapes only: no memory, no time
        return sum(p.numel() for p in model_cls(config_cls(**values)).parameters())


def test_rehearsal_models_have_the_hub_models_sizes():
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        OPTConfig,
        OPTForCausalLM,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    # the sizes the hub's model cards give: opt-350m 331M, bart-large 406M, the roberta-base-sized classifier 125M
    assert round(_parameters(OPTForCausalLM, OPTConfig, rehearsal.OPT_350M) / 1e6) == 331
    assert round(_parameters(BartForConditionalGeneration, BartConfig, rehearsal.BART_LARGE) / 1e6) == 406
    assert (
        round(_parameters(RobertaForSequenceClassification, RobertaConfig, rehearsal.ROBERTA_HATE_SPEECH) / 1e6) == 125
    )
    opt = rehearsal.OPT_350M
    assert (opt["word_embed_proj_dim"], opt["hidden_size"], opt["do_layer_norm_before"]) == (512, 1024, False)
    assert rehearsal.ROBERTA_HATE_SPEECH["id2label"] == {0: "nothate", 1: "hate"}


def test_the_demo_zoo_never_builds_them_and_zoo_refs_reach_them(monkeypatch, tmp_path):
    from detox_sft.refs import resolve_ref
    from detox_sft_dev import zoo

    assert not set(zoo.ZOO_NAMES) & set(zoo.REHEARSAL_NAMES)
    asked = []
    monkeypatch.setattr(zoo, "ensure_rehearsal", lambda name, cache_dir=None: asked.append(name) or tmp_path)
    assert resolve_ref("zoo:rehearsal-opt") == str(tmp_path) and asked == ["rehearsal-opt"]
    with pytest.raises(zoo.ZooError, match="rehearsal-scorer"):  # an unknown name lists both kinds
        zoo.resolve("rehearsal-gpt")


def test_the_rehearsal_recipe_is_the_tutorial_with_local_models():
    tutorial, rehearsed = load_recipe("tutorial").to_dict(), load_recipe("rehearsal").to_dict()
    replaced = {
        ("data", "train_dataset"): "zoo:rtp",
        ("data", "eval_dataset"): "zoo:wiki_toxic",
        ("rephrase", "base_model"): "zoo:rehearsal-bart",
        ("rephrase", "expert"): "zoo:rehearsal-expert",
        ("rephrase", "anti_expert"): "zoo:rehearsal-anti-expert",
        ("training", "base_model"): "zoo:rehearsal-opt",
        ("evaluation", "perplexity_model"): None,  # no 1.3B rehearsal judge built: the base model judges (not timed)
    }
    for (section, key), value in replaced.items():
        assert rehearsed[section][key] == value
        rehearsed[section][key] = tutorial[section][key]
    assert rehearsed["evaluation"]["scorers"] == ["zoo:rehearsal-scorer", *tutorial["evaluation"]["scorers"][1:]]
    rehearsed["evaluation"]["scorers"] = tutorial["evaluation"]["scorers"]
    assert rehearsed["rephrase"]["scorer"] == "profanity-check"  # gated by the offline scorer, as the tutorial is
    assert (rehearsed["name"], rehearsed["profile"]) == ("rehearsal", "offline")  # it needs no hub
    rehearsed["name"], rehearsed["profile"] = tutorial["name"], tutorial["profile"]
    for section, values in rehearsed.items():  # hub revisions: a zoo: reference has none
        revisions = [k for k in values if k.endswith(("_revision", "_revisions"))] if isinstance(values, dict) else []
        for key in revisions:
            assert not values[key], f"{section}.{key}"
            values[key] = tutorial[section][key]
    assert rehearsed == tutorial  # every size, setting and seed is the tutorial's


def test_the_tokenizers_have_the_real_vocabulary_size_and_special_ids(tmp_path):
    from transformers import AutoTokenizer

    started = time.perf_counter()
    manifest = rehearsal._build_tokenizers(tmp_path)
    assert manifest["learned_tokens"] < rehearsal.TOKENIZER_VOCAB
    opt = AutoTokenizer.from_pretrained(tmp_path / "opt")
    bart = AutoTokenizer.from_pretrained(tmp_path / "bart")
    roberta = AutoTokenizer.from_pretrained(tmp_path / "roberta")
    for tok in (opt, bart, roberta):
        assert len(tok) == rehearsal.TOKENIZER_VOCAB
        assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert bart.mask_token_id == roberta.mask_token_id == 50264
    assert opt("you are kind")["input_ids"][0] == 2  # OPT prepends </s>
    ids = bart("you are kind")["input_ids"]
    assert (ids[0], ids[-1]) == (0, 2)
    # every id a random model may emit decodes to text of its own, and no text encodes to a placeholder
    high = [opt.decode([i]) for i in range(50000, 50265)]
    assert len(set(high)) == len(high) and all(h.strip() for h in high)
    assert max(opt("the quick brown fox, an idiot")["input_ids"]) < manifest["learned_tokens"]
    assert time.perf_counter() - started < 120


@pytest.mark.slow
@pytest.mark.service
def test_the_shortened_rehearsal_runs_the_four_notebooks_at_full_model_size(tmp_path):
    """recipes/rehearsal-cpu.yaml through `detox-sft-dev demo`: builds the rehearsal models on first use (about 6 GB)."""
    from detox_sft.config import RECIPES_DIR
    from detox_sft.notebook import recorded
    from detox_sft.refs import resolve_ref
    from detox_sft_dev import provenance, zoo
    from detox_sft_dev.demo import NOTEBOOKS, NOTEBOOKS_DIR, run_demo
    from detox_sft_dev.rehearsal import rehearsal_report

    # what the record below measures, taken before anything runs: this test, the notebooks, the recipe, and every
    # module they import (the demo driver, the rehearsal report, the zoo, the helper package)
    notebooks = [NOTEBOOKS_DIR / f"{name}.ipynb" for name in NOTEBOOKS]
    command = ["pytest", "-m", "slow", "-s", "-q", "-p", "no:xdist", "tests/test_rehearsal.py"]
    prov = provenance.capture(
        __file__, *notebooks, RECIPES_DIR / "rehearsal-cpu.yaml", modules=["detox_sft_dev.zoo"], command=command
    )
    started = time.perf_counter()
    built = {name: json.loads((zoo.resolve(name) / "manifest.json").read_text()) for name in zoo.REHEARSAL_NAMES}
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    out = run_demo("rehearsal-cpu", runs_root=tmp_path / "runs", stamp="r")
    seconds = time.perf_counter() - started
    for name in NOTEBOOKS:
        executed = json.loads((out / f"{name}.ipynb").read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[:1]}"

    report = rehearsal_report(out / "run", "rehearsal-cpu")
    sizes = {name: [m["parameters"], m["dtype"], m["bytes_on_disk"], m["build_seconds"]] for name, m in built.items()}
    # README quotes this run: it is written here, with the provenance the demo took as it started (its commit, clean
    # tree, command and measured files), so `benchmarks/provenance.py` can say whether it still measures the code
    record = {
        "what": f"{__name__}::test_the_shortened_rehearsal_runs_the_four_notebooks_at_full_model_size "
        "(recipes/rehearsal-cpu.yaml through detox-sft-dev demo)",
        "command": "HF_HUB_OFFLINE=1 .venv/bin/" + " ".join(command),
        "date": time.strftime("%Y-%m-%d"),
        "machine": _record_run().machine(),
        "models (parameters, dtype, bytes on disk, build s)": sizes,
        "models_ready_s": round(build_seconds, 1),
        "demo_s": round(seconds, 1),
        "report": report,
        "provenance": prov,
    }
    print(json.dumps(record, indent=2))
    config = json.loads((Path(resolve_ref("zoo:rehearsal-opt")) / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (1024, 24, 50272)

    sft = recorded(out / "run", "1-sft")
    assert sft["rephrase"]["total"] == 9 and sft["rephrase"]["gated"] > 0  # 10 samples minus one held out
    assert {arm: m["global_step"] for arm, m in sft["train"].items()} == {"raw": 2, "detox": 2}
    results = json.loads((out / "run" / "eval" / "results.json").read_text())
    assert (results["num_prompts"], results["num_samples"]) == (4, 2)
    assert results["headline_scorer"] == "zoo:rehearsal-scorer" and results["nontoxic"]["num_prompts"] == 2
    assert report["rephrase"]["gated_sample_tokens"]["n"] == sft["rephrase"]["gated"]
    assert all(v["tokens_per_sample"] for v in report["training"].values())
    assert set(report["evaluation"]["continuation_tokens"]) == {"base", "raw", "detox"}
    answers = recorded(out / "run", "4-inference_request")["answers"]
    assert len(answers) == 4 and all(isinstance(a["answer"], str) for a in answers)  # served and answered
    caikit = recorded(out / "run", "3-save_convert_model")["uploads"]["caikit"]  # every file in S3, marker written last
    assert caikit["files"] > 0 and len(caikit["uploaded"]) + len(caikit["skipped"]) == caikit["files"]
    assert caikit["marker_key"].endswith(".detox-sft-upload.json")
    atomic_write_text(ROOT / "results" / "rehearsal-cpu" / "record.json", json.dumps(record, indent=2) + "\n")
