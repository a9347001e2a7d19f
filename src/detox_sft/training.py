"""QLoRA supervised fine-tuning of the base model: two arms (``raw``, ``detox``), one recipe.

The 2024 original fully fine-tuned the raw arm but QLoRA-tuned the detoxified arm, and pointed LoRA at ``o_proj``,
which OPT does not have. Here both arms go through :func:`train_arm` with the same recipe, seed and sample order;
only the training text differs.

Pieces:

* pure mappers from the recipe to library objects (:func:`get_quantization_config`, :func:`get_peft_config`,
  :func:`get_sft_config`), unit-tested without a GPU;
* :func:`train_arm` / :func:`train_arms`: checks the inputs before anything heavy happens, trains with TRL's
  ``SFTTrainer`` (4-bit NF4 with bitsandbytes on CUDA *and* on CPU), resumes from the last checkpoint, and writes
  ``<run_dir>/adapters/<arm>/`` (adapter, tokenizer, ``log_history.json``, ``metrics.json``);
* :func:`plot_loss_curves`, :func:`load_adapter_model` for the later steps, and the ``detox-sft train`` CLI.

Loss on the continuation only uses TRL's prompt-completion format: ``prompt = "Prompt: {prompt}\\nContinuation:"``
and ``completion = " {continuation}"``. The space goes with the completion because byte-level BPE merges it into
the next word; a prompt ending in a space would not be a token prefix of the full text (TRL then warns and trains on
a context the model never sees at inference). ``prompt + completion`` is exactly the ``text`` column.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detox_sft.compat import sft_checkpointing_kwargs
from detox_sft.config import Recipe, TrainingConfig, load_recipe, resolve_ref

if TYPE_CHECKING:  # heavy imports stay inside the functions
    import torch
    from datasets import Dataset, DatasetDict
    from matplotlib.figure import Figure
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

__all__ = [
    "ARMS",
    "OPT_TARGET_MODULES",
    "RESPONSE_MARKER",
    "TrainingError",
    "TrainResult",
    "resolve_device",
    "training_path",
    "check_bitsandbytes",
    "get_quantization_config",
    "linear_module_names",
    "get_peft_config",
    "get_sft_config",
    "sft_config_kwargs",
    "generation_prompt",
    "to_prompt_completion",
    "check_training_inputs",
    "train_arm",
    "train_arms",
    "load_detox_dataset",
    "load_arm_datasets",
    "plot_loss_curves",
    "load_adapter_model",
    "adapter_dir",
    "add_arguments",
    "main",
]

logger = logging.getLogger(__name__)

ARMS: tuple[str, ...] = ("raw", "detox")
# OPT's linear layers per decoder block; the attention output is `out_proj` (the 2024 original's `o_proj` is LLaMA's).
OPT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# The template's separator without its trailing space (see the module docstring for why).
RESPONSE_MARKER = "\nContinuation:"
_TEMPLATE_PROMPT = "Prompt: {prompt}" + RESPONSE_MARKER
_DEFAULT_SAVE_STEPS = 50


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


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; ``cpu``/``cuda`` pass through.

    Raises:
        TrainingError: ``cuda`` was asked for but CUDA is not available.
    """
    from detox_sft.devices import resolve_device as _resolve

    return _resolve(device, "training.device", TrainingError)


def _gpu_dtype() -> torch.dtype:
    import torch

    # bf16 needs Ampere or newer; older GPUs (T4, V100) fall back to fp16.
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def _compute_dtype(device: str) -> torch.dtype:
    import torch

    return _gpu_dtype() if device == "cuda" else torch.float32


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
        bnb_4bit_compute_dtype=_compute_dtype(device),
    )


def linear_module_names(model_or_module_names: Any) -> list[str]:
    """Leaf names of the model's linear layers (LoRA targets), sorted, without ``lm_head``.

    Args:
        model_or_module_names: a ``torch.nn.Module`` (a meta-device skeleton is enough) or an iterable of module
            names (dotted names are reduced to their last part).
    """
    import torch

    if isinstance(model_or_module_names, torch.nn.Module):
        # bitsandbytes' Linear4bit subclasses nn.Linear, so quantised models count too.
        names = [n for n, m in model_or_module_names.named_modules() if isinstance(m, torch.nn.Linear)]
    else:
        names = list(model_or_module_names)
    # TRL computes log-probs from lm_head.weight directly: an adapter there would never train.
    return sorted({n.rsplit(".", 1)[-1] for n in names if n} - {"lm_head"})


