"""QLoRA fine-tuning of two arms (``raw``, ``detox``), one recipe: notebook 1 builds the configs and ``SFTTrainer`` in
its cells and calls the steps here around it; ``detox-sft train`` (:func:`train_arms`) makes the same calls."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detox_sft.compat import (
    PEFT_READS_IS_GRADIENT_CHECKPOINTING,
    ignore_warnings,
    keep_bnb_4bit_trainable_on_cpu,
    library_progress_bars_off,
)
from detox_sft.config import ARMS, Recipe, RunPaths, TrainingConfig
from detox_sft.data import load_train_dataset
from detox_sft.devices import compute_dtype, gpu_dtype, resolve_device
from detox_sft.files import atomic_write_json, read_json_or_none
from detox_sft.prompts import RESPONSE_MARKER, generation_prompt, split_sample
from detox_sft.refs import resolve_ref, revision_kwargs

if TYPE_CHECKING:  # heavy imports stay inside the functions
    from datasets import Dataset, DatasetDict
    from matplotlib.figure import Figure
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

logger = logging.getLogger(__name__)

# OPT's linear layers per decoder block; the attention output is `out_proj` (the 2024 original's `o_proj` is LLaMA's).
OPT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# LoRA targets by ``config.model_type`` when training.lora.target_modules is null; other types get PEFT's "all-linear"
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "opt": OPT_TARGET_MODULES,
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


class TrainingError(ValueError):
    """Training cannot start (bad input or configuration); the message says what to do."""


@dataclasses.dataclass
class TrainResult:
    """One arm's outcome: its adapter directory, ``metrics.json``'s content, and whether it was already trained."""

    adapter_dir: Path
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: bool = False


def get_quantization_config(cfg: TrainingConfig, device: str) -> BitsAndBytesConfig | None:
    """The 4-bit NF4 config with double quantisation (compute dtype by device), or `None` when 4-bit is off."""
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
    )


def linear_module_names(model_or_module_names: Any) -> list[str]:
    """Leaf names of the linear layers of a model (a meta skeleton will do) or of module names, without ``lm_head``."""
    import torch

    if isinstance(model_or_module_names, torch.nn.Module):
        # GPT-2's linear layers are Conv1D (bitsandbytes' Linear4bit is an nn.Linear)
        from transformers.pytorch_utils import Conv1D

        names = [n for n, m in model_or_module_names.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)]
    else:
        names = list(model_or_module_names)
    # TRL computes log-probs from lm_head.weight directly: an adapter there would never train.
    return sorted({n.rsplit(".", 1)[-1] for n in names if n} - {"lm_head"})


def lora_targets(cfg: TrainingConfig, model_or_module_names: Any) -> list[str] | str:
    """``training.lora.target_modules`` checked against the model's linear layers; null: the model type's default."""
    model_type = getattr(getattr(model_or_module_names, "config", None), "model_type", None)  # names alone have none
    default = list(LORA_TARGET_MODULES.get(model_type or "", ())) or "all-linear"
    targets = cfg.lora.get("target_modules") or default
    if targets == "all-linear":
        return targets
    targets, real = [targets] if isinstance(targets, str) else list(targets), linear_module_names(model_or_module_names)
    if unknown := [t for t in targets if t not in real]:
        kind = f" ({model_type})" if model_type else ""
        raise TrainingError(
            f"training.lora.target_modules: {', '.join(unknown)} not in the model{kind}; its linear layers are "
            f"{', '.join(real)}. Fix: use those names (OPT's attention output is out_proj, not o_proj), or set "
            f"training.lora.target_modules to null for the model type's default "
            f"({default if isinstance(default, str) else ', '.join(default)})."
        )
    return targets


def get_peft_config(cfg: TrainingConfig, model_or_module_names: Any) -> LoraConfig:
    """The causal-LM LoraConfig: ``training.lora`` with :func:`lora_targets`."""
    from peft import LoraConfig

    return LoraConfig(**{**cfg.lora, "target_modules": lora_targets(cfg, model_or_module_names)}, task_type="CAUSAL_LM")


def precision_kwargs(cfg: TrainingConfig, device: str) -> dict[str, Any]:
    """The SFTConfig fields that follow the device (plain data: SFTConfig refuses bf16 on a machine without a GPU)."""
    if device == "cuda":
        import torch

        gpu_bf16 = gpu_dtype() == torch.bfloat16
        kwargs: dict[str, Any] = {"use_cpu": False, "bf16": gpu_bf16, "fp16": not gpu_bf16}
        init = {"dtype": "bfloat16" if gpu_bf16 else "float16"}
    else:
        # a 4-bit model must sit on a device: TRL's default device_map is None on CPU
        kwargs, init = {"use_cpu": True, "bf16": False, "fp16": False}, {"dtype": "float32", "device_map": {"": "cpu"}}
    kwargs["model_init_kwargs"] = {**init, **_base_revision(cfg)}  # SFTTrainer loads the base from its path with these
    return kwargs


def get_sft_config(cfg: TrainingConfig, output_dir: str | os.PathLike[str], seed: int, device: str) -> SFTConfig:
    """``training.sft`` plus what the experiment fixes: checkpoints, one seed and sample order, loss, precision."""
    from trl import SFTConfig

    try:
        return SFTConfig(
            **cfg.sft,
            output_dir=str(output_dir),
            seed=seed,
            data_seed=seed,
            completion_only_loss=cfg.completion_only_loss,
            **precision_kwargs(cfg, device),
        )
    except TypeError as exc:
        raise TrainingError(
            f"training.sft: {exc}. Fix: use trl.SFTConfig field names (max_length, not max_seq_length), and leave "
            "output_dir, seed, data_seed, completion_only_loss, precision and model_init_kwargs to the recipe."
        ) from exc


def _require_text(dataset: Any, name: str) -> None:
    columns = list(getattr(dataset, "column_names", []) or [])
    if "text" not in columns:
        raise TrainingError(
            f"{name} has no 'text' column (columns: {', '.join(columns) or 'none'}). Fix: build it with "
            "detox_sft.data.load_train_dataset or detox_sft.prompts.format_sample."
        )


def _require_marker(texts: list[str], name: str) -> None:
    if missing := [i for i, t in enumerate(texts) if RESPONSE_MARKER not in t]:
        raise TrainingError(
            f"{len(missing)} of {len(texts)} {name} texts lack the marker {RESPONSE_MARKER!r} (first: row "
            f"{missing[0]}). Fix: write texts with detox_sft.data.format_sample (check the rephrase output), or set "
            "training.completion_only_loss: false to train on the whole text."
        )


def to_prompt_completion(dataset: Dataset) -> Dataset:
    """The ``text`` column split at the template's marker into TRL's ``prompt`` / ``completion`` columns (only)."""
    _require_marker(dataset["text"], "dataset")

    def split(example: dict[str, Any]) -> dict[str, str]:
        prompt, completion = split_sample(example["text"])
        return {"prompt": prompt, "completion": completion}

    with library_progress_bars_off():  # datasets' 'Map' bar, for a split that takes a blink
        return dataset.map(split, remove_columns=dataset.column_names)


def sft_splits(cfg: TrainingConfig, dataset: DatasetDict) -> tuple[Dataset, Dataset]:
    """The train and eval splits as SFTTrainer gets them: prompt-completion pairs, or the text alone."""
    if cfg.completion_only_loss:
        return to_prompt_completion(dataset["train"]), to_prompt_completion(dataset["test"])
    return dataset["train"].select_columns(["text"]), dataset["test"].select_columns(["text"])


def check_training_inputs(recipe: Recipe, dataset: DatasetDict, tokenizer: Any, device: str) -> None:
    """Every check that must pass before training starts; a `TrainingError` that names the fix otherwise."""
    cfg = recipe.training
    for split, name in (("train", "training"), ("test", "held-out test")):
        if not (rows := dataset.get(split)):  # None or empty
            raise TrainingError(
                f"the {name} set is empty. Fix: check data.num_train_samples, data.test_size, data.min_toxicity and "
                "data.max_chars in the recipe (and that the rephrase step wrote its records)."
            )
        _require_text(rows, f"the {name} set")
        if cfg.completion_only_loss:
            _require_marker(rows["text"], split)
    max_length = cfg.sft.get("max_length", 1024)
    template_tokens = len(tokenizer(generation_prompt(""))["input_ids"])
    if max_length is not None and max_length <= template_tokens:
        raise TrainingError(
            f"training.sft.max_length={max_length} is not longer than the prompt template alone ({template_tokens} "
            "tokens): no continuation token would be trained. Fix: raise it (the recipes use 64 offline, 256 on hub)."
        )
    if max_length is not None and cfg.completion_only_loss:
        prompts = [split_sample(t)[0] for t in dataset["train"]["text"]]
        too_long = sum(len(ids) >= max_length for ids in tokenizer(prompts)["input_ids"])
        if too_long == len(prompts):
            raise TrainingError(
                f"every training prompt is at least training.sft.max_length={max_length} tokens: no continuation "
                "would be left to train on. Fix: raise max_length."
            )
        if too_long:
            logger.warning("%d of %d training prompts fill max_length=%d.", too_long, len(prompts), max_length)
    if cfg.load_in_4bit:
        try:  # a 4-bit NF4 round trip on the device
            import bitsandbytes.functional as bnbf
            import torch

            weight = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)
            packed, state = bnbf.quantize_4bit(weight, quant_type="nf4")
            if not torch.allclose(bnbf.dequantize_4bit(packed, state).float(), weight, atol=0.2):
                raise RuntimeError("4-bit round trip is wrong")
        except Exception as exc:  # any failure means the 4-bit path cannot run here
            raise TrainingError(
                f"training.load_in_4bit: true, but bitsandbytes cannot run on {device}: {type(exc).__name__}: {exc}. "
                "Fix: set training.load_in_4bit: false (plain LoRA), or install a bitsandbytes build for this device."
            ) from exc


def is_main_process() -> bool:
    """Whether this process writes the run's files: always in one process; rank 0 under torchrun (``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_arm(*arms: str) -> None:
    if unknown := [arm for arm in arms if arm not in ARMS]:
        raise TrainingError(f"unknown arm {', '.join(unknown)}. Fix: use one of {', '.join(ARMS)}.")


