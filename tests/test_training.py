"""detox_sft.training: mappers, input checks, both arms trained in 4-bit on CPU, resume, adapters loaded back."""

from __future__ import annotations

import json
import math
import sys

import pytest

from detox_sft import cli, devices
from detox_sft import training as T
from detox_sft.config import load_recipe
from detox_sft.prompts import generation_prompt

OPT_NAMES = [
    f"model.decoder.layers.0.{n}"
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
]


def _small(recipe, samples: int = 40, **sft):
    """The offline recipe cut down to a few QLoRA steps (batch 8, one epoch)."""
    recipe.data.num_train_samples = samples
    recipe.data.test_size = 0.2
    recipe.training.sft.update({"per_device_train_batch_size": 8, "logging_steps": 1, "num_train_epochs": 1, **sft})
    return recipe


# --- pure mappers ---------------------------------------------------------------------------------------------------


def test_quantization_config_nf4_double_quant():
    import torch

    cfg = load_recipe("offline").training
    cpu = T.get_quantization_config(cfg, "cpu")
    assert cpu.load_in_4bit and cpu.bnb_4bit_quant_type == "nf4" and cpu.bnb_4bit_use_double_quant
    assert cpu.bnb_4bit_compute_dtype == torch.float32
    cfg.load_in_4bit = False
    assert T.get_quantization_config(cfg, "cpu") is None


def test_quantization_config_gpu_computes_in_bf16(monkeypatch):
    import torch

    monkeypatch.setattr(devices, "gpu_dtype", lambda: torch.bfloat16)
    monkeypatch.setattr(T, "gpu_dtype", lambda: torch.bfloat16)
    q = T.get_quantization_config(load_recipe("tutorial").training, "cuda")
    assert q.bnb_4bit_compute_dtype == torch.bfloat16


def test_peft_config_targets_opt_modules():
    cfg = load_recipe("tutorial").training
    lora = T.get_peft_config(cfg, OPT_NAMES + ["lm_head"])
    assert sorted(lora.target_modules) == sorted(T.OPT_TARGET_MODULES)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.task_type) == (16, 32, 0.05, "CAUSAL_LM")


def test_peft_config_rejects_o_proj_and_lists_real_modules():
    cfg = load_recipe("tutorial").training
    cfg.lora["target_modules"] = ["q_proj", "o_proj"]  # the 2024 original's mistake
    with pytest.raises(T.TrainingError) as err:
        T.get_peft_config(cfg, OPT_NAMES)
    msg = str(err.value)
    assert "o_proj" in msg and "out_proj" in msg and "fc1" in msg


def test_peft_config_checks_against_the_model_skeleton(zoo):
    cfg = load_recipe("offline").training
    names = T.linear_module_names(T._meta_model(str(zoo.opt)))
    # the opt-350m quirk: word_embed_proj_dim != hidden_size gives project_in / project_out
    assert {"project_in", "project_out", *T.OPT_TARGET_MODULES} <= set(names) and "lm_head" not in names
    cfg.lora["target_modules"] = ["lm_head"]
    with pytest.raises(T.TrainingError, match="lm_head"):
        T.get_peft_config(cfg, T._meta_model(str(zoo.opt)))


def test_sft_config_cpu(tmp_path):
    recipe = load_recipe("offline")
    c = T.get_sft_config(recipe.training, tmp_path, 7, "cpu")
    assert c.use_cpu and not c.bf16 and not c.fp16
    assert c.eval_strategy == "epoch" and c.save_strategy == "steps" and c.save_steps == 50
    assert c.max_length == 64 and c.seed == 7 and c.data_seed == 7 and c.report_to == []
    # the base model loads in fp32 and sits on the CPU explicitly (a 4-bit model must be on a device)
    assert c.model_init_kwargs == {"dtype": "float32", "device_map": {"": "cpu"}} and c.completion_only_loss is True
    assert c.output_dir == str(tmp_path) and c.activation_checkpointing is False