def get_peft_config(cfg: TrainingConfig, model_or_module_names: Any) -> LoraConfig:
    """The LoRA config from ``training.lora``, its target modules checked against the model.

    Args:
        cfg: the recipe's training section (``lora`` holds :class:`peft.LoraConfig` keyword arguments).
        model_or_module_names: the model (or its module names) the adapter goes on.

    Raises:
        TrainingError: a target module does not exist in the model (the message lists the real ones), or a
            ``training.lora`` key is not a LoraConfig field.
    """
    from peft import LoraConfig

    kwargs = dict(cfg.lora)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    targets = kwargs.get("target_modules", list(OPT_TARGET_MODULES))
    real = linear_module_names(model_or_module_names)
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    if not isinstance(targets, str):
        targets = list(targets)
        unknown = [t for t in targets if t not in real]
        if unknown:
            raise TrainingError(
                f"training.lora.target_modules: {', '.join(unknown)} not in the model; its linear layers are "
                f"{', '.join(real)}. Fix: use those names (OPT's attention output is out_proj, not o_proj)."
            )
        if not targets:
            raise TrainingError(f"training.lora.target_modules is empty. Fix: name some of {', '.join(real)}.")
    kwargs["target_modules"] = targets
    try:
        return LoraConfig(**kwargs)
    except TypeError as exc:
        raise TrainingError(f"training.lora: {exc}. Fix: use peft.LoraConfig keyword arguments.") from exc


def get_sft_config(cfg: TrainingConfig, output_dir: str | os.PathLike[str], seed: int, device: str) -> SFTConfig:
    """The :class:`trl.SFTConfig` built from :func:`sft_config_kwargs`.

    Raises:
        TrainingError: a ``training.sft`` key is not an SFTConfig field.
    """
    from trl import SFTConfig

    try:
        return SFTConfig(**sft_config_kwargs(cfg, output_dir, seed, device))
    except TypeError as exc:
        raise TrainingError(
            f"training.sft: {exc}. Fix: use trl.SFTConfig field names (max_length, not "
            "max_seq_length; eval_strategy, not evaluation_strategy)."
        ) from exc


