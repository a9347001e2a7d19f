"""Run configuration: dataclasses filled from the YAML recipes in `recipes/` by jsonargparse; the field docs are
`detox-sft --help`'s text. ``load_recipe("offline", ["--training.sft.learning_rate", "1e-4"])``."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"

# The two fine-tuned arms, trained with one recipe: on the raw and on the detoxified training set.
ARMS: tuple[str, ...] = ("raw", "detox")


class RecipeError(ValueError):
    """A recipe value is missing or invalid; the message names the field and the fix."""


def _check(ok: bool, name: str, problem: str, fix: str) -> None:
    if not ok:
        raise RecipeError(f"{name}: {problem}. Fix: {fix}.")


# A rule: a test of a field's value (any value: a YAML null, a direct constructor call) and the fix the error names.
_Rule = tuple[Callable[[Any], bool], str]


def _one_of(*choices: str, fix: str = "") -> _Rule:
    return (lambda v: v in choices, fix or "use " + " or ".join(map(repr, choices)))


def _names(text: str, rule: _Rule) -> dict[str, _Rule]:
    return dict.fromkeys(text.split(), rule)


_POSITIVE: _Rule = (lambda v: isinstance(v, int) and v > 0, "use a whole number >= 1")
_PROBABILITY: _Rule = (lambda v: 0 <= v <= 1, "use a number between 0 and 1")
_REF: _Rule = (bool, "give a hub id, a local path or a zoo: name")
_MAPPING: _Rule = (lambda v: isinstance(v, dict), "give the library class's keyword arguments as a mapping")

_FORMATS = ("auto", "jsonl", "parquet", "csv", "hub")

# What __post_init__ checks beyond the type, by field name (a name means the same in every section).
_RULES: dict[str, _Rule] = {
    **_names("batch_size bootstrap_samples max_chars max_concurrency max_new_tokens num_samples", _POSITIVE),
    **_names("eval_prompt_words num_eval_prompts ray_actors ray_block_size text_prompt_words", _POSITIVE),
    **_names("nontoxic_prompts seed", (lambda v: isinstance(v, int) and v >= 0, "use a whole number >= 0")),
    **_names("gate_threshold toxic_threshold", _PROBABILITY),
    **_names("train_dataset eval_dataset base_model", _REF),
    **_names("lora sft", _MAPPING),
    **_names(
        "prompt_field continuation_field text_field toxicity_field eval_text_field eval_label_field",
        (lambda v: v is None or (bool(v) and v.strip() == v), "name a column (dots reach nested fields), or set null"),
    ),
    **_names("format eval_format", _one_of(*_FORMATS, fix="use auto (by the reference), jsonl, parquet, csv or hub")),
    "num_train_samples": (lambda v: v is None or _POSITIVE[0](v), "use a whole number >= 1, or null"),
    "min_toxicity": (lambda v: v is None or _PROBABILITY[0](v), "use a number between 0 and 1, or null"),
    "test_size": (lambda v: 0 < v < 1, "use a fraction such as 0.1"),
    "expert_weights": (lambda v: len(v) == 2, "give two numbers: [anti_expert_weight, expert_weight]"),
    "mask_threshold": (lambda v: v > 0, "use a positive number; 1.2 is the MaRCo paper's value"),
    "engine": _one_of("batched", "trustyai"),
    "device": _one_of("auto", "cpu", "cuda"),
    "executor": _one_of("local", "ray", fix="use 'local' (this process) or 'ray' (a Ray Data pipeline)"),
    "scorers": (bool, "name at least one scorer"),
    "top_p": (lambda v: 0 < v <= 1, "use a value in (0, 1]"),
    "temperature": (lambda v: v > 0, "use a positive value"),
    "dtype": _one_of("float32", "float16", "bfloat16"),
    "model_id": (lambda v: bool(v) and "/" not in v, "use a plain name such as opt-350m-detox"),
    "prefix": (lambda v: bool(v) and not v.startswith("/"), "use a relative key prefix such as models/opt-350m-detox"),
    "profile": _one_of("tutorial", "offline"),
    "cpu_isa": (
        lambda v: v in (None, "avx2"),
        "use avx2 (the same numbers on any x86-64 CPU) or null (library default)",
    ),
}
_REVISION_OF = {"train_revision": "train_dataset", "eval_revision": "eval_dataset"}  # else <ref>_revision pins <ref>


def _check_revision(revision: str | None, ref: str | None, name: str, ref_name: str) -> None:
    if revision is None or (ref or "").startswith("zoo:"):
        return
    _check(
        re.fullmatch(r"[0-9a-f]{40}", revision) is not None,
        name,
        f"got {revision!r}, expected a full commit id (40 hex digits; a branch or tag can move)",
        "copy the commit id from the repository's history on huggingface.co, or set it to null (the newest)",
    )
    local = (ref or "").startswith((".", "/", "~")) or Path(ref or "").suffix in (".jsonl", ".json", ".csv", ".parquet")
    local = local or (bool(ref) and Path(ref).expanduser().exists())
    problem = (
        f"{ref_name} is {ref!r}, a local path: a revision pins a hub repository" if ref else f"{ref_name} is unset"
    )
    _check(ref is not None and not local, name, problem, f"set {name} to null, or {ref_name} to a hub id")


@dataclass
class _Checked:
    """A recipe section whose ``__post_init__`` checks each field by :data:`_RULES` and each ``*_revision``."""

    def __post_init__(self) -> None:
        section = "" if isinstance(self, Recipe) else type(self).__name__.removesuffix("Config").lower() + "."
        for name, value in vars(self).items():
            test, fix = _RULES.get(name, (None, ""))
            try:
                ok = test is None or test(value)
            except (TypeError, AttributeError):  # a value of another type
                ok = False
            _check(ok, section + name, f"got {value!r}", fix)
            if name.endswith("_revision"):
                ref = _REVISION_OF.get(name, name.removesuffix("_revision"))
                _check_revision(value, getattr(self, ref), section + name, section + ref)


@dataclass
class DataConfig(_Checked):
    """Where the training samples and the evaluation prompts come from.

    Attributes:
        train_dataset: hub id, local path (JSONL, Parquet or CSV file, or a directory of them) or zoo:rtp.
        train_split: split of train_dataset to read.
        train_revision: hub commit of train_dataset (40 hex digits); null reads the newest.
        format: how train_dataset is read: auto (by its suffix; else a directory or a hub id), jsonl, parquet, csv, hub.
        prompt_field: your data's prompt column (dots reach nested fields); null: the real-toxicity-prompts schema.
        continuation_field: your data's continuation column, given with prompt_field.
        text_field: instead of those two, one column of whole texts, split after text_prompt_words words.
        text_prompt_words: words of a text_field text that make its prompt.
        toxicity_field: the prompt's toxicity column for min_toxicity; null: prompt.toxicity or toxicity, else 0.
        num_train_samples: samples kept after filtering; null keeps all.
        test_size: share of the samples held out for the eval loss.
        min_toxicity: keep samples whose prompt toxicity reaches this (null counts as 0); null keeps all.
        max_chars: drop samples whose formatted text is longer.
        eval_dataset: hub id, local path or zoo:wiki_toxic.
        eval_split: split of eval_dataset.
        eval_revision: hub commit of eval_dataset.
        eval_format: how eval_dataset is read, as format.
        eval_text_field: the column whose first words are the prompts.
        eval_label_field: the column compared with eval_label.
        eval_label: keep eval rows with this label (1 = toxic); null keeps all.
        num_eval_prompts: eval prompts used.
        eval_prompt_words: words of a comment that make an eval prompt.
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
        super().__post_init__()
        pair = ("prompt_field", "continuation_field")
        fix = "map one text_field, or a prompt_field and a continuation_field"
        given = {name: getattr(self, name) for name in pair if getattr(self, name) is not None}
        _check(self.text_field is None or not given, "data.text_field", f"is set together with {given}", fix)
        for name, other in (pair, pair[::-1]):
            value = getattr(self, other)
            _check(name in given or value is None, f"data.{name}", f"is unset while data.{other} is {value!r}", fix)


