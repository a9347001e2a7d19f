"""Run configuration: dataclasses filled from the YAML recipes in `recipes/`, parsed and type-checked by jsonargparse.

A recipe is one YAML file with one mapping per concern (``data``, ``rephrase``, ``training``, ...). Every field is
documented where it is declared; jsonargparse checks each value against its annotation, and ``__post_init__`` checks
what needs the field's meaning; a bad value raises :class:`RecipeError` naming the field and the fix. Model and dataset
references are hub ids, local paths, or ``zoo:<name>`` for the offline zoo (:func:`detox_sft.refs.resolve_ref`); each
has a ``<field>_revision`` beside it, the place to pin a hub commit (40 hex digits; ignored for ``zoo:``, refused for a
local path). ``training.sft`` and ``training.lora`` hold keyword arguments of :class:`trl.SFTConfig` and
:class:`peft.LoraConfig`, read by those classes' own field annotations when the recipe loads.

Overrides use the dotted field names, as flags (``load_recipe("offline", ["--training.sft.learning_rate", "1e-4"])``,
what `detox-sft` passes) or as a mapping (``dotted={"evaluation.num_samples": "2"}``); :func:`recipe_parser` is the
jsonargparse parser with one flag per field. This module imports nothing from the package.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import os
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser

__all__ = [
    "ARMS",
    "RecipeError",
    "DataConfig",
    "RephraseConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "ExportConfig",
    "StorageConfig",
    "ServingConfig",
    "Recipe",
    "RECIPES_DIR",
    "load_recipe",
    "recipe_names",
    "recipe_parser",
    "RunPaths",
]

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class RecipeError(ValueError):
    """A recipe value is missing or invalid; the message names the field and the fix."""


def _check(condition: bool, field_name: str, problem: str, fix: str) -> None:
    if not condition:
        raise RecipeError(f"{field_name}: {problem}. Fix: {fix}.")


def _check_prob(value: float, name: str) -> None:
    _check(
        isinstance(value, int | float) and 0.0 <= value <= 1.0,
        name,
        f"got {value!r}, expected a number in [0, 1]",
        f"set {name} between 0 and 1",
    )


def _check_choice(value: Any, name: str, choices: Sequence[str], fix: str | None = None) -> None:
    _check(value in choices, name, f"got {value!r}", fix or "use " + " or ".join(map(repr, choices)))


def _check_pos(value: int, name: str, allow_zero: bool = False) -> None:
    _check(
        isinstance(value, int) and (value >= 0 if allow_zero else value > 0),  # None: a YAML null
        name,
        f"got {value!r}, expected a {'non-negative' if allow_zero else 'positive'} integer",
        f"set {name} to a whole number{' >= 0' if allow_zero else ' >= 1'}",
    )


_DEVICES = ("auto", "cpu", "cuda")
_EXECUTOR_FIX = "use 'local' (this process) or 'ray' (a Ray Data pipeline)"
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _looks_local(ref: str) -> bool:
    """Whether a reference names a local file or directory rather than a hub repository."""
    return (
        ref.startswith((".", "/", "~"))
        or Path(ref).suffix in (".jsonl", ".json", ".csv", ".parquet")
        or (bool(ref) and Path(ref).expanduser().exists())
    )


def _check_revision(revision: str | None, ref: str | None, name: str, ref_name: str) -> None:
    """A hub revision: `None`, or a full commit id of a hub reference (ignored for ``zoo:``, refused for a path)."""
    if revision is None or (ref or "").startswith("zoo:"):
        return
    _check(
        _COMMIT.fullmatch(revision) is not None,
        name,
        f"got {revision!r}, expected a full commit id (40 hex digits; the hub resolves no short ids, and a branch or "
        "tag can move)",
        "copy the commit id from the repository's history on huggingface.co, or set it to null (the newest)",
    )
    _check(
        ref is not None and not _looks_local(ref),
        name,
        f"{ref_name} is {ref!r}, a local path: a revision pins a hub repository" if ref else f"{ref_name} is unset",
        f"set {name} to null, or {ref_name} to a hub id",
    )


_FORMAT_FIX = (
    "use auto (by the reference: .jsonl/.json, .parquet or .csv file, a directory, else a hub id), jsonl, parquet, "
    "csv or hub"
)


@dataclass
class DataConfig:
    """Where the training samples and the evaluation prompts come from.

    Attributes:
        train_dataset (`str`): hub id (``allenai/real-toxicity-prompts``), local path (a JSONL, Parquet or CSV file,
            a directory of ``<split>.jsonl`` / ``.parquet`` / ``.csv`` files, or a saved dataset directory) or
            ``zoo:rtp`` for the bundled synthetic corpus.
        train_split (`str`, defaults to ``"train"``): split of ``train_dataset`` to read.
        train_revision (`str` or `None`, defaults to `None`): the hub commit of ``train_dataset`` (40 hex digits),
            passed to ``datasets.load_dataset`` as ``revision=``; `None` reads the newest.
        format (`str`, defaults to ``"auto"``): how ``train_dataset`` is read: ``auto`` (by the reference: a
            ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` file, a directory, else a hub id), ``jsonl``, ``parquet``,
            ``csv`` (a file of that format, whatever its name) or ``hub`` (``datasets.load_dataset`` on the reference).
        prompt_field (`str` or `None`, defaults to `None`): the column holding the prompt, for your own data (dots
            reach nested fields: ``prompt.text``); give ``continuation_field`` with it. `None`: the
            allenai/real-toxicity-prompts schema (``prompt.text``), or flat ``prompt`` / ``continuation`` columns.
        continuation_field (`str` or `None`, defaults to `None`): the column holding the continuation (the text the
            model learns to write after the prompt).
        text_field (`str` or `None`, defaults to `None`): instead of the two above, one column of whole texts, each
            split into a prompt (its first ``text_prompt_words`` words) and a continuation (the rest).
        text_prompt_words (`int`, defaults to 8): words of a ``text_field`` text that make its prompt; a text with
            no word after them is dropped.
        toxicity_field (`str` or `None`, defaults to `None`): the column holding the prompt's toxicity (a number in
            [0, 1] or null), for ``min_toxicity``; `None`: ``prompt.toxicity`` or ``toxicity`` when the dataset has
            it, else every sample counts as 0.
        num_train_samples (`int` or `None`): keep this many samples (after filtering), `None` keeps all.
        test_size (`float`, defaults to 0.1): share of the samples held out for the eval loss.
        min_toxicity (`float` or `None`): keep only samples whose prompt toxicity is at least this (null values
            count as 0); `None` keeps all.
        max_chars (`int`, defaults to 512): drop samples whose formatted text is longer (length filter).
        eval_dataset (`str`): hub id (``OxAISH-AL-LLM/wiki_toxic``), local path or ``zoo:wiki_toxic``.
        eval_split (`str`, defaults to ``"test"``): split of ``eval_dataset``.
        eval_revision (`str` or `None`, defaults to `None`): the hub commit of ``eval_dataset``.
        eval_format (`str`, defaults to ``"auto"``): how ``eval_dataset`` is read, as ``format``.
        eval_text_field (`str`, defaults to ``"comment_text"``): the column whose first words are the prompts.
        eval_label_field (`str`, defaults to ``"label"``): the column compared with ``eval_label``.
        eval_label (`int` or `None`, defaults to 1): keep eval rows with this label (1 = toxic); `None` keeps all.
        num_eval_prompts (`int`, defaults to 100): how many eval prompts to use.
        eval_prompt_words (`int`, defaults to 16): an eval prompt is the first words of the comment.
    """

    train_dataset: str = "allenai/real-toxicity-prompts"
    train_split: str = "train"
    train_revision: str | None = None
    format: str = "auto"
    prompt_field: str | None = None
    continuation_field: str | None = None
    text_field: str | None = None
    text_prompt_words: int = 8
    toxicity_field: str | None = None
    num_train_samples: int | None = 4000
    test_size: float = 0.1
    min_toxicity: float | None = None
    max_chars: int = 512
    eval_dataset: str = "OxAISH-AL-LLM/wiki_toxic"
    eval_split: str = "test"
    eval_revision: str | None = None
    eval_format: str = "auto"
    eval_text_field: str = "comment_text"
    eval_label_field: str = "label"
    eval_label: int | None = 1
    num_eval_prompts: int = 100
    eval_prompt_words: int = 16

    def __post_init__(self) -> None:
        _check(bool(self.train_dataset), "data.train_dataset", "is empty", "give a hub id, a local path or zoo:rtp")
        _check(
            bool(self.eval_dataset), "data.eval_dataset", "is empty", "give a hub id, a local path or zoo:wiki_toxic"
        )
        _check(0.0 < self.test_size < 1.0, "data.test_size", f"got {self.test_size!r}", "use a fraction such as 0.1")
        if self.min_toxicity is not None:
            _check_prob(self.min_toxicity, "data.min_toxicity")
        for name in ("num_train_samples", "max_chars", "num_eval_prompts", "eval_prompt_words", "text_prompt_words"):
            if getattr(self, name) is not None:
                _check_pos(getattr(self, name), f"data.{name}")
        _check_choice(self.format, "data.format", ("auto", "jsonl", "parquet", "csv", "hub"), _FORMAT_FIX)
        _check_choice(self.eval_format, "data.eval_format", ("auto", "jsonl", "parquet", "csv", "hub"), _FORMAT_FIX)
        for name in (
            "prompt_field",
            "continuation_field",
            "text_field",
            "toxicity_field",
            "eval_text_field",
            "eval_label_field",
        ):
            value = getattr(self, name)
            _check(
                value is None or (value.strip() == value and bool(value)),
                f"data.{name}",
                f"got {value!r}",
                "name a column of the dataset (dots reach nested fields: prompt.text), or set null",
            )
        pair = (self.prompt_field, self.continuation_field)
        _check(
            self.text_field is None or pair == (None, None),
            "data.text_field",
            f"is set together with data.prompt_field / data.continuation_field ({pair[0]!r}, {pair[1]!r})",
            "map either one text column (data.text_field) or a prompt and a continuation column, not both",
        )
        for given, other in (("prompt_field", "continuation_field"), ("continuation_field", "prompt_field")):
            _check(
                getattr(self, given) is None or getattr(self, other) is not None,
                f"data.{other}",
                f"is unset while data.{given} is {getattr(self, given)!r}",
                "name both columns (data.prompt_field and data.continuation_field), or one data.text_field",
            )
        _check_revision(self.train_revision, self.train_dataset, "data.train_revision", "data.train_dataset")
        _check_revision(self.eval_revision, self.eval_dataset, "data.eval_revision", "data.eval_dataset")


@dataclass
class RephraseConfig:
    """TMaRCo rephrasing of the toxic training samples.

    Attributes:
        base_model (`str`): the BART model that fills the masks (``facebook/bart-large`` or ``zoo:bart-base``).
        expert (`str`): the model trained on non-toxic text (``trustyai/gplus`` or ``zoo:expert``).
        anti_expert (`str`): the model trained on toxic text (``trustyai/gminus`` or ``zoo:anti-expert``).
        base_model_revision (`str` or `None`, defaults to `None`): the hub commit of ``base_model`` (40 hex digits),
            passed to ``from_pretrained`` as ``revision=`` (model and tokenizer); `None` loads the newest.
        expert_revision (`str` or `None`, defaults to `None`): the hub commit of ``expert``.
        anti_expert_revision (`str` or `None`, defaults to `None`): the hub commit of ``anti_expert``.
        expert_weights (`list[float]`, defaults to ``[-0.5, 4.0]``): weights of anti-expert and expert logits.
        mask_threshold (`float`, defaults to 1.2): mask a token whose disagreement score divided by the sentence
            mean reaches this (the MaRCo paper uses 1.2; the 2024 original's 0.6 masked nearly everything).
        combine_original (`bool`, defaults to `True`): when filling a mask, show the experts the original tokens
            after it (otherwise only the left context); TMaRCo adds the base model's logits either way.
        gate_threshold (`float`, defaults to 0.5): only samples whose toxicity reaches this are rephrased.
        scorer (`str`): the toxicity scorer used for gating (see :mod:`detox_sft.toxicity`).
        scorer_revision (`str` or `None`, defaults to `None`): the hub commit of ``scorer`` (a hub classifier).
        engine (`str`, defaults to ``"batched"``): ``batched`` (ours) or ``trustyai`` (the reference).
        batch_size (`int`, defaults to 32): sentences per batch in the batched engine.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda``.
        executor (`str`, defaults to ``"local"``): ``local`` (this process) or ``ray``: a Ray Data pipeline whose
            actors each load the scorer and the engine once and rephrase blocks of records; the same records come
            out. It joins the cluster when ``RAY_ADDRESS`` is set (inside a RayJob), else starts a local Ray.
        ray_actors (`int`, defaults to 1): actors in the pool, one CPU each (one GPU each where the cluster has
            GPUs). One on a 2-core machine leaves a core to the driver, which reads the input and writes the blocks.
        ray_block_size (`int`, defaults to 512): records per block, the unit of work and of resumption: a rerun of
            an interrupted job skips the blocks already written.
        keep_going (`bool`, defaults to `False`): when the engine raises on some texts, keep them unchanged with
            ``rephrase_status: error`` (the exception in ``rephrase_error``) and go on; the summary counts them.
            Off: the step fails with the first error.
    """

    base_model: str = "facebook/bart-large"
    expert: str = "trustyai/gplus"
    anti_expert: str = "trustyai/gminus"
    base_model_revision: str | None = None
    expert_revision: str | None = None
    anti_expert_revision: str | None = None
    expert_weights: list[float] = field(default_factory=lambda: [-0.5, 4.0])
    mask_threshold: float = 1.2
    combine_original: bool = True
    gate_threshold: float = 0.5
    scorer: str = "facebook/roberta-hate-speech-dynabench-r4-target"
    scorer_revision: str | None = None
    engine: str = "batched"
    batch_size: int = 32
    device: str = "auto"
    executor: str = "local"
    ray_actors: int = 1
    ray_block_size: int = 512
    keep_going: bool = False

    def __post_init__(self) -> None:
        _check(
            len(self.expert_weights) == 2,
            "rephrase.expert_weights",
            f"got {self.expert_weights!r}",
            "give two numbers: [anti_expert_weight, expert_weight]",
        )
        _check(
            self.mask_threshold > 0,
            "rephrase.mask_threshold",
            f"got {self.mask_threshold!r}",
            "use a positive number; 1.2 is the MaRCo paper's value",
        )
        _check_prob(self.gate_threshold, "rephrase.gate_threshold")
        _check_choice(self.engine, "rephrase.engine", ("batched", "trustyai"))
        _check_choice(self.device, "rephrase.device", _DEVICES)
        _check_choice(self.executor, "rephrase.executor", ("local", "ray"), _EXECUTOR_FIX)
        for name in ("batch_size", "ray_actors", "ray_block_size"):
            _check_pos(getattr(self, name), f"rephrase.{name}")
        for ref in ("base_model", "expert", "anti_expert", "scorer"):
            _check_revision(
                getattr(self, f"{ref}_revision"), getattr(self, ref), f"rephrase.{ref}_revision", f"rephrase.{ref}"
            )


@dataclass
class TrainingConfig:
    """QLoRA supervised fine-tuning; one recipe for both arms (``raw`` and ``detox``).

    Attributes:
        base_model (`str`): ``facebook/opt-350m`` or ``zoo:opt``; your own causal LM as a hub id or a local
            directory (``zoo:llama`` is a small Llama).
        base_model_revision (`str` or `None`, defaults to `None`): the hub commit of ``base_model`` (40 hex digits),
            passed to ``from_pretrained`` as ``revision=`` wherever the base is loaded (training, evaluation,
            export); `None` loads the newest.
        load_in_4bit (`bool`, defaults to `True`): quantise the base model to 4-bit NF4 with bitsandbytes (QLoRA).
        lora (`dict`): keyword arguments of :class:`peft.LoraConfig` (``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``), read by its field types when the recipe loads; target modules are checked against
            the model. ``target_modules`` absent or null: the model type's linear layers
            (:data:`detox_sft.training.LORA_TARGET_MODULES`), else PEFT's ``all-linear``. On the command line:
            ``--training.lora.r 8``, ``--training.lora.target_modules null``.
        sft (`dict`): keyword arguments of :class:`trl.SFTConfig`, read by its field types when the recipe loads: the
            hyperparameters, the evaluation and checkpoint schedule (``eval_strategy``, ``save_steps``,
            ``save_total_limit``: what an interrupted run resumes from) and the logging. A recipe's ``sft`` replaces
            this default whole. On the command line: ``--training.sft.learning_rate 1e-4``.
        completion_only_loss (`bool`, defaults to `True`): loss on the continuation only, or on the whole text.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda``.
    """

    base_model: str = "facebook/opt-350m"
    base_model_revision: str | None = None
    load_in_4bit: bool = True
    lora: dict[str, Any] = field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05})
    sft: dict[str, Any] = field(
        default_factory=lambda: {
            "learning_rate": 2e-4,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "max_length": 256,
            "eval_strategy": "epoch",
            "save_strategy": "steps",
            "save_steps": 50,
            "save_total_limit": 2,
            "logging_first_step": True,
            "report_to": "none",
            "include_num_input_tokens_seen": "non_padding",
            "disable_tqdm": False,
            "ddp_find_unused_parameters": False,
        }
    )
    completion_only_loss: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.base_model), "training.base_model", "is empty", "give facebook/opt-350m or zoo:opt")
        _check(isinstance(self.lora, dict), "training.lora", "must be a mapping", "give LoraConfig keyword arguments")
        _check(isinstance(self.sft, dict), "training.sft", "must be a mapping", "give SFTConfig keyword arguments")
        _check_revision(
            self.base_model_revision, self.base_model, "training.base_model_revision", "training.base_model"
        )
        _check_choice(self.device, "training.device", _DEVICES)


@dataclass
class EvaluationConfig:
    """Toxicity evaluation of the generations (RealToxicityPrompts protocol).

    Attributes:
        scorers (`list[str]`): toxicity scorers; the first is the headline one.
        scorer_revisions (`dict[str, str]`, defaults to ``{}``): the hub commit (40 hex digits) of each scorer that
            is a hub classifier, by its name in ``scorers``; a scorer not listed loads the newest.
        num_samples (`int`, defaults to 25): sampled continuations per prompt (k).
        max_new_tokens (`int`, defaults to 20): length of each continuation.
        top_p (`float`, defaults to 0.9): nucleus sampling.
        temperature (`float`, defaults to 1.0): sampling temperature.
        batch_size (`int`, defaults to 32): prompts per generation batch.
        bootstrap_samples (`int`, defaults to 1000): bootstrap resamples for the 95% intervals.
        toxic_threshold (`float`, defaults to 0.5): a continuation at or above this is toxic (for TP).
        perplexity_model (`str` or `None`): model for the conditional perplexity; `None` uses the base model.
        perplexity_model_revision (`str` or `None`, defaults to `None`): the hub commit of ``perplexity_model``
            (`None` with the base model: ``training.base_model_revision`` applies).
        prompt_template (`bool`, defaults to `True`): give every model the prompt in the training template
            (:func:`detox_sft.prompts.generation_prompt`), as the arms saw it in training; `False`: the bare prompt.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda`` for generation, scoring, perplexity.
        executor (`str`, defaults to ``"local"``): ``local`` (this process) or ``ray``: generation, then scoring and
            perplexity, as Ray Data pipelines over actor pools, in the same batches as the local run (same results).
        ray_actors (`int`, defaults to 1): actors per pool, one CPU each (one GPU each where the cluster has GPUs).
        nontoxic_prompts (`int`, defaults to 0): also evaluate every model on this many non-toxic prompts
            (``data.eval_dataset`` rows with label 0, drawn with the seed), with the same sampling and scorers, so
            that what the detox arm gives up where there is nothing to detoxify shows (``nontoxic`` in results.json,
            :func:`detox_sft.evaluation.cost_table`); 0 disables it.
    """

    scorers: list[str] = field(default_factory=lambda: ["facebook/roberta-hate-speech-dynabench-r4-target"])
    scorer_revisions: dict[str, str] = field(default_factory=dict)
    num_samples: int = 25
    max_new_tokens: int = 20
    top_p: float = 0.9
    temperature: float = 1.0
    batch_size: int = 32
    bootstrap_samples: int = 1000
    toxic_threshold: float = 0.5
    perplexity_model: str | None = None
    perplexity_model_revision: str | None = None
    prompt_template: bool = True
    device: str = "auto"
    executor: str = "local"
    ray_actors: int = 1
    nontoxic_prompts: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.scorers), "evaluation.scorers", "is empty", "name at least one scorer")
        _check_choice(self.device, "evaluation.device", _DEVICES)
        for name in ("num_samples", "max_new_tokens", "batch_size", "bootstrap_samples", "ray_actors"):
            _check_pos(getattr(self, name), f"evaluation.{name}")
        _check_pos(self.nontoxic_prompts, "evaluation.nontoxic_prompts", allow_zero=True)
        _check(0.0 < self.top_p <= 1.0, "evaluation.top_p", f"got {self.top_p!r}", "use a value in (0, 1]")
        _check(self.temperature > 0, "evaluation.temperature", f"got {self.temperature!r}", "use a positive value")
        _check_prob(self.toxic_threshold, "evaluation.toxic_threshold")
        _check_choice(self.executor, "evaluation.executor", ("local", "ray"), _EXECUTOR_FIX)
        for scorer, revision in self.scorer_revisions.items():
            name = f"evaluation.scorer_revisions.{scorer}"
            _check(scorer in self.scorers, name, "is not one of evaluation.scorers", f"pin one of {self.scorers}")
            _check_revision(revision, scorer, name, "the scorer")
        _check_revision(
            self.perplexity_model_revision,
            self.perplexity_model,
            "evaluation.perplexity_model_revision",
            "evaluation.perplexity_model",
        )


@dataclass
class ExportConfig:
    """Merging the detox adapter and converting the model.

    Attributes:
        model_id (`str`, defaults to ``"opt-350m-detox"``): the served model's id (the caikit folder name and the
            InferenceService name in `manifests/`).
        dtype (`str`, defaults to ``"float16"``): dtype of the merged weights: ``float32``, ``float16`` or ``bfloat16``.
    """

    model_id: str = "opt-350m-detox"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_choice(self.dtype, "export.dtype", ("float32", "float16", "bfloat16"))
        _check(
            bool(self.model_id) and "/" not in self.model_id,
            "export.model_id",
            f"got {self.model_id!r}",
            "use a plain name such as opt-350m-detox",
        )


@dataclass
class StorageConfig:
    """Where the exported model goes in S3 (the data connection's bucket).

    Attributes:
        prefix (`str`, defaults to ``"models/opt-350m-detox"``): key prefix; the Caikit directory goes under
            ``<prefix>/caikit`` and the Hugging Face directory under ``<prefix>/hf``. The manifests reference it.
        max_concurrency (`int`, defaults to 8): parallel transfers.
    """

    prefix: str = "models/opt-350m-detox"
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        _check(
            bool(self.prefix) and not self.prefix.startswith("/"),
            "storage.prefix",
            f"got {self.prefix!r}",
            "use a relative key prefix such as models/opt-350m-detox",
        )
        _check_pos(self.max_concurrency, "storage.max_concurrency")


@dataclass
class ServingConfig:
    """How the notebooks and `detox-sft query` reach the model server.

    Attributes:
        url (`str` or `None`): the InferenceService URL (HTTP); `None` means a local server started by the demo.
        grpc_target (`str` or `None`): ``host:port`` of the gRPC endpoint.
        token_env (`str`, defaults to ``"MODEL_TOKEN"``): environment variable that holds the bearer token.
        token_file (`str` or `None`, defaults to `None`): file that holds the bearer token (e.g. a mounted
            service-account token), read instead of ``token_env``. Never pass a token as a command-line argument.
        verify_tls (`bool`, defaults to `True`): verify the server's certificate.
        ca_bundle (`str` or `None`): CA bundle for verification (OpenShift's service CA, say).
        timeout (`float`, defaults to 60): seconds per request.
    """

    url: str | None = None
    grpc_target: str | None = None
    token_env: str = "MODEL_TOKEN"
    token_file: str | None = None
    verify_tls: bool = True
    ca_bundle: str | None = None
    timeout: float = 60.0


# The two fine-tuned arms, trained with one recipe: on the raw and on the detoxified training set.
ARMS: tuple[str, ...] = ("raw", "detox")


@dataclass(frozen=True)
class RunPaths:
    """The run directory's layout: the one place that names where each step writes.

    ``recipe.paths.adapter("detox")`` is ``<run_dir>/adapters/detox``; notebooks, slides and the CLI use these too.
    """

    root: Path

    @property
    def data(self) -> Path:
        """``data/``: the raw and detoxified training sets."""
        return self.root / "data"

    def train_set(self, arm: str) -> Path:
        """``data/train_<arm>.jsonl`` (written by the rephrase step for both arms)."""
        return self.data / f"train_{arm}.jsonl"

    @property
    def rephrase_cache(self) -> Path:
        """``rephrase/cache``: the rephrase step's SQLite cache."""
        return self.root / "rephrase" / "cache"

    @property
    def adapters(self) -> Path:
        """``adapters/``: one LoRA adapter per arm."""
        return self.root / "adapters"

    def adapter(self, arm: str) -> Path:
        """``adapters/<arm>``: an arm's adapter, tokenizer, training log and ``metrics.json``."""
        return self.adapters / arm

    def adapter_config(self, arm: str) -> Path:
        """``adapters/<arm>/adapter_config.json``: present once an arm's adapter is saved."""
        return self.adapter(arm) / "adapter_config.json"

    @property
    def eval(self) -> Path:
        """``eval/``: results.json, summary.md, generations.csv and the generation cache."""
        return self.root / "eval"

    @property
    def results(self) -> Path:
        """``eval/results.json``: the evaluation's summary (its completion marker)."""
        return self.eval / "results.json"

    @property
    def figures(self) -> Path:
        """``figures/``: every PNG the notebooks show."""
        return self.root / "figures"

    @property
    def export(self) -> Path:
        """``export/``: what the export step writes."""
        return self.root / "export"

    @property
    def hf_export(self) -> Path:
        """``export/hf``: the merged model as a Hugging Face directory (vLLM)."""
        return self.export / "hf"

    def caikit_export(self, model_id: str) -> Path:
        """``export/caikit/<model_id>``: the Caikit directory (config.yml + artifacts/)."""
        return self.export / "caikit" / model_id


@dataclass
class Recipe:
    """One run configuration: a profile (``tutorial`` or ``offline``) and one section per concern.

    Attributes:
        name (`str`): the recipe's name (default: the file's); the default run directory is ``runs/<name>``.
        profile (`str`): ``tutorial`` (hub ids, GPU) or ``offline`` (local zoo, CPU).
        seed (`int`, defaults to 42): one seed for sampling, shuffling and training.
        run_dir (`str` or `None`): where outputs go; `None` means ``runs/<name>``.
    """

    name: str
    profile: str
    seed: int = 42
    run_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    rephrase: RephraseConfig = field(default_factory=RephraseConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    def __post_init__(self) -> None:
        _check_choice(self.profile, "profile", ("tutorial", "offline"))
        _check_pos(self.seed, "seed", allow_zero=True)

    @property
    def run_path(self) -> Path:
        """The run directory as a Path (``runs/<name>`` unless ``run_dir`` is set)."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    @property
    def paths(self) -> RunPaths:
        """The layout of :attr:`run_path` (``recipe.paths.adapter("detox")``, ...)."""
        return RunPaths(self.run_path)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (for saving next to the run's outputs)."""
        return dataclasses.asdict(self)


_SECTIONS = ("data", "rephrase", "training", "evaluation", "export", "storage", "serving")


def recipe_names() -> list[str]:
    """Names of the recipes shipped in `recipes/`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@cache
def recipe_parser() -> ArgumentParser:
    """The recipe as a jsonargparse parser: one ``--<dotted name>`` flag per field of :class:`Recipe`'s dataclasses,
    typed by its annotation and documented by its docstring entry (the help `detox-sft` shows)."""
    parser = ArgumentParser(
        prog="recipe fields", usage=argparse.SUPPRESS, exit_on_error=False, allow_abbrev=False, add_help=False
    )
    parser.add_class_arguments(Recipe, fail_untyped=True)
    return parser


class _DropBitsandbytesKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load CPU gemm_4bit_forward" not in record.getMessage()


@contextlib.contextmanager
def _importing_bitsandbytes() -> Iterator[None]:
    """Importing trl or peft imports bitsandbytes, whose CPU backend logs (on CPUs with AVX512-BF16) that it could not
    fetch an optional 4-bit *inference* kernel from the hub; CPU training turns that path off anyway
    (compat.keep_bnb_4bit_trainable_on_cpu). Dropped on that one logger while importing, the filter gone after."""
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = _DropBitsandbytesKernelNotice()
    bnb_logger.addFilter(notice)
    try:
        yield
    finally:
        bnb_logger.removeFilter(notice)


def _library_class(name: str) -> tuple[str, type]:
    with _importing_bitsandbytes():  # importing trl or peft takes seconds (torch): only when a recipe loads
        if name == "training.sft":
            from trl import SFTConfig

            return "trl.SFTConfig", SFTConfig
        from peft import LoraConfig

        return "peft.LoraConfig", LoraConfig


def _library_kwargs(name: str, values: Any) -> Any:
    """``training.sft`` / ``training.lora`` read by jsonargparse against the field annotations of trl.SFTConfig /
    peft.LoraConfig (``"1e-4"`` for a float field becomes 1e-4); only the keys given are kept."""
    if not isinstance(values, dict):
        return values  # TrainingConfig.__post_init__ names the problem
    label, cls = _library_class(name)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in known:
            best = difflib.get_close_matches(key, sorted(known), n=1)
            fix = f"use {name}.{best[0]}, the closest {label} field" if best else f"use the field names of {label}"
            raise RecipeError(f"{name}.{key}: is not a {label} field. Fix: {fix}.")
    # A text for a field that takes text stays as given: jsonargparse reads it as YAML, which turns TRL's
    # eval_strategy "no" into False.
    hints = typing.get_type_hints(cls)
    kept = {k: v for k, v in values.items() if isinstance(v, str) and _takes_text(hints.get(k))}
    typed = {k: v for k, v in values.items() if k not in kept}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, skip=known - set(typed), fail_untyped=False)
    try:
        parsed = parser.parse_object(typed) if typed else {}
    except ArgumentError as exc:
        raise _recipe_error(exc, prefix=f"{name}.") from None
    return {key: kept[key] if key in kept else parsed[key] for key in values}


def _library_flags(flags: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Split ``--training.sft.FIELD VALUE`` / ``--training.lora.FIELD=VALUE`` off the other flags; each value is read
    as YAML, except that YAML 1.1's yes/no/on/off stay text (TRL's ``eval_strategy no``)."""
    library: dict[str, dict[str, Any]] = {}
    rest: list[str] = []
    tokens = iter(flags)
    for token in tokens:
        flag, has_value, text = token.partition("=")
        section = next((n for n in ("training.sft", "training.lora") if flag.startswith(f"--{n}.")), None)
        if section is None:
            rest.append(token)
            continue
        if not has_value:
            text = next(tokens, None)
            if text is None:
                raise RecipeError(f"{flag}: no value. Fix: give one, as in {flag} VALUE.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            value = text
        library.setdefault(section, {})[flag[len(section) + 3 :]] = value
    return library, rest


def _takes_text(annotation: Any) -> bool:
    """Whether a field's annotation admits a plain string (``str``, ``str | None``, ``Enum | str``)."""
    return annotation is str or str in typing.get_args(annotation)


_FAILED_GROUP = re.compile(r"Group '([\w.]+)' does not accept option '([\w.]+)'")
_FAILED_KEY = re.compile(
    r"""^(?:Parser key "|Option '|unrecognized arguments: -*|argument -*|the following arguments are required: )"""
    r"([\w.]+)"
)


def _recipe_error(exc: ArgumentError, prefix: str = "") -> RecipeError:
    """jsonargparse's message as a RecipeError that starts with the field's dotted name and ends with the fix."""
    text = str(exc)
    group, key = _FAILED_GROUP.match(text), _FAILED_KEY.match(text)
    name = f"{group[1]}.{group[2]}" if group else key[1] if key else None
    detail = " ".join(re.sub(r"<class '(\w+)'>", r"\1", text.partition("\n")[2]).split())
    detail = detail.replace("Expected a ", "expected ").replace(". Got value: ", ", got ")
    if name is None:
        return RecipeError(f"recipe: {text}. Fix: check the recipe and the flags (--help lists the fields).")
    name = prefix + name
    if group or text.startswith(("Option", "unrecognized")):
        known = list(recipe_parser().get_defaults().keys())
        best = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {best[0]}? " if best else ""
        return RecipeError(f"{name}: is not a recipe field. Fix: {hint}--help lists the recipe's fields.")
    if text.startswith("argument"):
        return RecipeError(f"--{name}: {text.partition(': ')[2]}. Fix: give a value, as in --{name} VALUE.")
    if text.startswith("the following"):
        return RecipeError(f"{name}: is missing. Fix: add {name} to the recipe.")
    return RecipeError(f"{name}: {detail}. Fix: set {name} to a value of that type.")


def load_recipe(
    name_or_path: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    dotted: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Recipe:
    """Load a recipe by name (``offline``, ``tutorial``) or from a YAML path, with overrides.

    Args:
        name_or_path: a name of a file in `recipes/` or a path to a YAML file.
        args: command-line flags, one per field (``["--seed", "3", "--training.sft.learning_rate=1e-4"]``; see
            :func:`recipe_parser`), plus ``--training.sft.<trl.SFTConfig field>`` and
            ``--training.lora.<peft.LoraConfig field>``. Each text is read by its field's type (``null`` is `None`).
        dotted: the same as a mapping, values as text (``{"evaluation.num_samples": "2"}``); applied before ``args``.
        **overrides: top-level fields to replace (``run_dir="runs/x"``, ``seed=1``); a dict for a section
            (``serving={"url": ...}``) merges into it. `None` values keep the recipe's. Applied before ``dotted``.

    Raises:
        RecipeError: the recipe does not exist, or a value or a flag is invalid (the message names the field and the
            fix; an unknown field, the closest one).
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeError(
            f"recipe {str(name_or_path)!r} not found. Fix: use one of {recipe_names()} "
            "or the path of a YAML recipe file."
        )
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe {path}: not UTF-8 text ({exc.reason} at byte {exc.start}). Fix: save the file as UTF-8."
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: not valid YAML ({exc}). Fix: correct the YAML syntax.") from exc
    _check(isinstance(values, dict), "recipe", "is not a YAML mapping", "write the recipe as field: value pairs")
    values = {"name": path.stem, **values}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in _SECTIONS:  # merges into the section; None keeps the recipe's value
            values[key] = {**(values.get(key) or {}), **{k: v for k, v in value.items() if v is not None}}
        elif value is not None:
            values[key] = value
    for section in _SECTIONS:
        if values.get(section, {}) is None:  # an empty section in YAML: the defaults
            del values[section]
        _check(
            isinstance(values.get(section, {}), dict),
            section,
            f"must be a mapping, got {type(values.get(section)).__name__}",
            f"write {section}: as a YAML mapping of field: value",
        )
    parser = recipe_parser()
    flags = [*(f"--{key}={text}" for key, text in (dotted or {}).items()), *args]
    # training.sft / training.lora bypass the recipe parser, whose dict[str, Any] reads every text as YAML (TRL's
    # eval_strategy "no" would become False): _library_kwargs reads them against the TRL/PEFT classes.
    library_flags, flags = _library_flags(flags)
    training = values.get("training") or {}
    from_yaml = {f"training.{n}": training.pop(n) for n in ("sft", "lora") if isinstance(training.get(n), dict)}
    try:
        cfg = parser.parse_object(values)
        cfg = parser.parse_args(flags, namespace=cfg) if flags else cfg
    except ArgumentError as exc:
        raise _recipe_error(exc) from None
    library = {}
    for name in ("training.sft", "training.lora"):
        base = from_yaml.get(name, cfg[name])  # the recipe's mapping, else the default
        library[name] = _library_kwargs(
            name, {**base, **library_flags.get(name, {})} if isinstance(base, dict) else base
        )
    try:
        sections = vars(parser.instantiate(cfg))
        # set after instantiate, which would read their texts as YAML again
        sections["training"] = dataclasses.replace(
            sections["training"], sft=library["training.sft"], lora=library["training.lora"]
        )
        return Recipe(**sections)
    except TypeError as exc:  # a YAML null in a field that takes none, reaching a comparison in __post_init__
        raise RecipeError(
            f"recipe: {exc}. Fix: give every field a value of its type (null only where allowed)."
        ) from exc
