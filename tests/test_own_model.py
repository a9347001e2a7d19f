"""Your own model: a base of another architecture (the zoo's small Llama) runs the whole offline pipeline from the
command line with two recipe overrides (training.base_model, training.lora.target_modules: null), and the LoRA targets
follow the model type (a target the model lacks is an error naming the ones it has)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from detox_sft import training as T
from detox_sft.cli import main
from detox_sft.config import load_recipe
from detox_sft.data import load_train_dataset, write_jsonl_atomic
from detox_sft.export import CHECK_PROMPT, check_caikit_model

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CAIKIT_TEXT_GENERATION_MODULE_ID = "f9181353-4ccf-4572-bd1e-f12bcda26792"


def _flags(run_dir) -> list[str]:
    """The offline recipe on zoo:llama, cut down to two QLoRA steps per arm and a tiny evaluation."""
    return [
        "--recipe",
        "offline",
        "--run-dir",
        str(run_dir),
        "--training.base_model",
        "zoo:llama",
        "--training.lora.target_modules",
        "null",  # the model type's default
        "--data.num_train_samples",
        "20",
        "--data.test_size",
        "0.2",
        "--training.sft.per_device_train_batch_size",
        "8",
        "--training.sft.max_steps",
        "2",
        "--data.num_eval_prompts",
        "4",
        "--evaluation.num_samples",
        "2",
        "--evaluation.max_new_tokens",
        "8",
        "--evaluation.scorers",
        "[zoo:lexicon]",
        "--evaluation.bootstrap_samples",
        "200",
        "--export.model_id",
        "llama-detox",
    ]


def _recipe(run_dir):
    flags = _flags(run_dir)
    dotted = {flag[2:]: value for flag, value in zip(flags[4::2], flags[5::2], strict=True)}
    return load_recipe("offline", run_dir=str(run_dir), dotted=dotted)


@pytest.fixture(scope="module")
def llama_run(zoo, tmp_path_factory):
    """Train both arms, evaluate and export on zoo:llama through `detox-sft`; the detox arm's data is the raw set
    (this file tests the model; tests/test_own_data.py the rephrase step on your own data)."""
    run_dir = tmp_path_factory.mktemp("own_model") / "run"
    recipe = _recipe(run_dir)
    raw = load_train_dataset(recipe.data, recipe.seed)
    write_jsonl_atomic(raw["train"].to_list(), recipe.paths.train_set("detox"))
    for step in ("train", "evaluate", "export"):
        extra = ["--quiet"] if step == "evaluate" else []
        assert main([step, *extra, *_flags(run_dir)]) == 0, step
    return recipe


def test_llama_lora_targets_default_by_model_type_and_are_checked(zoo):
    cfg = load_recipe("offline").training  # its targets are OPT's
    skeleton = T._meta_model(str(zoo.llama))
    with pytest.raises(T.TrainingError) as err:
        T.get_peft_config(cfg, skeleton)
    message = str(err.value)
    assert "out_proj, fc1, fc2 not in the model (llama)" in message
    assert "o_proj" in message and "gate_proj" in message and "null" in message
    cfg.lora["target_modules"] = None
    assert set(T.get_peft_config(cfg, skeleton).target_modules) == LLAMA_TARGETS
    del cfg.lora["target_modules"]
    assert set(T.get_peft_config(cfg, skeleton).target_modules) == LLAMA_TARGETS
    opt = T.get_peft_config(cfg, T._meta_model(str(zoo.opt)))
    assert set(opt.target_modules) == set(T.OPT_TARGET_MODULES)


def test_gpt2_conv1d_targets_and_other_types_get_all_linear():
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

    cfg = load_recipe("offline").training
    cfg.lora["target_modules"] = None
    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        neox = AutoModelForCausalLM.from_config(
            GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
        )
    assert {"c_attn", "c_proj", "c_fc"} <= set(T.linear_module_names(gpt2))  # Conv1D layers count as linear
    assert set(T.get_peft_config(cfg, gpt2).target_modules) == {"c_attn", "c_proj", "c_fc"}
    assert T.get_peft_config(cfg, neox).target_modules == "all-linear"
    cfg.lora["target_modules"] = ["q_proj"]
    with pytest.raises(T.TrainingError, match=r"q_proj not in the model \(gpt2\).*c_attn"):
        T.get_peft_config(cfg, gpt2)


def test_both_arms_train_on_llama(llama_run):
    for arm in T.ARMS:
        out = llama_run.paths.adapter(arm)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["base_model"] == "zoo:llama" and metrics["global_step"] == 2
        assert metrics["path"] == "CPU QLoRA" and math.isfinite(metrics["train_loss"])
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert set(adapter["target_modules"]) == LLAMA_TARGETS
    model, _ = T.load_adapter_model(llama_run.run_path, "detox", "cpu")  # loads back on the recorded base
    assert model.base_model.model.config.model_type == "llama"


def test_llama_is_evaluated(llama_run):
    summary = json.loads(llama_run.paths.results.read_text())
    for model in ("base", "raw", "detox"):
        emt = summary["metrics"][model]["toxicity"]["zoo:lexicon"]["expected_max_toxicity"]
        assert 0.0 <= emt["low"] <= emt["value"] <= emt["high"] <= 1.0
        ppl = summary["metrics"][model]["perplexity"]  # the base model judges fluency: none for its own texts
        assert ppl.get("not_measured") if model == "base" else math.isfinite(ppl["value"])


def test_llama_export_merges_and_loads_back_in_both_formats(llama_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from detox_sft.refs import resolve_ref

    hf_dir = llama_run.paths.hf_export
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    merged = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert merged.config.model_type == "llama" and not any("lora" in n for n, _ in merged.named_modules())
    base = AutoModelForCausalLM.from_pretrained(resolve_ref("zoo:llama"))
    adapted = PeftModel.from_pretrained(base, str(llama_run.paths.adapter("detox"))).eval()
    inputs = tokenizer(CHECK_PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-4)
    # caikit-nlp bootstraps a Llama as it does OPT; the reloaded model continues as transformers does
    caikit_dir = llama_run.paths.caikit_export("llama-detox")
    assert yaml.safe_load((caikit_dir / "config.yml").read_text())["module_id"] == CAIKIT_TEXT_GENERATION_MODULE_ID
    text = check_caikit_model(caikit_dir, max_new_tokens=8)
    out = merged.generate(**inputs, max_new_tokens=8, do_sample=False)
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text == full[len(tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)) :]
