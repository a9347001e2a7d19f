"""QLoRA supervised fine-tuning of the base model: two arms (``raw``, ``detox``), one recipe.

Notebook 1 spells the steps out in its cells; ``detox-sft train`` (:func:`train_arms`) makes the same calls::

    quant = get_quantization_config(cfg.training, device)  # BitsAndBytesConfig, or None without 4-bit
    lora = get_peft_config(cfg.training, skeleton)  # LoraConfig, targets checked against the model
    args = get_sft_config(cfg.training, adapter_dir / "checkpoints", cfg.seed, device)  # SFTConfig
    stats = train_stats(device)  # wall time, peak memory, this session's steps and tokens
    with quiet():
        trainer = SFTTrainer(model=..., args=args, ..., quantization_config=quant, peft_config=lora, callbacks=[stats])
    prepare_trainer(trainer, device)  # CPU fix-ups
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
    save_arm(trainer, adapter_dir, cfg, dataset, stats)  # adapter, tokenizer, log, metrics.json last

The pure mappers are unit-tested without a GPU, and the tests hold them equal to the notebook's configs. 4-bit NF4
(bitsandbytes) trains on CUDA and on CPU. Under torchrun every rank trains and rank 0 alone writes.

Loss on the continuation only uses TRL's prompt-completion format: ``prompt`` = :func:`detox_sft.prompts.generation_prompt`
and ``completion = " {continuation}"``. The space goes with the completion because byte-level BPE merges it into
the next word; a prompt ending in a space would not be a token prefix of the full text (TRL then warns and trains on
a context the model never sees at inference). ``prompt + completion`` is exactly the ``text`` column.
"""

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
from dataclasses import dataclass, field
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

__all__ = [
    "ARMS",
    "OPT_TARGET_MODULES",
    "LORA_TARGET_MODULES",
    "default_target_modules",
    "TrainingError",
    "TrainResult",
    "training_path",
    "check_bitsandbytes",
    "get_quantization_config",
    "linear_module_names",
    "lora_targets",
    "get_peft_config",
    "precision_kwargs",
    "get_sft_config",
    "to_prompt_completion",
    "sft_splits",
    "check_training_inputs",
    "base_tokenizer",
    "finished_arm",
    "train_stats",
    "quiet",
    "prepare_trainer",
    "last_complete_checkpoint",
    "save_arm",
    "train_arm",
    "train_arms",
    "is_main_process",
    "load_detox_dataset",
    "load_arm_datasets",
    "plot_loss_curves",
    "load_adapter_model",
]

logger = logging.getLogger(__name__)

# OPT's linear layers per decoder block; the attention output is `out_proj` (the 2024 original's `o_proj` is LLaMA's).
OPT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# LoRA targets by model type (``config.model_type``) where training.lora.target_modules is absent or null: every linear
# layer of the decoder blocks. GPT-2's are Conv1D layers (c_attn holds q, k and v; c_proj is in attention and MLP).
# Any other model type gets PEFT's "all-linear" (every linear layer but the output head).
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "opt": OPT_TARGET_MODULES,
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


class TrainingError(ValueError):
    """Training cannot start (bad input or configuration); the message says what to do."""


@dataclass
class TrainResult:
    """The outcome of training one arm.

    Attributes:
        arm (`str`): ``raw`` or ``detox``.
        adapter_dir (`Path`): where the adapter, tokenizer, ``log_history.json`` and ``metrics.json`` are.
        metrics (`dict`): the content of ``metrics.json``.
        skipped (`bool`): the arm was already trained (``metrics.json`` existed) and was not retrained.
    """

    arm: str
    adapter_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


# --------------------------------------------------------------------------------------------------------------------
# Pure mappers
# --------------------------------------------------------------------------------------------------------------------


def training_path(cfg: TrainingConfig, device: str) -> str:
    """The path a run takes, in words: ``CUDA QLoRA``, ``CUDA LoRA``, ``CPU QLoRA`` or ``CPU LoRA fp32``."""
    if device == "cuda":
        return "CUDA QLoRA" if cfg.load_in_4bit else "CUDA LoRA"
    return "CPU QLoRA" if cfg.load_in_4bit else "CPU LoRA fp32"