@dataclass
class RephraseConfig(_Checked):
    """TMaRCo rephrasing of the toxic training samples.

    Attributes:
        base_model: the BART model that fills the masks (facebook/bart-large, zoo:bart-base).
        expert: the model trained on non-toxic text (trustyai/gplus, zoo:expert).
        anti_expert: the model trained on toxic text (trustyai/gminus, zoo:anti-expert).
        base_model_revision: hub commit of base_model (40 hex digits); null loads the newest.
        expert_revision: hub commit of expert.
        anti_expert_revision: hub commit of anti_expert.
        expert_weights: weights of the anti-expert and the expert logits.
        mask_threshold: mask a token whose disagreement over the sentence mean reaches this (MaRCo paper: 1.2).
        combine_original: show the experts the original tokens after a mask (else the left context only).
        gate_threshold: only samples whose toxicity reaches this are rephrased.
        scorer: the toxicity scorer of the gate (see detox_sft.toxicity).
        scorer_revision: hub commit of scorer (a hub classifier).
        engine: batched (ours) or trustyai (the reference).
        batch_size: sentences per batch of the batched engine.
        device: auto, cpu or cuda.
        executor: local (this process) or ray (a Ray Data pipeline; joins the cluster when RAY_ADDRESS is set).
        ray_actors: Ray actors, one CPU (or GPU) each.
        ray_block_size: records per Ray block, the unit of work and of resumption.
        keep_going: keep texts the engine fails on unchanged (rephrase_status: error) instead of failing.
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


@dataclass
class TrainingConfig(_Checked):
    """QLoRA supervised fine-tuning; one recipe for both arms (raw and detox).

    Attributes:
        base_model: the causal LM to tune: facebook/opt-350m, zoo:opt, zoo:llama, a hub id or a local directory.
        base_model_revision: hub commit of base_model, used wherever it loads (training, evaluation, export).
        load_in_4bit: quantise the base model to 4-bit NF4 with bitsandbytes (QLoRA).
        lora: peft.LoraConfig keyword arguments; target_modules null: the model type's linear layers.
        sft: trl.SFTConfig keyword arguments (hyperparameters, eval and checkpoint schedule); a recipe's replaces these.
        completion_only_loss: loss on the continuation only (else on the whole text).
        device: auto, cpu or cuda.
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


