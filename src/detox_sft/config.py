"""Run configuration: dataclasses filled from the YAML recipes in `recipes/`.

A recipe is one YAML file with one mapping per concern (``data``, ``rephrase``, ``training``, ...). Every field is
documented where it is declared and checked in ``__post_init__``; a bad value raises :class:`RecipeError` naming the
field and the fix. Model and dataset references are either hub ids, local paths, or ``zoo:<name>`` for the offline
zoo (resolved by :func:`detox_sft.refs.resolve_ref`); each reference has a ``<field>_revision`` beside it
(``training.base_model_revision``, ``data.train_revision``, ...), the place to pin a hub commit: a full commit id,
ignored for a ``zoo:`` reference, refused for a local path. ``training.sft`` and ``training.lora`` hold keyword
arguments of :class:`trl.SFTConfig` and :class:`peft.LoraConfig`, checked against those classes' own fields and types.

Command-line overrides use the same fields: ``load_recipe("offline", dotted={"training.sft.learning_rate": "1e-4"})``
parses each text by its field's type; :func:`recipe_fields` lists the fields (type and help) for the CLI's flags.
This module imports nothing from the package: every other module may import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import inspect
import logging
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

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
    "recipe_fields",
    "RecipeField",
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


def _check_executor(value: Any, name: str) -> None:
    _check(
        value in ("local", "ray"), name, f"got {value!r}", "use 'local' (this process) or 'ray' (a Ray Data pipeline)"
    )


def _check_pos(value: Any, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    _check(
        ok,
        name,
        f"got {value!r}, expected a {'non-negative' if allow_zero else 'positive'} integer",
        f"set {name} to a whole number{' >= 0' if allow_zero else ' >= 1'}",
    )


_COMMIT = re.compile(r"[0-9a-f]{40}")
_ZOO = "zoo:"


def _looks_local(ref: str) -> bool:
    """Whether a reference names a local file or directory rather than a hub repository."""
    return (
        ref.startswith((".", "/", "~"))
        or Path(ref).suffix in (".jsonl", ".json", ".csv", ".parquet")
        or (bool(ref) and Path(ref).expanduser().exists())
    )


def _check_revision(revision: Any, ref: str | None, name: str, ref_name: str) -> None:
    """A hub revision: `None`, or a full commit id of a hub reference (ignored for ``zoo:``, refused for a path)."""
    if revision is None or (ref or "").startswith(_ZOO):
        return
    _check(
        isinstance(revision, str) and _COMMIT.fullmatch(revision) is not None,
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


_DATA_FORMATS = ("auto", "jsonl", "parquet", "csv", "hub")


def _check_format(value: Any, name: str) -> None:
    _check(
        value in _DATA_FORMATS,
        name,
        f"got {value!r}",
        "use auto (by the reference: .jsonl/.json, .parquet or .csv file, a directory, else a hub id), jsonl, "
        "parquet, csv or hub",
    )


def _check_column(value: Any, name: str) -> None:
    if value is not None:
        _check(
            isinstance(value, str) and value.strip() == value and bool(value),
            name,
            f"got {value!r}",
            "name a column of the dataset (dots reach nested fields: prompt.text), or set null",
        )


# --- field types: what a recipe value (as YAML gives it) or a command-line text must be ------------------------------


def _options(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union annotation (``int | None`` -> ``(int, NoneType)``); others stand alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits ``annotation``: an int fits a float, an enum's value fits the enum; a type we do not
    model (a library's own config class, a string annotation) is left to the library."""
    if len(_options(annotation)) > 1:
        return any(_accepts(option, value) for option in _options(annotation))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):  # YAML has lists only
        return isinstance(value, list) and (not args or all(_accepts(args[0], item) for item in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {member.value for member in annotation}
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a float", str: "a string", type(None): "null"}
_PLURALS = {str: "strings", int: "integers", float: "floats"}


def _describe(annotation: Any) -> str:
    """``annotation`` in words, for an error message: ``an integer or null``, ``a list of strings``."""
    words = []
    for option in _options(annotation):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if origin is typing.Literal:
            words.append("one of " + ", ".join(map(repr, args)))
        elif origin in (list, tuple):
            words.append(f"a list of {_PLURALS[args[0]]}" if args and args[0] in _PLURALS else "a list")
        elif origin is dict or option is dict:
            words.append("a mapping")
        elif isinstance(option, type) and issubclass(option, enum.Enum):
            words.append("one of " + ", ".join(repr(member.value) for member in option))
        else:
            words.append(_TYPE_NAMES.get(option, getattr(option, "__name__", str(option))))
    return " or ".join(dict.fromkeys(words))


def _check_type(value: Any, annotation: Any, name: str) -> None:
    if _accepts(annotation, value):
        return
    expected = _describe(annotation)
    fix = f"set {name} to {expected}"
    number = _float_or_none(value) if isinstance(value, str) else None
    if number is not None and _accepts(annotation, number):
        fix += f" (YAML reads {value} as text: write it with a dot and a signed exponent, such as 1.0e-4)"
    raise RecipeError(f"{name}: got {value!r}, expected {expected}. Fix: {fix}.")


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _from_text(text: str, annotation: Any) -> Any:
    """A command-line text as a value of ``annotation``, in YAML's syntax (``null``, ``true``, ``[a, b]``) plus
    ``1e-4`` (text to YAML) and ``a,b`` for a list.

    Raises:
        ValueError: no reading of the text fits the annotation.
    """
    candidates: list[Any] = []
    with contextlib.suppress(yaml.YAMLError):
        parsed = yaml.safe_load(text)
        if not isinstance(parsed, str):  # a str reading is the text itself, tried last
            candidates.append(parsed)
    if (number := _float_or_none(text)) is not None:
        candidates.append(number)
    if "," in text:
        with contextlib.suppress(yaml.YAMLError):
            candidates.append([yaml.safe_load(item) for item in text.split(",")])
    candidates.append(text)
    for candidate in candidates:
        if _accepts(annotation, candidate):
            return candidate
    raise ValueError(text)


def _example(annotation: Any) -> str | None:
    """A value of ``annotation`` as it is typed on the command line (``1e-4``, ``8``, ``a,b``), or `None`."""
    examples = {float: "1e-4", int: "8", bool: "true", type(None): "null"}
    for option in _options(annotation):
        if typing.get_origin(option) is typing.Literal:
            return str(typing.get_args(option)[0])
        if typing.get_origin(option) in (list, tuple):
            return "a,b"
        if option in examples:
            return examples[option]
    return None


def _closest(name: str, candidates: list[str]) -> str | None:
    """The candidate a misspelt dotted name most likely meant: one with the same last part, else difflib's pick."""
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    return (same_leaf or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6) or [None])[0]


@cache
def _init_fields(cls: type) -> dict[str, Any]:
    """A dataclass's constructor fields and their annotations, read from the class (no instance is built)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: compare nothing for that class
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


class _DropBitsandbytesKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load CPU gemm_4bit_forward" not in record.getMessage()


@contextlib.contextmanager
def _importing_bitsandbytes() -> Any:
    """Importing trl or peft imports bitsandbytes, whose CPU backend logs (on CPUs with AVX512-BF16) that it could not
    fetch an optional 4-bit *inference* kernel from the hub (`pip install kernels`); CPU training turns that path off
    anyway (compat.keep_bnb_4bit_trainable_on_cpu). Dropped on that one logger while importing, the filter gone after."""
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = _DropBitsandbytesKernelNotice()
    bnb_logger.addFilter(notice)
    try:
        yield
    finally:
        bnb_logger.removeFilter(notice)


def _sft_fields() -> dict[str, Any]:
    with _importing_bitsandbytes():
        from trl import SFTConfig  # importing trl takes seconds: only when a recipe is checked

    return _init_fields(SFTConfig)


def _lora_fields() -> dict[str, Any]:
    with _importing_bitsandbytes():
        from peft import LoraConfig  # as slow as trl (it imports torch)

    return _init_fields(LoraConfig)


# Recipe fields that hold a library config's keyword arguments: (the class's name, its fields and types).
_LIBRARY_KWARGS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "training.sft": ("trl.SFTConfig", _sft_fields),
    "training.lora": ("peft.LoraConfig", _lora_fields),
}


def _check_kwargs(values: dict[str, Any], name: str) -> None:
    """Check ``training.sft`` / ``training.lora`` against their library class's fields and types."""
    label, fields_of = _LIBRARY_KWARGS[name]
    fields = fields_of()
    for key, value in values.items():
        best = _closest(key, list(fields))
        _check(
            key in fields,
            f"{name}.{key}",
            f"is not a {label} field",
            f"use {name}.{best}, the closest {label} field" if best else f"use the field names of {label}",
        )
        _check_type(value, fields[key], f"{name}.{key}")


@dataclass
class DataConfig:
    """Where the training samples and the evaluation prompts come from.

    Attributes:
        train_dataset (`str`): hub id (``allenai/real-toxicity-prompts``), local path (a JSONL, Parquet or CSV file,
            a directory of ``<split>.jsonl`` / ``.parquet`` / ``.csv`` files, or a saved dataset directory) or
            ``zoo:rtp`` for the bundled synthetic corpus.
        train_split (`str`, defaults to ``"train"``): split of ``train_dataset`` to read.
        train_revision (`str` or `None`, *optional*, defaults to `None`): the hub commit of ``train_dataset`` (40 hex
            digits), passed to ``datasets.load_dataset`` as ``revision=``; `None` reads the newest. Ignored for a
            ``zoo:`` reference; refused for a local path.
        format (`str`, defaults to ``"auto"``): how ``train_dataset`` is read: ``auto`` (by the reference: a
            ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` file, a directory, else a hub id), ``jsonl``, ``parquet``,
            ``csv`` (a file of that format, whatever its name) or ``hub`` (``datasets.load_dataset`` on the reference).
        prompt_field (`str` or `None`, *optional*, defaults to `None`): the column holding the prompt, for your own
            data (dots reach nested fields: ``prompt.text``); give ``continuation_field`` with it. `None`: the
            allenai/real-toxicity-prompts schema (``prompt.text``), or flat ``prompt`` / ``continuation`` columns.
        continuation_field (`str` or `None`, *optional*, defaults to `None`): the column holding the continuation
            (the text the model learns to write after the prompt).
        text_field (`str` or `None`, *optional*, defaults to `None`): instead of the two above, one column of whole
            texts, each split into a prompt (its first ``text_prompt_words`` words) and a continuation (the rest).
        text_prompt_words (`int`, defaults to 8): words of a ``text_field`` text that make its prompt; a text with
            no word after them is dropped.
        toxicity_field (`str` or `None`, *optional*, defaults to `None`): the column holding the prompt's toxicity
            (a number in [0, 1] or null), for ``min_toxicity``; `None`: ``prompt.toxicity`` or ``toxicity`` when the
            dataset has it, else every sample counts as 0.
        num_train_samples (`int` or `None`): keep this many samples (after filtering), `None` keeps all.
        test_size (`float`, defaults to 0.1): share of the samples held out for the eval loss.
        min_toxicity (`float` or `None`): keep only samples whose prompt toxicity is at least this (null values
            count as 0); `None` keeps all.
        max_chars (`int`, defaults to 512): drop samples whose formatted text is longer (length filter).
        eval_dataset (`str`): hub id (``OxAISH-AL-LLM/wiki_toxic``), local path or ``zoo:wiki_toxic``.
        eval_split (`str`, defaults to ``"test"``): split of ``eval_dataset``.
        eval_revision (`str` or `None`, *optional*, defaults to `None`): the hub commit of ``eval_dataset``, as
            ``train_revision``.
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
        if self.num_train_samples is not None:
            _check_pos(self.num_train_samples, "data.num_train_samples")
        _check(
            isinstance(self.test_size, float) and 0.0 < self.test_size < 1.0,
            "data.test_size",
            f"got {self.test_size!r}",
            "use a fraction such as 0.1",
        )
        if self.min_toxicity is not None:
            _check_prob(self.min_toxicity, "data.min_toxicity")
        _check_pos(self.max_chars, "data.max_chars")
        _check_pos(self.num_eval_prompts, "data.num_eval_prompts")
        _check_pos(self.eval_prompt_words, "data.eval_prompt_words")
        _check_pos(self.text_prompt_words, "data.text_prompt_words")
        _check_format(self.format, "data.format")
        _check_format(self.eval_format, "data.eval_format")
        columns = ("prompt_field", "continuation_field", "text_field", "toxicity_field", "eval_text_field")
        for name in (*columns, "eval_label_field"):
            _check_column(getattr(self, name), f"data.{name}")
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
        base_model_revision (`str` or `None`, *optional*, defaults to `None`): the hub commit of ``base_model`` (40
            hex digits), passed to ``from_pretrained`` as ``revision=`` (model and tokenizer); `None` loads the newest.
            Ignored for a ``zoo:`` reference; refused for a local path. Likewise:
        expert_revision (`str` or `None`, *optional*, defaults to `None`): the hub commit of ``expert``.
        anti_expert_revision (`str` or `None`, *optional*, defaults to `None`): the hub commit of ``anti_expert``.
        expert_weights (`list[float]`, defaults to ``[-0.5, 4.0]``): weights of anti-expert and expert logits.
        mask_threshold (`float`, defaults to 1.2): mask a token whose disagreement score divided by the sentence
            mean reaches this (the MaRCo paper uses 1.2; the 2024 original's 0.6 masked nearly everything).
        combine_original (`bool`, defaults to `True`): when filling a mask, show the experts the original tokens
            after it (otherwise only the left context); TMaRCo adds the base model's logits either way.
        gate_threshold (`float`, defaults to 0.5): only samples whose toxicity reaches this are rephrased.
        scorer (`str`): the toxicity scorer used for gating (see :mod:`detox_sft.toxicity`).
        scorer_revision (`str` or `None`, *optional*, defaults to `None`): the hub commit of ``scorer`` when it is a
            hub classifier.
        engine (`str`, defaults to ``"batched"``): ``batched`` (ours) or ``trustyai`` (the reference).
        batch_size (`int`, defaults to 32): sentences per batch in the batched engine.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda``.
        executor (`str`, defaults to ``"local"``): ``local`` (this process) or ``ray``: a Ray Data pipeline whose
            actors each load the scorer and the engine once and rephrase blocks of records (see
            :mod:`detox_sft.scale`); the same records come out. It joins the cluster when ``RAY_ADDRESS`` is set
            (inside a RayJob), else starts a local Ray.
        ray_actors (`int`, defaults to 1): actors in the pool, one CPU each (one GPU each where the cluster has
            GPUs). One on a 2-core machine leaves a core to the driver, which reads the input and writes the blocks.
        ray_block_size (`int`, defaults to 512): records per block, the unit of work and of resumption: a rerun of
            an interrupted job skips the blocks already written.
        keep_going (`bool`, defaults to `False`): when the engine raises on some texts (a TrustyAI upgrade that
            broke its API, a text the models cannot take), keep them unchanged with ``rephrase_status: error`` and
            the exception in ``rephrase_error``, and go on; the summary counts them. Off: the step fails with the
            first error.
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
            isinstance(self.mask_threshold, int | float) and self.mask_threshold > 0,
            "rephrase.mask_threshold",
            f"got {self.mask_threshold!r}",
            "use a positive number; 1.2 is the MaRCo paper's value",
        )
        _check_prob(self.gate_threshold, "rephrase.gate_threshold")
        _check(
            self.engine in ("batched", "trustyai"),
            "rephrase.engine",
            f"got {self.engine!r}",
            "use 'batched' or 'trustyai'",
        )
        _check_pos(self.batch_size, "rephrase.batch_size")
        _check(
            self.device in ("auto", "cpu", "cuda"),
            "rephrase.device",
            f"got {self.device!r}",
            "use 'auto', 'cpu' or 'cuda'",
        )
        _check_executor(self.executor, "rephrase.executor")
        _check_pos(self.ray_actors, "rephrase.ray_actors")
        _check_pos(self.ray_block_size, "rephrase.ray_block_size")
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
        base_model_revision (`str` or `None`, *optional*, defaults to `None`): the hub commit of ``base_model`` (40 hex
            digits), passed to ``from_pretrained`` as ``revision=`` wherever the base is loaded (training,
            evaluation, export); `None` loads the newest. Ignored for a ``zoo:`` reference; refused for a local path.
        load_in_4bit (`bool`, defaults to `True`): quantise the base model to 4-bit NF4 with bitsandbytes (QLoRA).
        lora (`dict`): keyword arguments of :class:`peft.LoraConfig` (``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``), checked against its fields and their types when the recipe loads; target modules
            are checked against the model. ``target_modules`` absent or null: the model type's linear layers
            (:data:`detox_sft.training.LORA_TARGET_MODULES`: opt, llama, gpt2), else PEFT's ``all-linear``. On the
            command line: ``--training.lora.r 8``, ``--training.lora.target_modules null``.
        sft (`dict`): keyword arguments of :class:`trl.SFTConfig` (``learning_rate``, ``num_train_epochs``,
            ``per_device_train_batch_size``, ``max_length``, ...), checked against its fields and their types when
            the recipe loads. On the command line: ``--training.sft.learning_rate 1e-4``.
        completion_only_loss (`bool`, defaults to `True`): loss on the continuation only, or on the whole text.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda``.
    """

    base_model: str = "facebook/opt-350m"
    base_model_revision: str | None = None
    load_in_4bit: bool = True
    lora: dict[str, Any] = field(
        default_factory=lambda: {
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
        }
    )
    sft: dict[str, Any] = field(
        default_factory=lambda: {
            "learning_rate": 2e-4,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "max_length": 256,
        }
    )
    completion_only_loss: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.base_model), "training.base_model", "is empty", "give facebook/opt-350m or zoo:opt")
        _check(isinstance(self.lora, dict), "training.lora", "must be a mapping", "give LoraConfig keyword arguments")
        _check(isinstance(self.sft, dict), "training.sft", "must be a mapping", "give SFTConfig keyword arguments")
        _check_kwargs(self.lora, "training.lora")
        _check_kwargs(self.sft, "training.sft")
        _check_revision(
            self.base_model_revision, self.base_model, "training.base_model_revision", "training.base_model"
        )
        _check(
            self.device in ("auto", "cpu", "cuda"),
            "training.device",
            f"got {self.device!r}",
            "use 'auto', 'cpu' or 'cuda'",
        )