def get_quantization_config(cfg: TrainingConfig, device: str) -> BitsAndBytesConfig | None:
    """The bitsandbytes 4-bit NF4 config (double quantisation) for QLoRA, or `None` when 4-bit is off.

    Args:
        cfg: the recipe's training section.
        device: ``cuda`` (bf16 compute, fp16 on pre-Ampere GPUs) or ``cpu`` (fp32 compute).
    """
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
    """Leaf names of the model's linear layers (LoRA targets), sorted, without ``lm_head``.

    Args:
        model_or_module_names: a ``torch.nn.Module`` (a meta-device skeleton is enough) or an iterable of module
            names (dotted names are reduced to their last part).
    """
    import torch

    if isinstance(model_or_module_names, torch.nn.Module):
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers; PEFT's LoRA takes them too

        # bitsandbytes' Linear4bit subclasses nn.Linear, so quantised models count too.
        linear = (torch.nn.Linear, Conv1D)
        names = [n for n, m in model_or_module_names.named_modules() if isinstance(m, linear)]
    else:
        names = list(model_or_module_names)
    # TRL computes log-probs from lm_head.weight directly: an adapter there would never train.
    return sorted({n.rsplit(".", 1)[-1] for n in names if n} - {"lm_head"})


def default_target_modules(model_type: str | None) -> list[str] | str:
    """The LoRA targets of a model type: its :data:`LORA_TARGET_MODULES` entry, else PEFT's ``"all-linear"``."""
    targets = LORA_TARGET_MODULES.get(model_type or "")
    return list(targets) if targets else "all-linear"


def lora_targets(cfg: TrainingConfig, model_or_module_names: Any, model_type: str | None = None) -> list[str] | str:
    """``training.lora.target_modules`` checked against the model; absent or null: the model type's default.

    Args:
        cfg: the recipe's training section.
        model_or_module_names: the model (a meta-device skeleton is enough) or its module names.
        model_type: the model's ``config.model_type``; `None` reads it from the model (module names alone have
            none: the default is then ``all-linear``).

    Raises:
        TrainingError: a target module does not exist in the model (the message lists the real ones).
    """
    if model_type is None:
        model_type = getattr(getattr(model_or_module_names, "config", None), "model_type", None)
    targets = cfg.lora.get("target_modules")
    if targets is None:
        targets = default_target_modules(model_type)
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    if isinstance(targets, str):
        return targets
    targets, real = list(targets), linear_module_names(model_or_module_names)
    unknown = [t for t in targets if t not in real]
    if unknown:
        default = default_target_modules(model_type)
        kind = f" ({model_type})" if model_type else ""
        raise TrainingError(
            f"training.lora.target_modules: {', '.join(unknown)} not in the model{kind}; its linear layers are "
            f"{', '.join(real)}. Fix: use those names (OPT's attention output is out_proj, not o_proj), or set "
            "training.lora.target_modules to null for the model type's default"
            + (f" ({', '.join(default) if isinstance(default, list) else default})." if model_type else ".")
        )
    if not targets:
        raise TrainingError(f"training.lora.target_modules is empty. Fix: name some of {', '.join(real)}.")
    return targets


def get_peft_config(cfg: TrainingConfig, model_or_module_names: Any, model_type: str | None = None) -> LoraConfig:
    """The LoRA config: ``training.lora`` with :func:`lora_targets`, for a causal LM.

    Raises:
        TrainingError: a target module does not exist in the model, or a ``training.lora`` key is not a LoraConfig
            field.
    """
    from peft import LoraConfig

    targets = lora_targets(cfg, model_or_module_names, model_type)
    try:
        return LoraConfig(**{**cfg.lora, "target_modules": targets}, task_type="CAUSAL_LM")
    except TypeError as exc:
        raise TrainingError(f"training.lora: {exc}. Fix: use peft.LoraConfig keyword arguments.") from exc