@dataclass
class EvaluationConfig(_Checked):
    """Toxicity evaluation of the generations (RealToxicityPrompts protocol).

    Attributes:
        scorers: toxicity scorers; the first is the headline one.
        scorer_revisions: hub commit (40 hex digits) of each hub-classifier scorer, by its name in scorers.
        num_samples: sampled continuations per prompt (k).
        max_new_tokens: tokens per continuation.
        top_p: nucleus sampling.
        temperature: sampling temperature.
        batch_size: prompts per generation batch.
        bootstrap_samples: bootstrap resamples for the 95% intervals.
        toxic_threshold: a continuation scored at or above this is toxic (for TP).
        perplexity_model: model of the conditional perplexity; null: the base model.
        perplexity_model_revision: hub commit of perplexity_model.
        prompt_template: give every model its prompt in the training template (else the bare prompt).
        device: auto, cpu or cuda, for generation, scoring and perplexity.
        executor: local (this process) or ray (Ray Data pipelines over actor pools; the same results).
        ray_actors: Ray actors per pool, one CPU (or GPU) each.
        nontoxic_prompts: also evaluate on this many non-toxic prompts (eval_dataset rows of label 0); 0: off.
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
        super().__post_init__()
        for scorer, revision in self.scorer_revisions.items():
            name = f"evaluation.scorer_revisions.{scorer}"
            _check(scorer in self.scorers, name, "is not one of evaluation.scorers", f"pin one of {self.scorers}")
            _check_revision(revision, scorer, name, "the scorer")


@dataclass
class ExportConfig(_Checked):
    """Merging the detox adapter and converting the model.

    Attributes:
        model_id: the served model's id (the caikit folder and the InferenceService name in manifests/).
        dtype: dtype of the merged weights: float32, float16 or bfloat16.
    """

    model_id: str = "opt-350m-detox"
    dtype: str = "float16"


@dataclass
class StorageConfig(_Checked):
    """Where the exported model goes in S3 (the data connection's bucket).

    Attributes:
        prefix: key prefix; the Caikit directory goes under <prefix>/caikit, the Hugging Face one under <prefix>/hf.
        max_concurrency: parallel transfers.
    """

    prefix: str = "models/opt-350m-detox"
    max_concurrency: int = 8


@dataclass
class ServingConfig:
    """How the notebooks and `detox-sft query` reach the model server.

    Attributes:
        url: the InferenceService URL (HTTP); null: a local server started by the demo.
        grpc_target: host:port of the gRPC endpoint.
        token_env: environment variable that holds the bearer token (never a command-line argument).
        token_file: file that holds the bearer token (a mounted service-account token), read instead of token_env.
        verify_tls: verify the server's certificate.
        ca_bundle: CA bundle for the verification (OpenShift's service CA, say).
        timeout: seconds per request.
    """

    url: str | None = None
    grpc_target: str | None = None
    token_env: str = "MODEL_TOKEN"
    token_file: str | None = None
    verify_tls: bool = True
    ca_bundle: str | None = None
    timeout: float = 60.0


def _under(*parts: str, doc: str) -> property:
    return property(lambda self: self.root.joinpath(*parts), doc=doc)


@dataclass(frozen=True)
class RunPaths:
    """The run directory's layout, the one place that names where each step writes (``paths.adapter("detox")``)."""

    root: Path

    data = _under("data", doc="``data/``: the raw and the detoxified training sets.")
    rephrase_cache = _under("rephrase", "cache", doc="``rephrase/cache``: the rephrase step's SQLite cache.")
    adapters = _under("adapters", doc="``adapters/``: one LoRA adapter per arm.")
    eval = _under("eval", doc="``eval/``: results.json, summary.md, generations.csv and the generation cache.")
    results = _under("eval", "results.json", doc="``eval/results.json``: the evaluation's summary (written last).")
    figures = _under("figures", doc="``figures/``: every PNG the notebooks show.")
    export = _under("export", doc="``export/``: what the export step writes.")
    hf_export = _under("export", "hf", doc="``export/hf``: the merged model as a Hugging Face directory (vLLM).")

    def train_set(self, arm: str) -> Path:
        """``data/train_<arm>.jsonl``: an arm's training set (the rephrase step writes both)."""
        return self.data / f"train_{arm}.jsonl"

    def adapter(self, arm: str) -> Path:
        """``adapters/<arm>``: an arm's adapter, tokenizer, training log and ``metrics.json``."""
        return self.adapters / arm

    def adapter_config(self, arm: str) -> Path:
        """``adapters/<arm>/adapter_config.json``: present once an arm's adapter is saved."""
        return self.adapter(arm) / "adapter_config.json"

    def caikit_export(self, model_id: str) -> Path:
        """``export/caikit/<model_id>``: the Caikit directory (config.yml + artifacts/)."""
        return self.export / "caikit" / model_id


@dataclass
class Recipe(_Checked):
    """One run configuration: a profile and one section per concern.

    Attributes:
        name: the recipe's name (default: the file's).
        profile: tutorial (hub ids, GPU) or offline (the local zoo, CPU).
        seed: one seed for sampling, shuffling and training.
        run_dir: where outputs go; null: runs/<name>.
        cpu_isa: avx2 pins the demo's CPU arithmetic to AVX2 (the same numbers on any x86-64 CPU); null: library defaults.
    """

    name: str
    profile: str
    seed: int = 42
    run_dir: str | None = None
    cpu_isa: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    rephrase: RephraseConfig = field(default_factory=RephraseConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

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
_LIBRARY = ("training.sft", "training.lora")


def recipe_names() -> list[str]:
    """Names of the recipes shipped in `recipes/`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@cache
def recipe_parser() -> ArgumentParser:
    """The recipe as a jsonargparse parser: one ``--<dotted name>`` flag per field, documented by its docstring."""
    parser = ArgumentParser(
        prog="recipe fields", usage=argparse.SUPPRESS, exit_on_error=False, allow_abbrev=False, add_help=False
    )
    parser.add_class_arguments(Recipe, fail_untyped=True)
    return parser


def _library_kwargs(name: str, values: Any, flags: dict[str, Any]) -> Any:
    """``training.sft`` / ``training.lora`` with their ``flags``, typed by trl.SFTConfig / peft.LoraConfig."""
    if not isinstance(values, dict):
        return values  # TrainingConfig.__post_init__ names the problem
    values = {**values, **flags}
    # Importing trl or peft (seconds: torch) imports bitsandbytes, whose CPU backend logs that it could not fetch an
    # optional 4-bit inference kernel; CPU training never uses it (compat.keep_bnb_4bit_trainable_on_cpu).
    # (config imports nothing from the package, so not compat.drop_log_messages)
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = lambda record: "Failed to load CPU gemm_4bit_forward" not in record.getMessage()  # noqa: E731
    bnb_logger.addFilter(notice)
    try:
        from peft import LoraConfig
        from trl import SFTConfig
    finally:
        bnb_logger.removeFilter(notice)
    label, cls = ("trl.SFTConfig", SFTConfig) if name == "training.sft" else ("peft.LoraConfig", LoraConfig)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values.keys() - known:
        best = difflib.get_close_matches(key, sorted(known), n=1)
        fix = f"use {name}.{best[0]}, the closest {label} field" if best else f"use the field names of {label}"
        raise RecipeError(f"{name}.{key}: is not a {label} field. Fix: {fix}.")
    # A text for a field that takes text stays as given: jsonargparse reads it as YAML, which turns TRL's
    # eval_strategy "no" into False.
    hints = typing.get_type_hints(cls)
    takes_text = {
        k for k, v in values.items() if isinstance(v, str) and str in (hints.get(k), *typing.get_args(hints.get(k)))
    }
    typed = {k: v for k, v in values.items() if k not in takes_text}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, skip=known - set(typed), fail_untyped=False)
    try:
        parsed = parser.parse_object(typed) if typed else {}
    except ArgumentError as exc:
        raise _recipe_error(exc, prefix=f"{name}.") from None
    return {key: value if key in takes_text else parsed[key] for key, value in values.items()}


def _library_flags(flags: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Split ``--training.{sft,lora}.FIELD VALUE`` off the other flags; values read as YAML but yes/no/on/off stay text."""
    library: dict[str, dict[str, Any]] = {}
    rest: list[str] = []
    tokens = iter(flags)
    for token in tokens:
        flag, has_value, text = token.partition("=")
        section = next((n for n in _LIBRARY if flag.startswith(f"--{n}.")), None)
        if section is None:
            rest.append(token)
            continue
        if not has_value and (text := next(tokens, None)) is None:
            raise RecipeError(f"{flag}: no value. Fix: give one, as in {flag} VALUE.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            value = text
        library.setdefault(section, {})[flag[len(section) + 3 :]] = value
    return library, rest


_FAILED_GROUP = re.compile(r"Group '([\w.]+)' does not accept option '([\w.]+)'")
_FAILED_KEY = re.compile(
    r"""^(?:Parser key "|Option '|unrecognized arguments: -*|argument -*|the following arguments are required: )"""
    r"([\w.]+)"
)


def _recipe_error(exc: ArgumentError, prefix: str = "") -> RecipeError:
    """jsonargparse's message as a RecipeError that starts with the field's dotted name and ends with the fix."""
    text = str(exc)
    group, key = _FAILED_GROUP.match(text), _FAILED_KEY.match(text)
    if not (group or key):
        return RecipeError(f"recipe: {text}. Fix: check the recipe and the flags (--help lists the fields).")
    name = prefix + (f"{group[1]}.{group[2]}" if group else key[1])
    if group or text.startswith(("Option", "unrecognized")):
        best = difflib.get_close_matches(name, list(recipe_parser().get_defaults().keys()), n=1)
        hint = f"did you mean {best[0]}? " if best else ""
        return RecipeError(f"{name}: is not a recipe field. Fix: {hint}--help lists the recipe's fields.")
    if text.startswith("argument"):
        return RecipeError(f"--{name}: {text.partition(': ')[2]}. Fix: give a value, as in --{name} VALUE.")
    if text.startswith("the following"):
        return RecipeError(f"{name}: is missing. Fix: add {name} to the recipe.")
    detail = " ".join(re.sub(r"<class '(\w+)'>", r"\1", text.partition("\n")[2]).split())
    detail = detail.replace("Expected a ", "expected ").replace(". Got value: ", ", got ")
    return RecipeError(f"{name}: {detail}. Fix: set {name} to a value of that type.")


def load_recipe(
    name_or_path: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    dotted: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Recipe:
    """Load a recipe by name (``offline``, ``tutorial``) or YAML path; raises RecipeError naming the field and fix.

    Applied in order: ``overrides`` (top-level fields; a dict merges into its section; `None` keeps the recipe's),
    ``dotted`` (``{"evaluation.num_samples": "2"}``), then ``args`` (``["--seed", "3"]``).
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        fix = f"use one of {recipe_names()} or the path of a YAML recipe file"
        raise RecipeError(f"recipe {str(name_or_path)!r} not found. Fix: {fix}.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise RecipeError(f"recipe {path}: not UTF-8 text ({where}). Fix: save the file as UTF-8.") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: not valid YAML ({exc}). Fix: correct the YAML syntax.") from exc
    _check(isinstance(values, dict), "recipe", "is not a YAML mapping", "write the recipe as field: value pairs")
    values = {"name": path.stem, **values}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in _SECTIONS:
            values[key] = {**(values.get(key) or {}), **{k: v for k, v in value.items() if v is not None}}
        elif value is not None:
            values[key] = value
    for section in _SECTIONS:
        if values.get(section, {}) is None:  # an empty section in YAML: the defaults
            del values[section]
        got = type(values.get(section)).__name__
        fix = f"write {section}: as a YAML mapping of field: value"
        _check(isinstance(values.get(section, {}), dict), section, f"must be a mapping, got {got}", fix)
    # training.sft / training.lora bypass the recipe parser, whose dict[str, Any] reads every text as YAML (TRL's
    # eval_strategy "no" would become False): _library_kwargs reads them against the TRL/PEFT classes.
    library_flags, flags = _library_flags([*(f"--{key}={text}" for key, text in (dotted or {}).items()), *args])
    training = values.get("training") or {}
    from_yaml = {f"training.{n}": training.pop(n) for n in ("sft", "lora") if isinstance(training.get(n), dict)}
    parser = recipe_parser()
    try:
        cfg = parser.parse_object(values)
        cfg = parser.parse_args(flags, namespace=cfg) if flags else cfg
    except ArgumentError as exc:
        raise _recipe_error(exc) from None
    # training.sft / training.lora: the recipe's mapping (else the default), then the flags
    sft, lora = (_library_kwargs(n, from_yaml.get(n, cfg[n]), library_flags.get(n, {})) for n in _LIBRARY)
    try:
        sections = vars(parser.instantiate(cfg))
        # set after instantiate, which would read their texts as YAML again
        training_cfg = dataclasses.replace(sections["training"], sft=sft, lora=lora)
        return Recipe(**{**sections, "training": training_cfg})
    except TypeError as exc:  # a YAML null in a field that takes none, reaching a comparison in __post_init__
        fix = "give every field a value of its type (null only where allowed)"
        raise RecipeError(f"recipe: {exc}. Fix: {fix}.") from exc