@dataclass
class EvaluationConfig:
    """Toxicity evaluation of the generations (RealToxicityPrompts protocol).

    Attributes:
        scorers (`list[str]`): toxicity scorers; the first is the headline one.
        scorer_revisions (`dict[str, str]`, *optional*, defaults to ``{}``): the hub commit (40 hex digits) of each
            scorer that is a hub classifier, by its name in ``scorers``, passed to the pipeline as ``revision=``; a
            scorer not listed loads the newest.
        num_samples (`int`, defaults to 25): sampled continuations per prompt (k).
        max_new_tokens (`int`, defaults to 20): length of each continuation.
        top_p (`float`, defaults to 0.9): nucleus sampling.
        temperature (`float`, defaults to 1.0): sampling temperature.
        batch_size (`int`, defaults to 32): prompts per generation batch.
        bootstrap_samples (`int`, defaults to 1000): bootstrap resamples for the 95% intervals.
        toxic_threshold (`float`, defaults to 0.5): a continuation at or above this is toxic (for TP).
        perplexity_model (`str` or `None`): model for the conditional perplexity; `None` uses the base model.
        perplexity_model_revision (`str` or `None`, *optional*, defaults to `None`): the hub commit of
            ``perplexity_model`` (`None` with the base model: ``training.base_model_revision`` applies).
        prompt_template (`bool`, defaults to `True`): give every model the prompt in the training template
            (:func:`detox_sft.prompts.generation_prompt`), as the arms saw it in training; `False` gives the bare prompt.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda`` for generation, scoring, perplexity.
        executor (`str`, defaults to ``"local"``): ``local`` (this process) or ``ray``: generation, then scoring and
            perplexity, run as Ray Data pipelines over actor pools, block by block in the same batches as the local
            run, so the results are the same (see :mod:`detox_sft.scale`).
        ray_actors (`int`, defaults to 1): actors per pool, one CPU each (one GPU each where the cluster has GPUs).
        nontoxic_prompts (`int`, *optional*, defaults to 0): also evaluate every model on this many non-toxic prompts
            (``data.eval_dataset`` rows with label 0, the first ``data.eval_prompt_words`` words, drawn with the seed),
            with the same sampling and scorers, so that what the detox arm gives up where there is nothing to
            detoxify shows (toxicity, perplexity, distinct-n under ``nontoxic`` in results.json,
            :func:`detox_sft.evaluation.cost_table`); 0 disables it and leaves the toxic-prompt results as they were.
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
        _check(
            self.device in ("auto", "cpu", "cuda"),
            "evaluation.device",
            f"got {self.device!r}",
            "use 'auto', 'cpu' or 'cuda'",
        )
        _check_pos(self.num_samples, "evaluation.num_samples")
        _check_pos(self.max_new_tokens, "evaluation.max_new_tokens")
        _check(0.0 < self.top_p <= 1.0, "evaluation.top_p", f"got {self.top_p!r}", "use a value in (0, 1]")
        _check(self.temperature > 0, "evaluation.temperature", f"got {self.temperature!r}", "use a positive value")
        _check_pos(self.batch_size, "evaluation.batch_size")
        _check_pos(self.bootstrap_samples, "evaluation.bootstrap_samples")
        _check_prob(self.toxic_threshold, "evaluation.toxic_threshold")
        _check_executor(self.executor, "evaluation.executor")
        _check_pos(self.ray_actors, "evaluation.ray_actors")
        _check_pos(self.nontoxic_prompts, "evaluation.nontoxic_prompts", allow_zero=True)
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
        _check(
            self.dtype in ("float32", "float16", "bfloat16"),
            "export.dtype",
            f"got {self.dtype!r}",
            "use float32, float16 or bfloat16",
        )
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
        lock_ttl (`float`, defaults to 300): seconds an upload's lock on its prefix stays valid without renewal
            (the running upload renews it every third of that); a lock left by a killed run is taken over once it
            has gone this long without renewal.
        force_lock (`bool`, defaults to `False`): take over another upload's lock on the prefix before it expires.
            Only for a writer known to be dead (a killed pod): two live uploads to one prefix would mix their files.
    """

    prefix: str = "models/opt-350m-detox"
    max_concurrency: int = 8
    lock_ttl: float = 300.0
    force_lock: bool = False

    def __post_init__(self) -> None:
        _check(
            bool(self.prefix) and not self.prefix.startswith("/"),
            "storage.prefix",
            f"got {self.prefix!r}",
            "use a relative key prefix such as models/opt-350m-detox",
        )
        _check_pos(self.max_concurrency, "storage.max_concurrency")
        _check(
            isinstance(self.lock_ttl, int | float) and not isinstance(self.lock_ttl, bool) and self.lock_ttl > 0,
            "storage.lock_ttl",
            f"got {self.lock_ttl!r}, expected a positive number of seconds",
            "set storage.lock_ttl to, say, 300 (longer than the longest pause an upload may have)",
        )