def _base_revision(cfg: TrainingConfig) -> dict[str, str]:
    return revision_kwargs(cfg.base_model, cfg.base_model_revision, "training.base_model_revision")


def _meta_model(model_path: str, **hub_kwargs: Any) -> Any:
    """The model's module tree on the meta device: its layer names without loading any weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path, **hub_kwargs))


def base_tokenizer(cfg: TrainingConfig) -> Any:
    """The base model's tokenizer (at ``training.base_model_revision``), with a pad token (OPT has one; not all do)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_ref(cfg.base_model), **_base_revision(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# what a finished arm's directory holds besides metrics.json, which is written last (the completion marker)
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "log_history.json")


def finished_arm(adapter_dir: str | os.PathLike[str], overwrite: bool = False) -> TrainResult | None:
    """The arm's result if it finished before (not retrained), else `None`; ``overwrite`` empties its directory."""
    out = Path(adapter_dir)
    if overwrite and is_main_process():
        shutil.rmtree(out, ignore_errors=True)
    marker = out / "metrics.json"
    if overwrite or not marker.exists():
        return None
    metrics = read_json_or_none(marker)
    missing = [name for name in _ADAPTER_FILES if not (out / name).is_file()]
    if isinstance(metrics, dict) and not missing:
        print(f"[train {out.name}] already trained ({marker}); skipping. Pass overwrite=True (--overwrite) to retrain.")
        if is_main_process():  # a run killed while it removed its checkpoints leaves some
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return TrainResult(out, metrics, skipped=True)
    problem = f"has no {', '.join(missing)} beside it" if isinstance(metrics, dict) else "is unreadable (truncated?)"
    warnings.warn(f"{marker} {problem}: the arm is not finished; training it again.", UserWarning, stacklevel=2)
    if is_main_process():
        marker.unlink(missing_ok=True)
    return None


