"""Run configuration: dataclasses filled from the YAML recipes in `recipes/`.

A recipe is one YAML file with one mapping per concern (``data``, ``rephrase``, ``training``, ...). Every field is
documented where it is declared and checked in ``__post_init__``; a bad value raises :class:`RecipeError` naming the
field and the fix. Model and dataset references are either hub ids, local paths, or ``zoo:<name>`` for the offline
zoo (built on first use by :mod:`detox_sft.offline`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
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
    "resolve_ref",
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


def _check_pos(value: Any, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    _check(
        ok,
        name,
        f"got {value!r}, expected a {'non-negative' if allow_zero else 'positive'} integer",
        f"set {name} to a whole number{' >= 0' if allow_zero else ' >= 1'}",
    )


@dataclass
class DataConfig:
    """Where the training samples and the evaluation prompts come from.

    Attributes:
        train_dataset (`str`): hub id (``allenai/real-toxicity-prompts``), local path (JSONL file or saved dataset
            directory) or ``zoo:rtp`` for the bundled synthetic corpus.
        train_split (`str`, defaults to ``"train"``): split of ``train_dataset`` to read.
        num_train_samples (`int` or `None`): keep this many samples (after filtering), `None` keeps all.
        test_size (`float`, defaults to 0.1): share of the samples held out for the eval loss.
        min_toxicity (`float` or `None`): keep only samples whose prompt toxicity is at least this (null values
            count as 0); `None` keeps all.
        max_chars (`int`, defaults to 512): drop samples whose formatted text is longer (length filter).
        eval_dataset (`str`): hub id (``OxAISH-AL-LLM/wiki_toxic``), local path or ``zoo:wiki_toxic``.
        eval_split (`str`, defaults to ``"test"``): split of ``eval_dataset``.
        eval_label (`int` or `None`, defaults to 1): keep eval rows with this label (1 = toxic); `None` keeps all.
        num_eval_prompts (`int`, defaults to 100): how many eval prompts to use.
        eval_prompt_words (`int`, defaults to 16): an eval prompt is the first words of the comment.
    """

    train_dataset: str = "allenai/real-toxicity-prompts"
    train_split: str = "train"
    num_train_samples: int | None = 4000
    test_size: float = 0.1
    min_toxicity: float | None = None
    max_chars: int = 512
    eval_dataset: str = "OxAISH-AL-LLM/wiki_toxic"
    eval_split: str = "test"
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


@dataclass
class RephraseConfig:
    """TMaRCo rephrasing of the toxic training samples.

    Attributes:
        base_model (`str`): the BART model that fills the masks (``facebook/bart-large`` or ``zoo:bart-base``).
        expert (`str`): the model trained on non-toxic text (``trustyai/gplus`` or ``zoo:expert``).
        anti_expert (`str`): the model trained on toxic text (``trustyai/gminus`` or ``zoo:anti-expert``).
        expert_weights (`list[float]`, defaults to ``[-0.5, 4.0]``): weights of anti-expert and expert logits.
        mask_threshold (`float`, defaults to 1.2): mask a token whose disagreement score divided by the sentence
            mean reaches this (the MaRCo paper uses 1.2; the 2024 original's 0.6 masked nearly everything).
        combine_original (`bool`, defaults to `True`): when filling a mask, show the experts the original tokens
            after it (otherwise only the left context); TMaRCo adds the base model's logits either way.
        gate_threshold (`float`, defaults to 0.5): only samples whose toxicity reaches this are rephrased.
        scorer (`str`): the toxicity scorer used for gating (see :mod:`detox_sft.toxicity`).
        engine (`str`, defaults to ``"batched"``): ``batched`` (ours) or ``trustyai`` (the reference).
        batch_size (`int`, defaults to 32): sentences per batch in the batched engine.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda``.
    """

    base_model: str = "facebook/bart-large"
    expert: str = "trustyai/gplus"
    anti_expert: str = "trustyai/gminus"
    expert_weights: list[float] = field(default_factory=lambda: [-0.5, 4.0])
    mask_threshold: float = 1.2
    combine_original: bool = True
    gate_threshold: float = 0.5
    scorer: str = "facebook/roberta-hate-speech-dynabench-r4-target"
    engine: str = "batched"
    batch_size: int = 32
    device: str = "auto"

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


@dataclass
class TrainingConfig:
    """QLoRA supervised fine-tuning; one recipe for both arms (``raw`` and ``detox``).

    Attributes:
        base_model (`str`): ``facebook/opt-350m`` or ``zoo:opt``.
        load_in_4bit (`bool`, defaults to `True`): quantise the base model to 4-bit NF4 with bitsandbytes (QLoRA).
        lora (`dict`): keyword arguments of :class:`peft.LoraConfig` (``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``); target modules are checked against the model.
        sft (`dict`): keyword arguments of :class:`trl.SFTConfig` (``learning_rate``, ``num_train_epochs``,
            ``per_device_train_batch_size``, ``max_length``, ...).
        completion_only_loss (`bool`, defaults to `True`): loss on the continuation only, or on the whole text.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda``.
    """

    base_model: str = "facebook/opt-350m"
    load_in_4bit: bool = True
    lora: dict[str, Any] = field(
        default_factory=lambda: {
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
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
        num_samples (`int`, defaults to 25): sampled continuations per prompt (k).
        max_new_tokens (`int`, defaults to 20): length of each continuation.
        top_p (`float`, defaults to 0.9): nucleus sampling.
        temperature (`float`, defaults to 1.0): sampling temperature.
        batch_size (`int`, defaults to 32): prompts per generation batch.
        bootstrap_samples (`int`, defaults to 1000): bootstrap resamples for the 95% intervals.
        toxic_threshold (`float`, defaults to 0.5): a continuation at or above this is toxic (for TP).
        perplexity_model (`str` or `None`): model for the conditional perplexity; `None` uses the base model.
        prompt_template (`bool`, defaults to `True`): give every model the prompt in the training template
            (``"Prompt: {prompt}\nContinuation:"``), as the arms saw it in training; `False` gives the bare prompt.
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu`` or ``cuda`` for generation, scoring, perplexity.
    """

    scorers: list[str] = field(default_factory=lambda: ["facebook/roberta-hate-speech-dynabench-r4-target"])
    num_samples: int = 25
    max_new_tokens: int = 20
    top_p: float = 0.9
    temperature: float = 1.0
    batch_size: int = 32
    bootstrap_samples: int = 1000
    toxic_threshold: float = 0.5
    perplexity_model: str | None = None
    prompt_template: bool = True
    device: str = "auto"

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
        verify_tls (`bool`, defaults to `True`): verify the server's certificate.
        ca_bundle (`str` or `None`): CA bundle for verification (OpenShift's service CA, say).
        timeout (`float`, defaults to 60): seconds per request.
    """

    url: str | None = None
    grpc_target: str | None = None
    token_env: str = "MODEL_TOKEN"
    verify_tls: bool = True
    ca_bundle: str | None = None
    timeout: float = 60.0


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
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _check(
        not unknown,
        f"{name}.{unknown[0] if unknown else ''}",
        "is not a known field",
        f"use one of: {', '.join(sorted(known))}",
    )
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
    try:
        return Recipe(**values, **sections)
    except TypeError as exc:
        raise RecipeError(f"recipe: {exc}. Fix: check the top-level fields.") from exc


def load_recipe(name_or_path: str | os.PathLike[str], **overrides: Any) -> Recipe:
    """Load a recipe by name (``offline``, ``tutorial``) or from a YAML path.

    Args:
        name_or_path: a name of a file in `recipes/` or a path to a YAML file.
        **overrides: top-level fields to replace (``run_dir="runs/x"``, ``seed=1``); a dict for a section
            (``serving={"url": ...}``) merges into it. `None` values keep the recipe's.

    Raises:
        RecipeError: the recipe does not exist or a value is invalid.
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
        values = yaml.safe_load(path.read_text()) or {}
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
    return recipe_from_dict(values, default_name=path.stem)


def resolve_ref(ref: str) -> str:
    """Turn a model or dataset reference into something a loader takes.

    ``zoo:<name>`` becomes the local path of the offline zoo's artifact (built on first use); hub ids and local paths
    are returned as given (local paths made absolute, because some loaders read bare relative names as hub ids).
    """
    if ref.startswith("zoo:"):
        from detox_sft import offline  # local import: building the zoo is heavy and must not happen at import

        return str(offline.resolve(ref[len("zoo:") :]))
    local = Path(ref).expanduser()
    if local.exists():
        return str(local.resolve())
    return ref