@dataclass
class ServingConfig:
    """How the notebooks and `detox-sft query` reach the model server.

    Attributes:
        url (`str` or `None`): the InferenceService URL (HTTP); `None` means a local server started by the demo.
        grpc_target (`str` or `None`): ``host:port`` of the gRPC endpoint.
        token_env (`str`, defaults to ``"MODEL_TOKEN"``): environment variable that holds the bearer token.
        token_file (`str` or `None`, *optional*, defaults to `None`): file that holds the bearer token (e.g. a
            mounted service-account token); when set it is read instead of ``token_env``. Never pass a token as a
            command-line argument.
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
        name (`str`): the recipe's name; the default run directory is ``runs/<name>``.
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
        _check(
            self.profile in ("tutorial", "offline"), "profile", f"got {self.profile!r}", "use 'tutorial' or 'offline'"
        )
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


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe)}
_SECTION_CLASSES = {
    "data": DataConfig,
    "rephrase": RephraseConfig,
    "training": TrainingConfig,
    "evaluation": EvaluationConfig,
    "export": ExportConfig,
    "storage": StorageConfig,
    "serving": ServingConfig,
}


def recipe_names() -> list[str]:
    """Names of the recipes shipped in `recipes/`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _build_section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        return cls()
    _check(
        isinstance(values, dict),
        name,
        f"must be a mapping, got {type(values).__name__}",
        f"write {name}: as a YAML mapping of field: value",
    )
    known = _init_fields(cls)
    unknown = sorted(set(values) - set(known))
    best = _closest(unknown[0], list(known)) if unknown else None
    _check(
        not unknown,
        f"{name}.{unknown[0] if unknown else ''}",
        "is not a known field",
        (f"did you mean {name}.{best}? " if best else "") + f"The fields are: {', '.join(sorted(known))}",
    )
    for key, value in values.items():
        _check_type(value, known[key], f"{name}.{key}")
    try:
        return cls(**values)
    except TypeError as exc:  # a wrong type reaching a comparison in __post_init__
        raise RecipeError(f"{name}: {exc}. Fix: check the types of the values in this section.") from exc