def precision_kwargs(cfg: TrainingConfig, device: str) -> dict[str, Any]:
    """The SFTConfig fields that follow the device: mixed precision and how SFTTrainer loads the base model.

    bf16 (fp16 on pre-Ampere GPUs) on CUDA; on CPU ``use_cpu=True`` and fp32 (SFTConfig turns bf16 on by default), the
    base model placed on the CPU explicitly (TRL's default ``device_map`` is None there, and a 4-bit model must sit on
    a device). ``model_init_kwargs`` also pins ``training.base_model_revision`` for a hub base model. Kept apart from
    :func:`get_sft_config` because SFTConfig refuses bf16 on a machine without a GPU: the CUDA mapping can only be
    unit-tested as plain data.
    """
    if device == "cuda":
        import torch

        gpu_bf16 = gpu_dtype() == torch.bfloat16
        kwargs: dict[str, Any] = {"use_cpu": False, "bf16": gpu_bf16, "fp16": not gpu_bf16}
        init = {"dtype": "bfloat16" if gpu_bf16 else "float16"}
    else:
        kwargs, init = {"use_cpu": True, "bf16": False, "fp16": False}, {"dtype": "float32", "device_map": {"": "cpu"}}
    kwargs["model_init_kwargs"] = {**init, **_base_revision(cfg)}  # SFTTrainer loads the base from its path with these
    return kwargs


def get_sft_config(cfg: TrainingConfig, output_dir: str | os.PathLike[str], seed: int, device: str) -> SFTConfig:
    """The :class:`trl.SFTConfig`: ``training.sft`` plus what the experiment fixes.

    Fixed: ``output_dir`` (the arm's checkpoints), ``seed`` and ``data_seed`` (identical sample order in both arms),
    ``completion_only_loss`` from the recipe, and :func:`precision_kwargs`. The rest (learning rate, batch size,
    checkpoints, evaluation each epoch, ...) is the recipe's ``training.sft``.

    Raises:
        TrainingError: a ``training.sft`` key is not an SFTConfig field, or is one of the fixed ones.
    """
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
            f"training.sft: {exc}. Fix: use trl.SFTConfig field names (max_length, not max_seq_length; "
            "eval_strategy, not evaluation_strategy), and leave output_dir, seed, data_seed, completion_only_loss, "
            "precision and model_init_kwargs to the recipe's other fields."
        ) from exc


# --------------------------------------------------------------------------------------------------------------------
# Data and checks
# --------------------------------------------------------------------------------------------------------------------


def to_prompt_completion(dataset: Dataset) -> Dataset:
    """Split the ``text`` column at the template's marker into TRL's ``prompt`` / ``completion`` columns.

    ``prompt + completion == text``; the other columns are dropped.

    Raises:
        TrainingError: the text column is missing, or some texts lack :data:`~detox_sft.prompts.RESPONSE_MARKER`.
    """
    _require_text(dataset, "dataset")
    texts = dataset["text"]
    missing = [i for i, t in enumerate(texts) if RESPONSE_MARKER not in t]
    if missing:
        raise TrainingError(
            f"{len(missing)} of {len(texts)} texts lack the marker {RESPONSE_MARKER!r} (first: row {missing[0]}: "
            f"{texts[missing[0]][:80]!r}). Fix: write texts with detox_sft.data.format_sample, or set "
            "training.completion_only_loss: false to train on the whole text."
        )

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


def _require_text(dataset: Any, name: str) -> None:
    columns = list(getattr(dataset, "column_names", []) or [])
    if "text" not in columns:
        raise TrainingError(
            f"{name} has no 'text' column (columns: {', '.join(columns) or 'none'}). Fix: build it with "
            "detox_sft.data.load_train_dataset (text = detox_sft.prompts.format_sample(prompt, continuation))."
        )


def _prompt_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    prompts = [(split_sample(t) or (t, ""))[0] for t in texts]
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]]