def test_sft_config_gpu_kwargs(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(devices, "gpu_dtype", lambda: torch.bfloat16)
    monkeypatch.setattr(T, "gpu_dtype", lambda: torch.bfloat16)
    cfg = load_recipe("tutorial").training
    kw = T.precision_kwargs(cfg, "cuda")
    assert kw["bf16"] and not kw["fp16"] and not kw["use_cpu"]
    # the tutorial pins opt-350m: SFTTrainer loads the base at that commit
    assert kw["model_init_kwargs"] == {"dtype": "bfloat16", "revision": cfg.base_model_revision}


def test_sft_config_unknown_key_is_named(tmp_path):
    cfg = load_recipe("offline").training
    cfg.sft["max_seq_length"] = 64  # renamed to max_length in TRL
    with pytest.raises(T.TrainingError, match="max_seq_length"):
        T.get_sft_config(cfg, tmp_path, 1, "cpu")
    del cfg.sft["max_seq_length"]
    cfg.sft["seed"] = 3  # fixed by the recipe's seed
    with pytest.raises(T.TrainingError, match="seed.*leave output_dir, seed"):
        T.get_sft_config(cfg, tmp_path, 1, "cpu")


def test_prompt_completion_split_is_a_token_prefix(zoo):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from detox_sft.prompts import format_sample

    text = format_sample("you are such a", "nice person today")
    pc = T.to_prompt_completion(Dataset.from_dict({"text": [text], "toxicity": [0.1]}))
    row = pc[0]
    assert set(pc.column_names) == {"prompt", "completion"}
    assert row["prompt"] + row["completion"] == text
    assert row["prompt"] == generation_prompt("you are such a")
    tok = AutoTokenizer.from_pretrained(str(zoo.opt))
    ids_prompt, ids_full = tok(row["prompt"])["input_ids"], tok(text)["input_ids"]
    assert ids_full[: len(ids_prompt)] == ids_prompt  # TRL's completion mask starts exactly after the prompt


# --- bad input: a clear error before any training --------------------------------------------------------------------


@pytest.fixture
def tiny_ds():
    from datasets import Dataset, DatasetDict

    from detox_sft.prompts import format_sample

    rows = [format_sample(f"prompt {i}", f"continuation {i}") for i in range(8)]
    return DatasetDict(train=Dataset.from_dict({"text": rows}), test=Dataset.from_dict({"text": rows[:2]}))


def _assert_nothing_trained(recipe):
    assert not (recipe.run_path / "adapters" / "raw" / "checkpoints").exists()
    assert not (recipe.run_path / "adapters" / "raw" / "metrics.json").exists()


def test_empty_training_set(offline_recipe, tiny_ds, zoo):
    tiny_ds["train"] = tiny_ds["train"].select([])
    with pytest.raises(T.TrainingError, match="training set is empty"):
        T.train_arm(offline_recipe, "raw", tiny_ds)
    _assert_nothing_trained(offline_recipe)


def test_missing_text_column(offline_recipe, tiny_ds, zoo):
    tiny_ds["train"] = tiny_ds["train"].rename_column("text", "sentence")
    with pytest.raises(T.TrainingError, match="no 'text' column.*sentence"):
        T.train_arm(offline_recipe, "raw", tiny_ds)
    _assert_nothing_trained(offline_recipe)


def test_max_length_shorter_than_prompt(offline_recipe, tiny_ds, zoo):
    offline_recipe.training.sft["max_length"] = 4
    with pytest.raises(T.TrainingError, match="max_length=4 is not longer than the prompt template"):
        T.train_arm(offline_recipe, "raw", tiny_ds)
    _assert_nothing_trained(offline_recipe)


def test_4bit_where_bitsandbytes_cannot_run(offline_recipe, tiny_ds, zoo, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # as if bitsandbytes had no usable build
    with pytest.raises(T.TrainingError, match="load_in_4bit: false"):
        T.train_arm(offline_recipe, "raw", tiny_ds)
    _assert_nothing_trained(offline_recipe)


def test_missing_detox_set_says_run_rephrase(offline_recipe, capsys):
    argv = ["train", "--recipe", "offline", "--arm", "detox", "--run-dir", str(offline_recipe.run_path)]
    assert cli.main(argv) == 2
    assert "detox-sft rephrase" in capsys.readouterr().err


def test_missing_adapter_says_train_first(tmp_path):
    with pytest.raises(T.TrainingError, match=r"No adapter in .* run notebooks/1-sft.ipynb first"):
        T.load_adapter_model(tmp_path, "detox", "cpu")


# --- both arms, QLoRA on CPU ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(zoo, tmp_path_factory):
    """Both arms trained on the offline recipe (32 samples, 4 steps each), detox data as the rephrase step writes it."""
    from detox_sft.data import load_train_dataset
    from detox_sft.prompts import format_sample

    run_dir = tmp_path_factory.mktemp("run")
    recipe = _small(load_recipe("offline", run_dir=str(run_dir)))
    raw = load_train_dataset(recipe.data, recipe.seed)
    # stand-in for the rephrase output (same records, same columns, a rewritten continuation)
    (run_dir / "data").mkdir()
    with open(run_dir / "data" / "train_detox.jsonl", "w") as fh:
        for row in raw["train"]:
            cont = " ".join(reversed(row["continuation"].split()))
            fh.write(json.dumps({**row, "continuation": cont, "text": format_sample(row["prompt"], cont)}) + "\n")
    datasets = T.load_arm_datasets(recipe)
    results = T.train_arms(recipe, datasets)
    return recipe, datasets, results


def test_both_arms_write_artifacts(trained):
    recipe, datasets, results = trained
    assert list(results) == ["raw", "detox"]
    for arm, result in results.items():
        out = recipe.run_path / "adapters" / arm
        assert result.adapter_dir == out and not result.skipped
        for name in (
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "log_history.json",
            "metrics.json",
        ):
            assert (out / name).is_file(), name
        assert not (out / "checkpoints").exists()
        m = json.loads((out / "metrics.json").read_text())
        assert m["path"] == "CPU QLoRA" and m["load_in_4bit"] and m["device"] == "cpu"
        assert m["num_train_samples"] == len(datasets[arm]["train"]) == 32 and m["global_step"] == 4
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["final_eval_loss"])
        assert len(m["loss_curve"]["train"]) == 4 and len(m["loss_curve"]["eval"]) == 1  # eval at the epoch's end
        assert m["samples_per_s"] > 0 and m["tokens_per_s"] > 0 and m["wall_time_s"] > 0
        assert m["peak_memory_bytes"] > 50 * 2**20 and m["peak_memory_kind"].startswith("cpu_peak_rss")
        assert 0 < m["trainable_parameters"] < m["total_parameters"]
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == sorted(T.OPT_TARGET_MODULES)
    # identical recipe and seed; only the text differs, and so does the loss
    raw_m, detox_m = (results[a].metrics for a in ("raw", "detox"))
    assert raw_m["training"] == detox_m["training"] and raw_m["seed"] == detox_m["seed"]
    assert datasets["raw"]["test"]["text"] == datasets["detox"]["test"]["text"]
    assert raw_m["train_loss"] != detox_m["train_loss"]


def test_adapters_load_back_and_generate(trained):
    import torch

    recipe, _, _ = trained
    for arm in T.ARMS:
        model, tok = T.load_adapter_model(recipe.run_path, arm, "cpu")
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
        enc = tok([generation_prompt("you are such a")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > enc["input_ids"].shape[1]


def test_loss_figure(trained):
    recipe, _, _ = trained
    fig = T.plot_loss_curves(recipe.run_path)
    assert (recipe.run_path / "figures" / "loss_curves.png").stat().st_size > 1000
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert {"raw train", "raw eval", "detox train", "detox eval"} <= labels


def test_finished_arm_is_not_retrained(trained, tmp_path, capsys):
    recipe, _, results = trained
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert cli.main(["train", "--recipe", str(path), "--arm", "both", "--run-dir", str(recipe.run_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == 2 and "| raw | CPU QLoRA |" in out
    assert json.loads((recipe.run_path / "adapters" / "raw" / "metrics.json").read_text()) == results["raw"].metrics


# --- resume ---------------------------------------------------------------------------------------------------------


def test_interrupted_run_resumes_from_last_checkpoint(offline_recipe, zoo):
    from transformers import TrainerCallback

    from detox_sft.data import load_train_dataset

    recipe = _small(offline_recipe, samples=20, max_steps=4, save_steps=2)
    ds = load_train_dataset(recipe.data, recipe.seed)

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train_arm(recipe, "raw", ds, callbacks=[Interrupt()])
    out = recipe.run_path / "adapters" / "raw"
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "metrics.json").exists()

    result = T.train_arm(recipe, "raw", ds)
    m = result.metrics
    assert m["resumed_from"] == "checkpoint-2" and m["global_step"] == 4
    assert [p["step"] for p in m["loss_curve"]["train"]] == [1, 2, 3, 4]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "checkpoints").exists()


def test_a_run_killed_between_its_last_checkpoint_and_its_closing_evaluation_resumes_to_the_same_eval_loss(
    offline_recipe, zoo
):
    """The Trainer saves the last step's checkpoint, then runs the epoch's closing evaluation: killed between the two,
    the rerun resumes at the end and still logs the final eval loss an uninterrupted run logs (found by make faults)."""
    import copy

    from transformers import TrainerCallback

    from detox_sft.data import load_train_dataset

    recipe = _small(offline_recipe, samples=20, save_steps=1)
    ds = load_train_dataset(recipe.data, recipe.seed)
    other = copy.deepcopy(recipe)
    other.run_dir = str(recipe.run_path.parent / "uninterrupted")
    reference = T.train_arm(other, "raw", ds).metrics

    class KillBeforeTheClosingEvaluation(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train_arm(recipe, "raw", ds, callbacks=[KillBeforeTheClosingEvaluation()])
    m = T.train_arm(recipe, "raw", ds).metrics
    assert m["resumed_from"] == f"checkpoint-{reference['global_step']}"
    assert reference["final_eval_loss"] is not None
    assert m["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], abs=1e-3)


def test_whole_run_train_loss_adds_back_the_steps_before_the_checkpoint():
    log = [{"loss": 4.0, "step": 1}, {"loss": 3.0, "step": 3}, {"eval_loss": 2.9, "step": 3}, {"loss": 2.0, "step": 4}]
    # resumed at step 3 (after the step-3 log), 1 more step with session mean 2.0: (4*1 + 3*2 + 2*1) / 4
    assert T._whole_run_train_loss(2.0, log, start_step=3, end_step=4) == pytest.approx(3.0)
    assert T._whole_run_train_loss(2.5, log, start_step=0, end_step=4) == 2.5  # not resumed: the Trainer's
    assert T._whole_run_train_loss(None, log, start_step=3, end_step=4) is None


def test_damaged_checkpoint_and_marker_are_redone_with_a_warning(offline_recipe, zoo):
    import shutil

    from transformers import TrainerCallback

    from detox_sft.data import load_train_dataset

    recipe = _small(offline_recipe, samples=20, max_steps=4, save_steps=2)
    ds = load_train_dataset(recipe.data, recipe.seed)
    out = recipe.run_path / "adapters" / "raw"

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train_arm(recipe, "raw", ds, callbacks=[Interrupt()])
    # a kill while the Trainer wrote checkpoint-3: its files in place, trainer_state.json (written last) missing
    shutil.copytree(out / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-3")
    (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").unlink()
    with pytest.warns(UserWarning, match="checkpoint-3 is incomplete"):
        first = T.train_arm(recipe, "raw", ds)
    assert first.metrics["resumed_from"] == "checkpoint-2" and first.metrics["global_step"] == 4
    assert math.isfinite(first.metrics["train_loss"])

    # a truncated metrics.json (the "already trained" marker) means not trained: retrained, not a crash
    marker = out / "metrics.json"
    marker.write_text(marker.read_text()[:40])
    with pytest.warns(UserWarning, match="metrics.json is unreadable"):
        again = T.train_arm(recipe, "raw", ds)
    assert not again.skipped and again.metrics["global_step"] == 4 and again.metrics["resumed_from"] is None
    assert json.loads(marker.read_text())["global_step"] == 4
    # the retrained arm is the same training: same data, seed and steps
    assert again.metrics["final_eval_loss"] == pytest.approx(first.metrics["final_eval_loss"], abs=1e-3)
    assert T.train_arm(recipe, "raw", ds).skipped  # and now it is finished