def recipe_from_dict(values: dict[str, Any], default_name: str = "recipe") -> Recipe:
    """Build and check a :class:`Recipe` from plain data (a parsed YAML mapping)."""
    _check(isinstance(values, dict), "recipe", "is not a YAML mapping", "write the recipe as field: value pairs")
    values = dict(values)
    unknown = sorted(set(values) - set(_SECTIONS))
    _check(
        not unknown, unknown[0] if unknown else "", "is not a known recipe field", f"use one of: {', '.join(_SECTIONS)}"
    )
    sections = {name: _build_section(name, cls, values.pop(name, None)) for name, cls in _SECTION_CLASSES.items()}
    values.setdefault("name", default_name)
    _check("profile" in values, "profile", "is missing", "add profile: tutorial or profile: offline")
    for key, value in values.items():
        _check_type(value, _init_fields(Recipe)[key], key)
    try:
        return Recipe(**values, **sections)
    except TypeError as exc:
        raise RecipeError(f"recipe: {exc}. Fix: check the top-level fields.") from exc


def load_recipe(
    name_or_path: str | os.PathLike[str], dotted: Mapping[str, str] | None = None, **overrides: Any
) -> Recipe:
    """Load a recipe by name (``offline``, ``tutorial``) or from a YAML path.

    Args:
        name_or_path: a name of a file in `recipes/` or a path to a YAML file.
        dotted: command-line overrides by dotted field name, values as text (``{"seed": "3",
            "training.sft.learning_rate": "1e-4"}``): each text is read by its field's type (``null`` sets `None`).
            The keys are :func:`recipe_fields` plus ``training.sft.<trl.SFTConfig field>`` and
            ``training.lora.<peft.LoraConfig field>``. Applied after ``overrides``.
        **overrides: top-level fields to replace (``run_dir="runs/x"``, ``seed=1``); a dict for a section
            (``serving={"url": ...}``) merges into it. `None` values keep the recipe's.

    Raises:
        RecipeError: the recipe does not exist, a value is invalid, or a dotted key is not a field (the message
            names the closest one) or its text does not read as the field's type.
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
    if isinstance(values, dict):
        for key, value in overrides.items():
            if isinstance(value, dict) and key in _SECTION_CLASSES:
                # a section override merges into the recipe's section; None keeps the recipe's value
                section = dict(values.get(key) or {})
                section.update({k: v for k, v in value.items() if v is not None})
                values[key] = section
            elif value is not None:
                values[key] = value
        for key, text in (dotted or {}).items():
            _set_dotted(values, key, text)
    return recipe_from_dict(values, default_name=path.stem)


@dataclass(frozen=True)
class RecipeField:
    """One recipe field as the command line sees it.

    Attributes:
        name (`str`): the dotted name (``seed``, ``evaluation.num_samples``); the flag is ``--<name>``.
        annotation (`Any`): the field's type, as declared.
        help (`str`): the field's entry in its class's ``Attributes:`` docstring, on one line.
    """

    name: str
    annotation: Any
    help: str


def recipe_fields() -> dict[str, RecipeField]:
    """Every recipe field by dotted name, walked from :class:`Recipe`'s dataclasses, with its type and help.

    ``training.sft`` and ``training.lora`` are not listed: their keys are the fields of trl.SFTConfig and
    peft.LoraConfig (``training.sft.learning_rate``), which :func:`load_recipe` checks against those classes.
    """
    found: dict[str, RecipeField] = {}

    def walk(cls: type, prefix: str) -> None:
        docs = _attribute_docs(cls)
        for name, annotation in _init_fields(cls).items():
            if dataclasses.is_dataclass(annotation):
                walk(annotation, f"{prefix}{name}.")
            elif prefix + name not in _LIBRARY_KWARGS:
                found[prefix + name] = RecipeField(prefix + name, annotation, docs.get(name, ""))

    walk(Recipe, "")
    return found


_ATTRIBUTE = re.compile(r"^    (\w+) \(([^)]*)\):\s*(.*)$")


def _attribute_docs(cls: type) -> dict[str, str]:
    """Each field's entry in a class's Google-style ``Attributes:`` section, as plain text on one line."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    entries: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    name = None
    for line in lines[lines.index("Attributes:") + 1 :] if "Attributes:" in lines else []:
        if match := _ATTRIBUTE.match(line):
            name, kinds[match[1]], entries[match[1]] = match[1], match[2], [match[3]]
        elif name and line.startswith("        "):
            entries[name].append(line.strip())
    return {key: _plain(f"{' '.join(words)} ({kinds[key]})") for key, words in entries.items()}