def check_bitsandbytes(device: str) -> None:
    """Probe that bitsandbytes can quantise to 4-bit NF4 on ``device`` (a tiny real round trip).

    Raises:
        TrainingError: bitsandbytes is missing or has no working 4-bit backend for the device; the fix is to set
            ``training.load_in_4bit: false``.
    """
    try:
        import bitsandbytes.functional as bnbf
        import torch

        weight = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4")
        restored = bnbf.dequantize_4bit(packed, state)
        if not torch.allclose(restored.float(), weight, atol=0.2):
            raise RuntimeError("4-bit round trip is wrong")
    except Exception as exc:  # any failure means the 4-bit path cannot run here
        raise TrainingError(
            f"4-bit quantisation was asked for (training.load_in_4bit: true) but bitsandbytes cannot run on "
            f"{device}: {type(exc).__name__}: {exc}. Fix: set training.load_in_4bit: false in the recipe (plain LoRA), "
            "or install a bitsandbytes build that supports this device."
        ) from exc


def check_training_inputs(recipe: Recipe, dataset: DatasetDict, tokenizer: Any, device: str) -> None:
    """Every check that must pass before training starts.

    Raises:
        TrainingError: empty training set, missing ``text`` column, no test split, ``max_length`` shorter than the
            prompt template, texts without the marker (completion-only loss), or 4-bit where bitsandbytes cannot run.
    """
    cfg = recipe.training
    if "train" not in dataset:
        raise TrainingError(
            f"the dataset has no 'train' split (splits: {', '.join(dataset)}). "
            "Fix: pass a DatasetDict(train=..., test=...) from detox_sft.data.load_train_dataset."
        )
    train = dataset["train"]
    if len(train) == 0:
        raise TrainingError(
            "the training set is empty. Fix: check data.train_dataset, data.min_toxicity and "
            "data.max_chars in the recipe (and that the rephrase step wrote its records)."
        )
    _require_text(train, "the training set")
    test = dataset.get("test")
    if test is None or len(test) == 0:
        raise TrainingError(
            "no held-out 'test' split (needed for the eval loss each epoch). "
            "Fix: set data.test_size to a fraction such as 0.1."
        )
    _require_text(test, "the test set")
    max_length = cfg.sft.get("max_length", 1024)
    if max_length is not None:
        template_tokens = len(tokenizer(generation_prompt(""))["input_ids"])
        if max_length <= template_tokens:
            raise TrainingError(
                f"training.sft.max_length={max_length} is not longer than the prompt template alone "
                f"({template_tokens} tokens for {generation_prompt('')!r}): no continuation token would "
                f"be trained. Fix: raise training.sft.max_length (the recipes use 64 offline, 256 on the hub model)."
            )
        if cfg.completion_only_loss:
            lengths = _prompt_lengths(tokenizer, train["text"])
            too_long = sum(n >= max_length for n in lengths)
            if too_long == len(lengths):
                raise TrainingError(
                    f"every training prompt is at least training.sft.max_length={max_length} tokens (shortest: "
                    f"{min(lengths)}): truncation would leave no continuation to train on. Fix: raise max_length."
                )
            if too_long:
                logger.warning(
                    "%d of %d training prompts fill max_length=%d; TRL drops those samples.",
                    too_long,
                    len(lengths),
                    max_length,
                )
    if cfg.completion_only_loss:
        for split in ("train", "test"):
            texts = dataset[split]["text"]
            missing = sum(RESPONSE_MARKER not in t for t in texts)
            if missing:
                raise TrainingError(
                    f"{missing} of {len(texts)} {split} texts lack the marker {RESPONSE_MARKER!r}, so the continuation "
                    "cannot be found for the completion-only loss. Fix: format texts with detox_sft.data.format_sample "
                    "(check the rephrase output), or set training.completion_only_loss: false."
                )
    if cfg.load_in_4bit:
        check_bitsandbytes(device)


# --------------------------------------------------------------------------------------------------------------------
# Training: the steps around SFTTrainer
# --------------------------------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """Whether this process writes the run's files: always in one process; rank 0 under torchrun (``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_arm(arm: str) -> None:
    if arm not in ARMS:
        raise TrainingError(f"unknown arm {arm!r}. Fix: use one of {', '.join(ARMS)}.")


def _base_revision(cfg: TrainingConfig) -> dict[str, str]:
    """``{"revision": training.base_model_revision}`` for a hub base model, else ``{}``."""
    return revision_kwargs(cfg.base_model, cfg.base_model_revision, "training.base_model_revision")