def train_stats(device: str) -> Any:
    """A ``TrainerCallback`` measuring this session's wall time, steps and tokens, and peak memory from its creation."""
    import torch
    from transformers import TrainerCallback

    class TrainStats(TrainerCallback):
        def __init__(self) -> None:
            self.device = device
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                self.kind = "cuda_max_memory_allocated"
            else:
                try:  # resets VmHWM, so that the second arm does not inherit the first's peak
                    Path("/proc/self/clear_refs").write_text("5")
                    self.kind = "cpu_peak_rss"
                except OSError:
                    self.kind = "cpu_peak_rss_process_lifetime"

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen
            self.started = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.end_step, self.wall = state.global_step, time.perf_counter() - self.started
            if self.device == "cuda":
                self.peak_bytes = int(torch.cuda.max_memory_allocated())
                return
            status = Path("/proc/self/status").read_text() if self.kind == "cpu_peak_rss" else ""
            hwm = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
            # VmHWM and ru_maxrss are in KiB on Linux
            self.peak_bytes = int(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    return TrainStats()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Around ``SFTTrainer(...)``: no model-loading or dataset-mapping bars, no PEFT deprecation warning."""
    with library_progress_bars_off(), ignore_warnings(PEFT_READS_IS_GRADIENT_CHECKPOINTING):
        yield


def prepare_trainer(trainer: Any, device: str) -> None:
    """The CPU fix-ups between ``SFTTrainer(...)`` and ``trainer.train``; prints the path the arm takes."""
    import torch

    args, model = trainer.args, trainer.model
    if device == "cpu":
        keep_bnb_4bit_trainable_on_cpu(model)
    if not (args.bf16 or args.fp16):  # TRL casts the adapters to bf16: in fp32 that only loses update precision
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    if is_main_process():
        lora = next(iter(model.peft_config.values()))
        targets = lora.target_modules
        targets = targets if isinstance(targets, str) else ", ".join(sorted(targets))
        quantised = "4-bit NF4 base, " if getattr(model, "is_loaded_in_4bit", False) else ""
        print(
            f"[train {Path(args.output_dir).parent.name}] on {device}: {quantised}LoRA r={lora.r} on {targets}; "
            f"{len(trainer.train_dataset)} train / {len(trainer.eval_dataset)} eval samples",
            flush=True,
        )


def last_complete_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """The newest checkpoint with its ``trainer_state.json`` (written last), or `None`; newer, cut-short ones are
    removed (transformers' ``get_last_checkpoint`` returns those, and resuming from one crashes)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    ckpt_dir = Path(checkpoint_dir)
    steps = {p.name.rpartition("-")[2]: p for p in ckpt_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()}
    for path in [steps[step] for step in sorted(filter(str.isdigit, steps), key=int, reverse=True)]:
        if isinstance(read_json_or_none(path / "trainer_state.json"), dict):
            if is_main_process():
                print(f"[train {ckpt_dir.parent.name}] resuming from {path.name}", flush=True)
            return str(path)
        warnings.warn(f"{path} is incomplete (interrupted while saving); removing it.", UserWarning, stacklevel=2)
        if is_main_process():
            shutil.rmtree(path, ignore_errors=True)
    return None


def save_arm(
    trainer: Any, adapter_dir: str | os.PathLike[str], recipe: Recipe, dataset: DatasetDict, stats: Any
) -> TrainResult:
    """Write the adapter, tokenizer, ``log_history.json`` and ``metrics.json`` last (rank 0); remove the checkpoints."""
    out = Path(adapter_dir)
    # the Trainer saves the last step's checkpoint before its closing epoch evaluation: a run killed between the two
    # resumes at the end and skips that evaluation, so its final eval loss is run here (on every rank)
    state, epochs = trainer.state, trainer.args.eval_strategy == "epoch" and trainer.eval_dataset is not None
    if epochs and not any("eval_loss" in e and e.get("step") == state.global_step for e in state.log_history):
        trainer.evaluate()
    trainer.save_model(str(out))  # every rank calls it: the Trainer itself saves on the main process only
    metrics = _metrics(trainer, recipe, out.name, dataset, stats)
    main = trainer.is_world_process_zero()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        trainer.processing_class.save_pretrained(str(out))
        atomic_write_json(out / "log_history.json", trainer.state.log_history, indent=1)
        atomic_write_json(out / "metrics.json", metrics, indent=1, default=str)  # the completion marker: last
    trainer.accelerator.wait_for_everyone()  # no rank leaves before the arm is written, nor reads checkpoints
    if main:
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # the adapter is saved: checkpoints served resuming
        eval_loss = metrics["final_eval_loss"]
        print(
            f"[train {out.name}] done in {stats.wall:.1f} s: train loss {metrics['train_loss']:.4f}, eval loss "
            f"{eval_loss if eval_loss is None else round(eval_loss, 4)}, "
            f"peak memory {stats.peak_bytes / 2**20:.0f} MiB -> {out}",
            flush=True,
        )
    return TrainResult(out, metrics)


def _metrics(trainer: Any, recipe: Recipe, arm: str, dataset: DatasetDict, stats: Any) -> dict[str, Any]:
    cfg, args, state = recipe.training, trainer.args, trainer.state
    log_history, end = state.log_history, state.global_step
    trainable, total = trainer.model.get_nb_trainable_parameters()  # PEFT counts a packed 4-bit weight twice
    # the Trainer's own summary of this session: its last log entry (TrainOutput.metrics)
    session = next((e for e in reversed(log_history) if "train_runtime" in e), {})
    runtime = session.get("train_runtime")
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    quant = "QLoRA" if cfg.load_in_4bit else "LoRA" if stats.device == "cuda" else "LoRA fp32"
    return {
        "arm": arm,
        "path": f"{'CUDA' if stats.device == 'cuda' else 'CPU'} {quant}",
        "device": stats.device,
        "base_model": cfg.base_model,
        "base_model_revision": cfg.base_model_revision,
        "load_in_4bit": cfg.load_in_4bit,
        "seed": recipe.seed,
        "num_train_samples": len(dataset["train"]),
        "num_eval_samples": len(dataset["test"]),
        "world_size": args.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "global_batch_size": per_step,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "resumed_from": f"checkpoint-{stats.start_step}" if stats.start_step else None,
        "train_loss": _whole_run_train_loss(session.get("train_loss"), log_history, stats.start_step, end),
        "final_eval_loss": next((e["eval_loss"] for e in reversed(log_history) if "eval_loss" in e), None),
        "loss_curve": _loss_curve(log_history),
        "wall_time_s": stats.wall,
        "train_runtime_s": runtime,
        # this session only (a resumed run counts the steps it ran itself)
        "samples_per_s": (stats.end_step - stats.start_step) * per_step / runtime if runtime else None,
        "tokens_per_s": (state.num_input_tokens_seen - stats.start_tokens) / runtime if runtime else None,
        "num_input_tokens_seen": state.num_input_tokens_seen,
        "peak_memory_bytes": stats.peak_bytes,
        "peak_memory_kind": stats.kind,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "training": dataclasses.asdict(cfg),
    }


def _whole_run_train_loss(
    session_loss: float | None, log_history: list[dict[str, Any]], start_step: int, end_step: int
) -> float | None:
    """The whole run's mean training loss: the session's and the losses logged before it, weighted by steps."""
    if session_loss is None or not start_step:
        return session_loss
    total, steps, last = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and last < entry["step"] <= start_step:
            total += entry["loss"] * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    session_steps = end_step - start_step
    if steps + session_steps == 0:
        return session_loss
    return (total + session_loss * session_steps) / (steps + session_steps)


def _loss_curve(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    return {
        curve: [{"step": e["step"], "epoch": e.get("epoch"), "loss": e[key]} for e in log_history if key in e]
        for curve, key in (("train", "loss"), ("eval", "eval_loss"))
    }


def train_arm(
    recipe: Recipe, arm: str, dataset: DatasetDict, overwrite: bool = False, callbacks: list[Any] | None = None
) -> TrainResult:
    """Train one arm into ``recipe.paths.adapter(arm)`` with notebook 1's calls (a finished one: ``overwrite``)."""
    from trl import SFTTrainer

    _check_arm(arm)
    cfg = recipe.training
    adapter_dir = recipe.paths.adapter(arm)
    if (done := finished_arm(adapter_dir, overwrite)) is not None:
        return done
    device = resolve_device(cfg.device, "training.device")
    model_path, tokenizer = resolve_ref(cfg.base_model), base_tokenizer(cfg)
    check_training_inputs(recipe, dataset, tokenizer, device)
    quant = get_quantization_config(cfg, device)
    lora = get_peft_config(cfg, _meta_model(model_path, **_base_revision(cfg)))
    args = get_sft_config(cfg, adapter_dir / "checkpoints", recipe.seed, device)
    train_ds, eval_ds = sft_splits(cfg, dataset)
    stats = train_stats(device)
    with quiet():
        trainer = SFTTrainer(
            model=model_path,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            quantization_config=quant,
            peft_config=lora,
            callbacks=[stats, *(callbacks or [])],
        )
    prepare_trainer(trainer, device)
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
    return save_arm(trainer, adapter_dir, recipe, dataset, stats)


def train_arms(recipe: Recipe, datasets: Mapping[str, DatasetDict], overwrite: bool = False) -> dict[str, TrainResult]:
    """Train the given arms, ``raw`` first, with the same recipe and seed (:func:`train_arm` each)."""
    _check_arm(*datasets)
    return {arm: train_arm(recipe, arm, datasets[arm], overwrite=overwrite) for arm in ARMS if arm in datasets}


def load_arm_datasets(recipe: Recipe, arms: Iterable[str] = ARMS) -> dict[str, DatasetDict]:
    """The arms' data: the raw samples, and the rephrase step's output; both with the raw held-out split."""
    from datasets import DatasetDict, load_dataset

    arms = list(arms)
    _check_arm(*arms)
    detox_path = recipe.paths.train_set("detox")
    if "detox" in arms and not detox_path.is_file():
        raise TrainingError(
            f"No detoxified training set at {detox_path} — run `detox-sft rephrase` (or notebook 1's rephrase) first."
        )
    raw = load_train_dataset(recipe.data, recipe.seed)
    out = {"raw": raw} if "raw" in arms else {}
    if "detox" in arms:
        with library_progress_bars_off():  # datasets' 'Generating train split' bar
            train = load_dataset("json", data_files=str(detox_path), split="train")
        _require_text(train, str(detox_path))
        keep = [c for c in ("prompt", "continuation", "toxicity", "text") if c in train.column_names]
        if (n_detox := len(train)) != (n_raw := len(raw["train"])):
            logger.warning("detox set has %d samples, raw %d: not the same sample order.", n_detox, n_raw)
        out["detox"] = DatasetDict(train=train.select_columns(keep), test=raw["test"])
    return out


def plot_loss_curves(run_dir: str | os.PathLike[str]) -> Figure:
    """Both arms' train and eval loss on one plot, saved to ``<run_dir>/figures/loss_curves.png``."""
    from matplotlib.figure import Figure

    paths = RunPaths(Path(run_dir))
    logs = {arm: paths.adapter(arm) / "log_history.json" for arm in ARMS}
    if not (logs := {arm: json.loads(p.read_text()) for arm, p in logs.items() if p.is_file()}):
        raise TrainingError(
            f"No training log in {paths.adapters} — run notebooks/1-sft.ipynb first (or `detox-sft train`)."
        )
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colors = {"raw": "tab:red", "detox": "tab:green"}
    for arm, history in logs.items():
        for curve, points in _loss_curve(history).items():
            line, marker = ("-", ".") if curve == "train" else ("--", "o")
            steps, losses = [p["step"] for p in points], [p["loss"] for p in points]
            if points:
                ax.plot(steps, losses, color=colors[arm], linestyle=line, marker=marker, label=f"{arm} {curve}")
    ax.set(xlabel="step", ylabel="cross-entropy loss", title="SFT loss, raw vs detoxified data (same recipe)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.figures.mkdir(parents=True, exist_ok=True)
    fig.savefig(paths.figures / "loss_curves.png", dpi=120)
    return fig


def load_adapter_model(run_dir: str | os.PathLike[str], arm: str, device: str = "auto") -> tuple[Any, Any]:
    """The full-precision base model with the arm's adapter, in eval mode, and its tokenizer (left padding)."""
    _check_arm(arm)
    paths = RunPaths(Path(run_dir))
    out = paths.adapter(arm)
    if not paths.adapter_config(arm).is_file():
        raise TrainingError(f"No adapter in {out} — run notebooks/1-sft.ipynb first (or `detox-sft train`).")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device, "device")
    metrics = read_json_or_none(out / "metrics.json") or {}
    ref = metrics.get("base_model")
    # resolve the recorded ref again (a rebuilt zoo moves its paths), at the commit the arm was trained on
    base = resolve_ref(ref) if ref else json.loads(paths.adapter_config(arm).read_text())["base_model_name_or_path"]
    pinned = revision_kwargs(ref, metrics.get("base_model_revision"), "training.base_model_revision") if ref else {}
    with library_progress_bars_off(), ignore_warnings(PEFT_READS_IS_GRADIENT_CHECKPOINTING):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype(device), **pinned).to(device)
        model = PeftModel.from_pretrained(model, str(out)).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