def sft_config_kwargs(
    cfg: TrainingConfig, output_dir: str | os.PathLike[str], seed: int, device: str
) -> dict[str, Any]:
    """The keyword arguments of :class:`trl.SFTConfig`: ``training.sft`` plus what the experiment fixes.

    Kept apart from :func:`get_sft_config` because SFTConfig refuses bf16 on a machine without a GPU, so the CUDA
    mapping can only be unit-tested as plain data.

    Defaults (the recipe may override): ``eval_strategy="epoch"``, ``save_strategy="steps"`` every 50 steps with
    the last 2 checkpoints kept (so an interrupted run resumes), ``logging_first_step``, ``report_to="none"``, token
    counting for tokens/s. Fixed: ``output_dir``, ``seed`` and ``data_seed`` (identical sample order in both arms),
    ``completion_only_loss`` from the recipe, ``model_init_kwargs={"dtype": ...}``, and the precision: bf16 (fp16 on
    pre-Ampere GPUs) only on CUDA; on CPU ``use_cpu=True`` and fp32.

    Args:
        cfg: the recipe's training section.
        output_dir: where checkpoints go.
        seed: the recipe's seed.
        device: ``cuda`` or ``cpu``.
    """
    kwargs: dict[str, Any] = dict(cfg.sft)
    kwargs.setdefault("eval_strategy", "epoch")
    kwargs.setdefault("save_strategy", "steps")
    kwargs.setdefault("save_steps", _DEFAULT_SAVE_STEPS)
    kwargs.setdefault("save_total_limit", 2)
    kwargs.setdefault("logging_first_step", True)
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")
    kwargs.setdefault("disable_tqdm", False)
    kwargs.update(output_dir=str(output_dir), seed=seed, data_seed=seed, completion_only_loss=cfg.completion_only_loss)
    if device == "cuda":
        import torch

        gpu_bf16 = _gpu_dtype() == torch.bfloat16
        kwargs.update(use_cpu=False, bf16=gpu_bf16, fp16=not gpu_bf16)
        dtype = "bfloat16" if gpu_bf16 else "float16"
    else:
        # SFTConfig turns bf16 on by default; on CPU we train in fp32 (compute dtype of the 4-bit layers too).
        kwargs.update(use_cpu=True, bf16=False, fp16=False)
        dtype = "float32"
    kwargs["model_init_kwargs"] = {**(kwargs.get("model_init_kwargs") or {}), "dtype": dtype}
    return sft_checkpointing_kwargs(kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Data and checks
# --------------------------------------------------------------------------------------------------------------------


def generation_prompt(prompt: str) -> str:
    """The prompt as the model saw it in training: ``"Prompt: {prompt}\nContinuation:"`` (no trailing space).

    Ending on ``":"`` keeps the token boundary of training; a trailing space becomes a lone space token the
    fine-tuned model never saw before a word.
    """
    return _TEMPLATE_PROMPT.format(prompt=prompt.strip())


def to_prompt_completion(dataset: Dataset) -> Dataset:
    """Split the ``text`` column at the template's marker into TRL's ``prompt`` / ``completion`` columns.

    ``prompt + completion == text``; the other columns are dropped.

    Raises:
        TrainingError: the text column is missing, or some texts lack the ``"\\nContinuation:"`` marker.
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
        cut = example["text"].index(RESPONSE_MARKER) + len(RESPONSE_MARKER)
        return {"prompt": example["text"][:cut], "completion": example["text"][cut:]}

    return dataset.map(split, remove_columns=dataset.column_names)


def _require_text(dataset: Any, name: str) -> None:
    columns = list(getattr(dataset, "column_names", []) or [])
    if "text" not in columns:
        raise TrainingError(
            f"{name} has no 'text' column (columns: {', '.join(columns) or 'none'}). Fix: build it with "
            "detox_sft.data.load_train_dataset (text = 'Prompt: {prompt}\\nContinuation: {continuation}')."
        )


def _prompt_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    prompts = [t[: t.index(RESPONSE_MARKER) + len(RESPONSE_MARKER)] if RESPONSE_MARKER in t else t for t in texts]
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
        template_tokens = len(tokenizer(_TEMPLATE_PROMPT.format(prompt=""))["input_ids"])
        if max_length <= template_tokens:
            raise TrainingError(
                f"training.sft.max_length={max_length} is not longer than the prompt template alone "
                f"({template_tokens} tokens for {_TEMPLATE_PROMPT.format(prompt='')!r}): no continuation token would "
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
# Training
# --------------------------------------------------------------------------------------------------------------------


def adapter_dir(run_dir: str | os.PathLike[str], arm: str) -> Path:
    """``<run_dir>/adapters/<arm>``."""
    return Path(run_dir) / "adapters" / arm


def _check_arm(arm: str) -> None:
    if arm not in ARMS:
        raise TrainingError(f"unknown arm {arm!r}. Fix: use one of {', '.join(ARMS)}.")


def _meta_model(model_path: str) -> Any:
    """The model's module tree on the meta device: its layer names without loading any weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class _PeakMemory:
    """Peak memory of a block: CUDA max allocated on GPU, peak RSS of this process on CPU.

    On Linux the RSS high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so the second arm in the
    same process does not inherit the first arm's peak; where that is not allowed, ru_maxrss (the process's lifetime
    peak) is reported and marked as such.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = ""
        self.peak_bytes = 0

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda_max_memory_allocated"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "cpu_peak_rss"
            except OSError:
                self.kind = "cpu_peak_rss_process_lifetime"
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        elif self.kind == "cpu_peak_rss":
            self.peak_bytes = _vm_hwm_bytes()
        else:
            # ru_maxrss is in KiB on Linux
            self.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _loss_curve(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"]} for e in log_history if "loss" in e]
    evals = [
        {"step": e["step"], "epoch": e.get("epoch"), "loss": e["eval_loss"]} for e in log_history if "eval_loss" in e
    ]
    return {"train": train, "eval": evals}


def train_arm(
    recipe: Recipe,
    arm: str,
    dataset: DatasetDict,
    run_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train one arm with the recipe's training section and write its artifacts.

    Writes ``<run_dir>/adapters/<arm>/``: the LoRA adapter, the tokenizer, ``log_history.json`` and ``metrics.json``
    (loss curve, wall time, samples/s, tokens/s, peak memory, trainable and total parameters, the path taken).
    Checkpoints go to ``<arm>/checkpoints/`` while training; an interrupted run resumes from the last one and they
    are removed once the arm has finished. A finished arm (``metrics.json`` present) is not retrained unless
    ``overwrite``.

    Args:
        recipe: the run configuration (``training`` section and ``seed`` are used).
        arm: ``raw`` or ``detox``.
        dataset: ``DatasetDict(train, test)`` with a ``text`` column (see :mod:`detox_sft.data`).
        run_dir: where outputs go; defaults to ``recipe.run_path``.
        overwrite: retrain even if the arm has finished before (its directory is emptied first).
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Returns:
        The arm's :class:`TrainResult`.

    Raises:
        TrainingError: bad input or configuration, raised before any training starts.
    """
    _check_arm(arm)
    cfg = recipe.training
    out = adapter_dir(run_dir if run_dir is not None else recipe.run_path, arm)
    metrics_path = out / "metrics.json"
    if metrics_path.exists() and not overwrite:
        metrics = json.loads(metrics_path.read_text())
        print(
            f"[train {arm}] already trained ({metrics_path}); skipping. Pass overwrite=True (--overwrite) to retrain."
        )
        return TrainResult(arm=arm, adapter_dir=out, metrics=metrics, skipped=True)
    if overwrite and out.exists():
        shutil.rmtree(out)

    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    device = resolve_device(cfg.device)
    model_path = resolve_ref(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # OPT has <pad>; other bases may not
        tokenizer.pad_token = tokenizer.eos_token
    check_training_inputs(recipe, dataset, tokenizer, device)
    peft_config = get_peft_config(cfg, _meta_model(model_path))
    ckpt_dir = out / "checkpoints"
    sft_config = get_sft_config(cfg, ckpt_dir, recipe.seed, device)
    quant = get_quantization_config(cfg, device)
    path = training_path(cfg, device)

    if cfg.completion_only_loss:
        train_ds, eval_ds = to_prompt_completion(dataset["train"]), to_prompt_completion(dataset["test"])
    else:
        train_ds, eval_ds = dataset["train"].select_columns(["text"]), dataset["test"].select_columns(["text"])

    resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    print(
        f"[train {arm}] path: {path} ({'4-bit NF4 base, ' if quant else ''}LoRA r={peft_config.r} on "
        f"{', '.join(sorted(peft_config.target_modules)) if not isinstance(peft_config.target_modules, str) else peft_config.target_modules}); "
        f"{len(train_ds)} train / {len(eval_ds)} eval samples; "
        + (f"resuming from {Path(resume).name}" if resume else "from scratch"),
        flush=True,
    )
    logger.info("train %s: path %s, device %s, resume %s", arm, path, device, resume)

    session = _session_counter()
    with _PeakMemory(device) as peak:
        trainer = _build_trainer(
            model_path,
            sft_config,
            train_ds,
            eval_ds,
            tokenizer,
            quant,
            peft_config,
            device,
            [session, *(callbacks or [])],
        )
        start = time.perf_counter()
        train_output = trainer.train(resume_from_checkpoint=resume)
        wall = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    log_history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(log_history, indent=1))
    trainable, total = _count_parameters(trainer.model)
    m = train_output.metrics
    metrics = {
        "arm": arm,
        "path": path,
        "device": device,
        "base_model": cfg.base_model,
        "base_model_path": model_path,
        "load_in_4bit": cfg.load_in_4bit,
        "completion_only_loss": cfg.completion_only_loss,
        "seed": recipe.seed,
        "num_train_samples": len(train_ds),
        "num_eval_samples": len(eval_ds),
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "resumed_from": Path(resume).name if resume else None,
        "train_loss": m.get("train_loss"),
        "final_eval_loss": next((e["eval_loss"] for e in reversed(log_history) if "eval_loss" in e), None),
        "loss_curve": _loss_curve(log_history),
        "wall_time_s": wall,
        "train_runtime_s": m.get("train_runtime"),
        # this session only (a resumed run counts the steps it ran itself)
        "samples_per_s": session.samples(sft_config) / m["train_runtime"] if m.get("train_runtime") else None,
        "tokens_per_s": session.tokens(trainer.state) / m["train_runtime"] if m.get("train_runtime") else None,
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_kind": peak.kind,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "training": dataclasses.asdict(cfg),
    }
    metrics_path.write_text(json.dumps(metrics, indent=1, default=str))
    # The adapter is saved; checkpoints only matter for an interrupted run.
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(
        f"[train {arm}] done in {wall:.1f} s: train loss {metrics['train_loss']:.4f}, eval loss "
        f"{metrics['final_eval_loss'] if metrics['final_eval_loss'] is None else round(metrics['final_eval_loss'], 4)}, "
        f"peak memory {peak.peak_bytes / 2**20:.0f} MiB -> {out}",
        flush=True,
    )
    return TrainResult(arm=arm, adapter_dir=out, metrics=metrics)


def _build_trainer(model_path, sft_config, train_ds, eval_ds, tokenizer, quant, peft_config, device, callbacks):
    import torch
    from trl import SFTTrainer

    if device == "cpu":
        # On a CPU-only torch TRL's default is device_map=None; a 4-bit model must still sit on the CPU explicitly.
        sft_config.model_init_kwargs = {**sft_config.model_init_kwargs, "device_map": {"": "cpu"}}
    trainer = SFTTrainer(
        model=model_path,
        args=sft_config,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        quantization_config=quant,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if device == "cpu" and quant is not None:
        from detox_sft.compat import keep_bnb_4bit_trainable_on_cpu

        keep_bnb_4bit_trainable_on_cpu(trainer.model)
    if not (sft_config.bf16 or sft_config.fp16):
        # TRL casts QLoRA adapter weights to bf16 (the paper's recipe for bf16 compute); in an fp32 CPU run that only
        # loses precision in the optimizer updates, so they go back to fp32 before the optimizer is built.
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return trainer


def _session_counter() -> Any:
    """A callback that remembers where this session started (step, tokens seen): a resumed run's speed counts only
    its own work."""
    from transformers import TrainerCallback

    class SessionCounter(TrainerCallback):
        start_step = start_tokens = end_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.end_step = state.global_step

        def samples(self, args: Any) -> int:
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
            return (self.end_step - self.start_step) * per_step

        def tokens(self, state: Any) -> int:
            return state.num_input_tokens_seen - self.start_tokens

    return SessionCounter()


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


def train_arms(
    recipe: Recipe,
    datasets: Mapping[str, DatasetDict],
    run_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, TrainResult]:
    """Train several arms (``raw`` first, then ``detox``) with the same recipe and seed.

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

    path = Path(run_dir) / "data" / "train_detox.jsonl"
    if not path.is_file():
        raise TrainingError(
            f"No detoxified training set at {path} — run `detox-sft rephrase` (or notebooks/1-sft.ipynb "
            "up to the rephrase step) first."
        )
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
    from detox_sft.data import load_train_dataset

    arms = list(arms)
    for arm in arms:
        _check_arm(arm)
    run_dir = Path(run_dir if run_dir is not None else recipe.run_path)
    if "detox" in arms and not (run_dir / "data" / "train_detox.jsonl").is_file():
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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    logs = {arm: adapter_dir(run_dir, arm) / "log_history.json" for arm in ARMS}
    logs = {arm: json.loads(p.read_text()) for arm, p in logs.items() if p.is_file()}
    if not logs:
        raise TrainingError(
            f"No training log in {run_dir / 'adapters'} — run notebooks/1-sft.ipynb first (or `detox-sft train`)."
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
    out = run_dir / "figures" / "loss_curves.png"
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
    out = adapter_dir(run_dir, arm)
    if not (out / "adapter_config.json").is_file():
        raise TrainingError(f"No adapter in {out} — run notebooks/1-sft.ipynb first (or `detox-sft train`).")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    metrics_path = out / "metrics.json"
    base = None
    if metrics_path.is_file():
        ref = json.loads(metrics_path.read_text()).get("base_model")
        # resolve again: a zoo path may have moved (rebuilt cache); the ref is stable
        base = resolve_ref(ref) if ref else None
    if base is None:
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=_compute_dtype(device)).to(device)
    model = PeftModel.from_pretrained(model, str(out)).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detox-sft train``."""
    parser.add_argument("--recipe", default="offline", help="recipe name (offline, tutorial) or YAML path")
    parser.add_argument("--arm", choices=[*ARMS, "both"], default="both", help="which arm(s) to train")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--overwrite", action="store_true", help="retrain arms that have finished before")


def main(args: argparse.Namespace) -> int:
    """Run ``detox-sft train``: train the arm(s), write the loss figure, print a summary."""
    from detox_sft.config import RecipeError

    try:
        recipe = load_recipe(args.recipe, run_dir=args.run_dir)
        arms = list(ARMS) if args.arm == "both" else [args.arm]
        datasets = load_arm_datasets(recipe, arms)
        results = train_arms(recipe, datasets, overwrite=args.overwrite)
    except (TrainingError, RecipeError) as exc:
        print(f"detox-sft train: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(TrainingError):
        plot_loss_curves(recipe.run_path)
    print("| arm | path | train loss | eval loss | wall s | samples/s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        m = r.metrics
        print(
            f"| {arm} | {m.get('path')} | {_fmt(m.get('train_loss'))} | {_fmt(m.get('final_eval_loss'))} | "
            f"{_fmt(m.get('wall_time_s'), 1)} | {_fmt(m.get('samples_per_s'), 2)} | "
            f"{_fmt((m.get('peak_memory_bytes') or 0) / 2**20, 0)} |"
        )
    return 0


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