def _meta_model(model_path: str, **hub_kwargs: Any) -> Any:
    """The model's module tree on the meta device: its layer names without loading any weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, **hub_kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


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
    """The arm's result when it has finished before (it is not retrained), else `None`: train it.

    A ``metrics.json`` that is truncated or unreadable, or whose adapter files are missing, means the arm is not
    finished: it is removed (with a warning). ``overwrite`` empties the arm's directory instead.
    """
    out = Path(adapter_dir)
    if overwrite:
        if out.exists() and is_main_process():
            shutil.rmtree(out)
        return None
    marker = out / "metrics.json"
    if not marker.exists():
        return None
    metrics = read_json_or_none(marker)
    missing = [name for name in _ADAPTER_FILES if not (out / name).is_file()]
    if isinstance(metrics, dict) and not missing:
        print(f"[train {out.name}] already trained ({marker}); skipping. Pass overwrite=True (--overwrite) to retrain.")
        if is_main_process():  # a run killed while it removed its checkpoints leaves some
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return TrainResult(arm=out.name, adapter_dir=out, metrics=metrics, skipped=True)
    problem = (
        "is unreadable (truncated?)" if not isinstance(metrics, dict) else f"has no {', '.join(missing)} beside it"
    )
    warnings.warn(f"{marker} {problem}: the arm is not finished; training it again.", UserWarning, stacklevel=2)
    if is_main_process():
        marker.unlink(missing_ok=True)
    return None


def train_stats(device: str) -> Any:
    """A ``TrainerCallback`` that measures one arm's run; create it before ``SFTTrainer`` and pass it in ``callbacks``.

    Peak memory counts from its creation (loading the model included): CUDA max allocated on GPU; on CPU the peak RSS
    of this process (VmHWM, reset by writing 5 to /proc/self/clear_refs so that the second arm does not inherit the
    first's peak; where that is not allowed, the lifetime peak ru_maxrss, marked as such). Wall time, steps and tokens
    are this session's: a resumed run's speed counts only its own work.
    """
    import torch
    from transformers import TrainerCallback

    class TrainStats(TrainerCallback):
        start_step = start_tokens = end_step = 0
        wall = 0.0
        peak_bytes = 0

        def __init__(self) -> None:
            self.device = device
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                self.kind = "cuda_max_memory_allocated"
            else:
                try:
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
            elif self.kind == "cpu_peak_rss":
                self.peak_bytes = _vm_hwm_bytes()
            else:  # ru_maxrss is in KiB on Linux
                self.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

        def samples(self, args: Any) -> int:
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
            return (self.end_step - self.start_step) * per_step

        def tokens(self, state: Any) -> int:
            return state.num_input_tokens_seen - self.start_tokens

    return TrainStats()


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Around ``SFTTrainer(...)``: no 'Loading weights' bar nor the datasets bars of its mapping (tokenizing,
    truncating, adding EOS), no PEFT deprecation warning; the Trainer's own bar over the steps stays."""
    with library_progress_bars_off(), ignore_warnings(PEFT_READS_IS_GRADIENT_CHECKPOINTING):
        yield


def prepare_trainer(trainer: Any, device: str) -> None:
    """The fix-ups between ``SFTTrainer(...)`` and ``trainer.train``; prints the path the arm takes.

    On CPU bitsandbytes' 4-bit layers must keep their trainable layout (see
    :func:`detox_sft.compat.keep_bnb_4bit_trainable_on_cpu`). In an fp32 run TRL's cast of the QLoRA adapter weights
    to bf16 (the paper's recipe for bf16 compute) would only lose precision in the optimizer updates, so they go back
    to fp32 before the optimizer is built.
    """
    import torch

    args, model = trainer.args, trainer.model
    if device == "cpu":
        keep_bnb_4bit_trainable_on_cpu(model)
    if not (args.bf16 or args.fp16):
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    if is_main_process():
        lora = next(iter(model.peft_config.values()))
        targets = (
            lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(sorted(lora.target_modules))
        )
        quantised = getattr(model, "is_loaded_in_4bit", False)
        print(
            f"[train {Path(args.output_dir).parent.name}] on {device}: {'4-bit NF4 base, ' if quantised else ''}LoRA "
            f"r={lora.r} on {targets}; {len(trainer.train_dataset)} train / {len(trainer.eval_dataset)} eval samples",
            flush=True,
        )


def last_complete_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """The newest checkpoint the Trainer finished writing, or `None`; incomplete newer ones are removed.

    The Trainer writes a checkpoint's files in place and ``trainer_state.json`` last, so a checkpoint whose state file
    is missing or unreadable was cut short (a kill while saving); resuming from it would crash. (transformers'
    ``get_last_checkpoint`` returns it anyway.)
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    ckpt_dir = Path(checkpoint_dir)
    steps = {}
    for path in ckpt_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if ckpt_dir.is_dir() else ():
        step = path.name.rpartition("-")[2]
        if path.is_dir() and step.isdigit():
            steps[int(step)] = path
    for step in sorted(steps, reverse=True):
        path = steps[step]
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
    """Write the trained arm: adapter, tokenizer, ``log_history.json``, then ``metrics.json`` (the completion marker);
    remove the checkpoints.

    Under torchrun every rank calls it and gets the metrics; rank 0 alone writes (the Trainer saves the model on its
    main process only) and the other ranks wait until the files are there.

    Args:
        trainer: the trained ``SFTTrainer``.
        adapter_dir: ``<run_dir>/adapters/<arm>``.
        recipe: the run configuration (its ``training`` section and ``seed`` go into the metrics).
        dataset: the arm's ``DatasetDict(train, test)`` as given (TRL may drop samples while preparing it).
        stats: the :func:`train_stats` callback the trainer ran with.
    """
    out = Path(adapter_dir)
    trainer.save_model(str(out))  # every rank calls it: the Trainer itself saves on the main process only
    log_history = trainer.state.log_history
    metrics = _metrics(trainer, recipe, out.name, dataset, stats)
    main = trainer.is_world_process_zero()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        trainer.processing_class.save_pretrained(str(out))
        atomic_write_json(out / "log_history.json", log_history, indent=1)
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
    return TrainResult(arm=out.name, adapter_dir=out, metrics=metrics)


def _metrics(trainer: Any, recipe: Recipe, arm: str, dataset: DatasetDict, stats: Any) -> dict[str, Any]:
    """What ``metrics.json`` holds: the run's settings, losses, speed, memory and parameter counts."""
    cfg, args, state = recipe.training, trainer.args, trainer.state
    log_history = state.log_history
    trainable, total = _count_parameters(trainer.model)
    # the Trainer's own summary of this session: its last log entry (TrainOutput.metrics)
    session = next((e for e in reversed(log_history) if "train_runtime" in e), {})
    runtime = session.get("train_runtime")
    return {
        "arm": arm,
        "path": training_path(cfg, stats.device),
        "device": stats.device,
        "base_model": cfg.base_model,
        "base_model_revision": cfg.base_model_revision,
        "base_model_path": resolve_ref(cfg.base_model),
        "load_in_4bit": cfg.load_in_4bit,
        "completion_only_loss": cfg.completion_only_loss,
        "seed": recipe.seed,
        "num_train_samples": len(dataset["train"]),
        "num_eval_samples": len(dataset["test"]),
        # under torchrun each of world_size processes takes per_device_train_batch_size samples per micro-step
        "world_size": args.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "resumed_from": f"checkpoint-{stats.start_step}" if stats.start_step else None,
        "train_loss": _whole_run_train_loss(
            session.get("train_loss"), log_history, stats.start_step, state.global_step
        ),
        "final_eval_loss": next((e["eval_loss"] for e in reversed(log_history) if "eval_loss" in e), None),
        "loss_curve": _loss_curve(log_history),
        "wall_time_s": stats.wall,
        "train_runtime_s": runtime,
        # this session only (a resumed run counts the steps it ran itself)
        "samples_per_s": stats.samples(args) / runtime if runtime else None,
        "tokens_per_s": stats.tokens(state) / runtime if runtime else None,
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
    """The mean training loss over all the run's steps, for a resumed run too.

    The Trainer reports the mean over the steps this session ran, which for a resumed run leaves out the steps before
    its checkpoint (the early, high losses). Those are in the log history: each logged ``loss`` is the mean over the
    steps since the previous log (rounded to 4 digits), so they are added back, weighted by their number of steps.
    Steps between the last log and the checkpoint (a checkpoint off the logging grid) have no recorded loss and are
    left out.
    """
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
    train = [{"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"]} for e in log_history if "loss" in e]
    evals = [
        {"step": e["step"], "epoch": e.get("epoch"), "loss": e["eval_loss"]} for e in log_history if "eval_loss" in e
    ]
    return {"train": train, "eval": evals}


def _count_parameters(model: Any) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        # bitsandbytes packs two 4-bit weights per uint8 element
        if getattr(param, "quant_state", None) is not None or param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def train_arm(
    recipe: Recipe,
    arm: str,
    dataset: DatasetDict,
    run_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train one arm with the recipe's training section and write ``<run_dir>/adapters/<arm>/``: the calls of notebook 1.

    Checkpoints go to ``<arm>/checkpoints/`` while training; an interrupted run resumes from the last complete one. A
    finished arm is not retrained unless ``overwrite``.

    Args:
        recipe: the run configuration (``training`` section and ``seed`` are used).
        arm: ``raw`` or ``detox``.
        dataset: ``DatasetDict(train, test)`` with a ``text`` column (see :mod:`detox_sft.data`).
        run_dir: where outputs go; defaults to ``recipe.run_path``.
        overwrite: retrain even if the arm has finished before (its directory is emptied first).
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Raises:
        TrainingError: bad input or configuration, raised before any training starts.
    """
    from trl import SFTTrainer

    _check_arm(arm)
    cfg = recipe.training
    adapter_dir = RunPaths(Path(run_dir)).adapter(arm) if run_dir is not None else recipe.paths.adapter(arm)
    done = finished_arm(adapter_dir, overwrite)
    if done is not None:
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


def train_arms(
    recipe: Recipe,
    datasets: Mapping[str, DatasetDict],
    run_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, TrainResult]:
    """Train several arms (``raw`` first, then ``detox``) with the same recipe and seed (:func:`train_arm` each).

    Args:
        recipe: the run configuration.
        datasets: arm name -> ``DatasetDict(train, test)``.
        run_dir: where outputs go; defaults to ``recipe.run_path``.
        overwrite: retrain arms that have finished before.

    Returns:
        arm name -> :class:`TrainResult`.
    """
    for arm in datasets:
        _check_arm(arm)
    order = [a for a in ARMS if a in datasets]
    return {arm: train_arm(recipe, arm, datasets[arm], run_dir=run_dir, overwrite=overwrite) for arm in order}


def load_detox_dataset(run_dir: str | os.PathLike[str], test: Dataset | None = None) -> DatasetDict:
    """The detox arm's data: ``<run_dir>/data/train_detox.jsonl`` (written by the rephrase step).

    Args:
        run_dir: the run directory.
        test: the held-out split to evaluate on; pass the raw arm's test split so both arms are evaluated on the same
            texts. `None` leaves the DatasetDict with the train split only.

    Raises:
        TrainingError: the file is missing (run the rephrase step first) or has no ``text`` column.
    """
    from datasets import DatasetDict, load_dataset

    path = RunPaths(Path(run_dir)).train_set("detox")
    if not path.is_file():
        raise TrainingError(
            f"No detoxified training set at {path} — run `detox-sft rephrase` (or notebooks/1-sft.ipynb "
            "up to the rephrase step) first."
        )
    with library_progress_bars_off():  # datasets' 'Generating train split' bar
        train = load_dataset("json", data_files=str(path), split="train")
    _require_text(train, str(path))
    keep = [c for c in ("prompt", "continuation", "toxicity", "text") if c in train.column_names]
    splits = {"train": train.select_columns(keep)}
    if test is not None:
        splits["test"] = test
    return DatasetDict(splits)


def load_arm_datasets(
    recipe: Recipe, arms: Iterable[str] = ARMS, run_dir: str | os.PathLike[str] | None = None
) -> dict[str, DatasetDict]:
    """The datasets of the arms: raw from :func:`detox_sft.data.load_train_dataset`, detox from the rephrase output.

    Both arms are evaluated on the raw held-out split, and trained on sets of the same size in the same order.
    """

    arms = list(arms)
    for arm in arms:
        _check_arm(arm)
    run_dir = Path(run_dir if run_dir is not None else recipe.run_path)
    if "detox" in arms and not RunPaths(run_dir).train_set("detox").is_file():
        load_detox_dataset(run_dir)  # raises the "run the rephrase step first" error before any loading
    raw = load_train_dataset(recipe.data, recipe.seed)
    out: dict[str, DatasetDict] = {}
    if "raw" in arms:
        out["raw"] = raw
    if "detox" in arms:
        detox = load_detox_dataset(run_dir, test=raw["test"])
        if len(detox["train"]) != len(raw["train"]):
            logger.warning(
                "detox set has %d samples, raw set %d: the arms will not see the same sample order.",
                len(detox["train"]),
                len(raw["train"]),
            )
        out["detox"] = detox
    return out


# --------------------------------------------------------------------------------------------------------------------
# After training
# --------------------------------------------------------------------------------------------------------------------


def plot_loss_curves(run_dir: str | os.PathLike[str]) -> Figure:
    """Both arms' train and eval loss on one plot, saved to ``<run_dir>/figures/loss_curves.png``.

    Raises:
        TrainingError: no arm has a training log yet.
    """
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    logs = {arm: RunPaths(Path(run_dir)).adapter(arm) / "log_history.json" for arm in ARMS}
    logs = {arm: json.loads(p.read_text()) for arm, p in logs.items() if p.is_file()}
    if not logs:
        raise TrainingError(
            f"No training log in {RunPaths(run_dir).adapters} — run notebooks/1-sft.ipynb first (or `detox-sft train`)."
        )
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colors = {"raw": "tab:red", "detox": "tab:green"}
    for arm, history in logs.items():
        curve = _loss_curve(history)
        if curve["train"]:
            ax.plot(
                [p["step"] for p in curve["train"]],
                [p["loss"] for p in curve["train"]],
                color=colors[arm],
                marker=".",
                label=f"{arm} train",
            )
        if curve["eval"]:
            ax.plot(
                [p["step"] for p in curve["eval"]],
                [p["loss"] for p in curve["eval"]],
                color=colors[arm],
                linestyle="--",
                marker="o",
                label=f"{arm} eval",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("SFT loss, raw vs detoxified data (same recipe)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = RunPaths(run_dir).figures / "loss_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return fig


def load_adapter_model(run_dir: str | os.PathLike[str], arm: str, device: str = "auto") -> tuple[Any, Any]:
    """The base model with the arm's adapter (PEFT), in eval mode, and its tokenizer (left padding, for generation).

    The base is loaded in full precision (fp32 on CPU, bf16/fp16 on GPU), not quantised: the adapter is applied to
    the weights that will be merged and served.

    Raises:
        TrainingError: the arm has no adapter yet.
    """
    _check_arm(arm)
    out = RunPaths(Path(run_dir)).adapter(arm)
    if not RunPaths(Path(run_dir)).adapter_config(arm).is_file():
        raise TrainingError(f"No adapter in {out} — run notebooks/1-sft.ipynb first (or `detox-sft train`).")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device, "device")
    metrics_path = out / "metrics.json"
    base, pinned = None, {}
    if metrics_path.is_file():
        metrics = read_json_or_none(metrics_path) or {}
        ref = metrics.get("base_model")
        # resolve again: a zoo path may have moved (rebuilt cache); the ref is stable
        base = resolve_ref(ref) if ref else None
        if ref:  # the commit the arm was trained on
            pinned = revision_kwargs(ref, metrics.get("base_model_revision"), "training.base_model_revision")
    if base is None:
        base = json.loads(RunPaths(Path(run_dir)).adapter_config(arm).read_text())["base_model_name_or_path"]
    with library_progress_bars_off(), ignore_warnings(PEFT_READS_IS_GRADIENT_CHECKPOINTING):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype(device), **pinned).to(device)
        model = PeftModel.from_pretrained(model, str(out)).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