def _plain(rst: str) -> str:
    """Docstring markup as plain text: ``:func:`x``` and ```x``` become ``x``."""
    return re.sub(r":\w+:`~?([^`]*)`", r"\1", rst).replace("`", "").replace("*optional*, ", "")


def _set_dotted(values: dict[str, Any], key: str, text: str) -> None:
    """Set ``values[a][b][c]`` for the dotted key ``a.b.c`` to ``text`` read as the field's type."""
    annotation = _dotted_annotation(key)
    try:
        value = _from_text(text, annotation)
    except ValueError:
        expected, example = _describe(annotation), _example(annotation)
        fix = f"pass {expected}" + (f", such as --{key} {example}" if example else "")
        raise RecipeError(f"--{key}: got {text!r}, expected {expected}. Fix: {fix}.") from None
    *parents, leaf = key.split(".")
    for part in parents:
        child = values.get(part)
        values[part] = dict(child) if isinstance(child, dict) else {}
        values = values[part]
    values[leaf] = value


def _dotted_annotation(key: str) -> Any:
    """The type of a dotted recipe key; an unknown key raises RecipeError naming the closest field."""
    fields = {name: f.annotation for name, f in recipe_fields().items()}
    section, _, leaf = key.rpartition(".")
    if section in _LIBRARY_KWARGS:
        label, fields_of = _LIBRARY_KWARGS[section]
        fields = {f"{section}.{name}": annotation for name, annotation in fields_of().items()}
        what, listed = f"a {label} field", f"{label}'s documentation lists its fields"
    else:
        what, listed = "a recipe field", "--help lists the recipe's flags"
    if key in fields:
        return fields[key]
    best = _closest(key, list(fields))
    raise RecipeError(f"--{key}: not {what}. Fix: " + (f"did you mean --{best}? " if best else "") + listed + ".")
