"""Small helpers the notebooks call: start a step, guard on an earlier step's output, record results, and show the
real objects of a step (a library config as the call that builds it, TMaRCo's token scores, tables).

They keep the notebooks' cells short (the logic is here, tested) and let the tests read back what a headless run
produced. Nothing here changes the caller's process: figures are ``matplotlib.figure.Figure`` objects (Jupyter shows a
cell's last one with ``%matplotlib inline``), tables are DataFrames.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from detox_sft import evaluation, rephrase
from detox_sft.clients import connect
from detox_sft.config import Recipe, load_recipe
from detox_sft.data import load_eval_prompts
from detox_sft.prompts import generation_prompt
from detox_sft.toxicity import load_scorer

__all__ = [
    "StepMissing",
    "ShownPath",
    "hub_reachable",
    "start",
    "require",
    "record",
    "recorded",
    "sample_prompts",
    "ask",
    "ask_grpc",
    "compare_arms",
    "ConfigView",
    "show_config",
    "training_table",
    "bucket_table",
    "survival_table",
    "as_table",
]

_STEP_HINTS = {
    "1-sft": "run notebooks/1-sft.ipynb first (or `detox-sft rephrase` and `detox-sft train`)",
    "2-eval": "run notebooks/2-eval.ipynb first (or `detox-sft evaluate`)",
    "3-save_convert_model": "run notebooks/3-save_convert_model.ipynb first (or `detox-sft export` and `detox-sft upload`)",
}


class StepMissing(FileNotFoundError):
    """An earlier step's output is missing; the message names the step to run."""


class ShownPath(type(Path())):  # PosixPath (WindowsPath on Windows): a subclass of Path itself needs Python 3.12
    """A :class:`~pathlib.Path` that a notebook shows as the path itself, not as ``PosixPath('...')``: what
    :func:`require` and :func:`record` return, the last expression of their cells (its ``repr`` stays a path's)."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's text/plain display
        printer.text(str(self))


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (respects HF_HUB_OFFLINE=1 as 'no')."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start(recipe: str | os.PathLike[str], run_dir: str | None = None, **overrides: Any) -> Recipe:
    """Load the notebook's recipe, create its run directory and say which profile runs where.

    For the tutorial profile without a reachable hub, prints how to run the offline profile instead.
    """
    loaded = load_recipe(recipe, run_dir=run_dir, **overrides)
    loaded.run_path.mkdir(parents=True, exist_ok=True)
    print(f"recipe {loaded.name!r} (profile {loaded.profile}); outputs in {loaded.run_path}")
    if loaded.profile == "tutorial" and not hub_reachable():
        print(
            "The Hugging Face hub cannot be reached from here, and the tutorial profile downloads facebook/opt-350m,\n"
            'bart-large and the datasets from it. Run the offline profile instead: set recipe = "offline" in the\n'
            "parameters cell, or run the whole tutorial headless with `make demo`."
        )
    return loaded


def require(path: str | os.PathLike[str], step: str) -> ShownPath:
    """Return ``path`` if it exists, else raise :class:`StepMissing` naming the notebook that produces it."""
    path = ShownPath(path)
    if not path.exists():
        hint = _STEP_HINTS.get(step, f"run {step} first")
        raise StepMissing(f"{path} is missing: {hint}.")
    return path


def _plain(value: Any) -> Any:
    """Dataclasses and paths as JSON-able data."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def record(recipe: Recipe, notebook: str, **values: Any) -> ShownPath:
    """Save a notebook's headline results (JSON) under ``<run_dir>/notebooks/<notebook>.json``; returns that path."""
    out = ShownPath(recipe.run_path, "notebooks", f"{notebook}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(out.read_text()) if out.exists() else {}
    current.update(_plain(values))
    out.write_text(json.dumps(current, indent=2, default=str))
    return out


def recorded(run_dir: str | os.PathLike[str], notebook: str) -> dict[str, Any]:
    """Read back what :func:`record` saved for a notebook (``<run_dir>/notebooks/<notebook>.json``)."""
    return json.loads((Path(run_dir) / "notebooks" / f"{notebook}.json").read_text())


def sample_prompts(recipe: Recipe, n: int = 5) -> list[str]:
    """The first ``n`` evaluation prompts of the recipe (the same ones notebook 2 used)."""

    return load_eval_prompts(recipe.data, recipe.seed)[:n]


def _served_input(prompt: str) -> str:
    # The served model is queried with the prompt it was tuned on.

    return generation_prompt(prompt)


def ask(client: Any, model_id: str, prompts: list[str], max_new_tokens: int = 20) -> Any:
    """Greedy answers of a served model to ``prompts`` (a DataFrame: prompt, answer, tokens, seconds)."""
    import time

    import pandas as pd

    rows = []
    for prompt in prompts:
        started = time.perf_counter()
        result = client.generate(model_id, _served_input(prompt), max_new_tokens=max_new_tokens, decoding="greedy")
        rows.append(
            {
                "prompt": prompt,
                "answer": result.text,
                "tokens": result.generated_tokens,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    return pd.DataFrame(rows)


def ask_grpc(recipe: Recipe, model_id: str, prompts: list[str], max_new_tokens: int = 20) -> Any:
    """The same greedy answers over gRPC; `None` (with a message) when no gRPC endpoint is configured."""
    if not recipe.serving.grpc_target:
        print("No gRPC endpoint configured (serving.grpc_target / the grpc_target parameter): skipped.")
        return None

    client = connect(recipe, url=recipe.serving.url, grpc_target=recipe.serving.grpc_target)
    return ask(client, model_id, prompts, max_new_tokens=max_new_tokens)


def compare_arms(recipe: Recipe, answers: Any, max_new_tokens: int = 20) -> Any:
    """The served (detox) model's answers beside the raw arm's greedy answers to the same prompts, with toxicity.

    The raw arm is generated locally from its adapter (``<run_dir>/adapters/raw``) with the same greedy decoding.
    """
    import dataclasses

    import pandas as pd

    require(recipe.paths.adapter_config("raw"), "1-sft")
    prompts = list(answers["prompt"])
    model, tokenizer = evaluation.load_arm_model(recipe, recipe.run_path, "raw")
    cfg = dataclasses.replace(recipe.evaluation, max_new_tokens=max_new_tokens)
    raw = [
        c[0]
        for c in evaluation.generate_continuations(
            model, tokenizer, [_served_input(p) for p in prompts], cfg, recipe.seed, greedy=True, progress=False
        )
    ]
    name = recipe.evaluation.scorers[0]
    scorer = load_scorer(name, revision=recipe.evaluation.scorer_revisions.get(name))
    detox = list(answers["answer"])
    return pd.DataFrame(
        {
            "prompt": prompts,
            "raw answer": raw,
            "detox answer (served)": detox,
            "raw toxicity": scorer(raw).round(3),
            "detox toxicity": scorer(detox).round(3),
        }
    )


# --------------------------------------------------------------------------------------------------------------------
# What the notebooks show of a step before the package runs it
# --------------------------------------------------------------------------------------------------------------------


class ConfigView:
    """A library config shown as the call that builds it: ``LoraConfig(r=16, ...)`` with the fields that differ from
    the class's defaults (Python syntax, highlighted in Jupyter). ``text`` is the call; ``fields`` its arguments."""

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.name = name
        self.fields = fields
        lines = [f"    {key}={_literal(value)}," for key, value in fields.items()]
        self.text = f"{name}(\n" + "\n".join(lines) + "\n)" if lines else name if name == "None" else f"{name}()"

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        formatter = HtmlFormatter(noclasses=True, nobackground=True, prestyles="font-family: monospace")
        return highlight(self.text, PythonLexer(), formatter)


def _literal(value: Any) -> str:
    """``repr`` a config value as it would be written in the call: enums by value, sets sorted, a nested config
    (``SFTConfig.accelerator_config``) by its own non-default fields, on one line."""
    import dataclasses
    import enum

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = show_config(value)
        return f"{inner.name}(" + ", ".join(f"{k}={_literal(v)}" for k, v in inner.fields.items()) + ")"
    if isinstance(value, enum.Enum):
        return repr(value.value)
    if isinstance(value, set | frozenset):
        return repr(sorted(value))
    return repr(value)


def show_config(config: Any, always: Any = ()) -> ConfigView:
    """``config`` (a ``BitsAndBytesConfig``, ``LoraConfig``, ``SFTConfig`` or any dataclass) as the call that builds
    it, with the fields that differ from the class's defaults: what the recipe changed, and what the library derived
    from it (``SFTConfig`` fills some fields in ``__post_init__``).

    Args:
        config: the object a mapper returned (e.g. :func:`detox_sft.training.get_peft_config`).
        always: names of fields to show even at their default (e.g. the recipe's ``training.sft`` keys).
    """
    import dataclasses

    if config is None:  # a mapper's "feature off" (e.g. training.load_in_4bit: false gives no quantisation config)
        return ConfigView("None", {})
    always = set(always)
    name = type(config).__name__
    if hasattr(config, "to_diff_dict"):  # a transformers config: compared with a default instance, as it diffs itself
        values, defaults = config.to_dict(), type(config)().to_dict()
        fields = {k: v for k, v in values.items() if not k.startswith("_") and (k in always or defaults.get(k, v) != v)}
        return ConfigView(name, fields)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"show_config: {name} is neither a dataclass nor a transformers config")
    fields = {}
    for f in dataclasses.fields(config):
        if not f.init or f.name.startswith("_") or f.name.endswith("_version"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        value = getattr(config, f.name)
        if f.name in always or default is dataclasses.MISSING or value != default:
            fields[f.name] = value
    return ConfigView(name, fields)


def training_table(train_results: dict[str, Any]) -> Any:
    """One row per arm of :func:`detox_sft.training.train_arms`' results: path, losses, steps, speed, memory, parameters."""
    import pandas as pd

    rows = {}
    for arm, result in train_results.items():
        m = result.metrics
        trainable, total = m.get("trainable_parameters"), m.get("total_parameters")
        rows[arm] = {
            "path": m.get("path"),
            "train loss": _round(m.get("train_loss"), 4),
            "eval loss": _round(m.get("final_eval_loss"), 4),
            "steps": m.get("global_step"),
            "wall time (s)": _round(m.get("wall_time_s"), 1),
            "samples/s": _round(m.get("samples_per_s"), 1),
            "peak memory (MiB)": round(m["peak_memory_bytes"] / 2**20) if m.get("peak_memory_bytes") else None,
            "trainable parameters": f"{trainable:,} of {total:,}" if trainable and total else None,
            "trained now": not result.skipped,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, int | float) else value


def bucket_table(objects: list[Any], prefix: str = "") -> Any:
    """The objects of a :func:`detox_sft.storage.list_prefix` listing as a table: key (under ``prefix``), size, ETag."""
    import pandas as pd

    start = len(prefix.rstrip("/")) + 1 if prefix else 0
    return pd.DataFrame(
        {
            "key": [o.key[start:] for o in objects],
            "size (KiB)": [round(o.size / 1024, 1) for o in objects],
            "ETag": [o.etag for o in objects],
        }
    )


def survival_table(train_set: str | os.PathLike[str], n: int = 5) -> Any:
    """How much of each rephrased training sample survives: :func:`detox_sft.rephrase.survival_table` of the
    continuations (what the detox arm learns), its first ``n`` rows, then the means over every rephrased sample; or a
    note when none was rephrased.

    Args:
        train_set: the detoxified training set (``cfg.paths.train_set("detox")``).
        n: sample rows to show.
    """
    import pandas as pd
    from IPython.display import Markdown

    table = rephrase.survival_table(train_set, field="continuation", n=n)
    means = table.attrs
    if not means["rephrased"]:
        return Markdown("TMaRCo rephrased no training sample: the detox arm was trained on the raw texts.")
    shown = table.round({"chrf": 1, "changed_word_share": 3, "toxicity_before": 3, "toxicity_after": 3})
    shown.index = [f"sample {i}" for i in range(len(shown))]
    mean = {
        "original": f"mean over the {means['rephrased']} rephrased samples",
        "rephrased": "",
        "chrf": round(means["mean_chrf"], 1),
        "changed_word_share": round(means["mean_changed_word_share"], 3),
        "toxicity_before": "",
        "toxicity_after": "",
    }
    labels = {
        "chrf": "chrF",
        "changed_word_share": "share of words changed",
        "toxicity_before": "toxicity before",
        "toxicity_after": "toxicity after",
    }
    return pd.concat([shown.astype(object), pd.DataFrame([mean], index=["all rephrased"])]).rename(columns=labels)


def as_table(value: Any) -> Any:
    """A dataclass (or a dict of them, one column each) as a two-column table a person reads: lists show as their
    length, paths as text. For the step summaries that have no table of their own (``ExportResult``, upload reports).
    """
    import dataclasses

    import pandas as pd

    def cells(obj: Any) -> dict[str, Any]:
        out = {}
        for key, item in (dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)).items():
            if isinstance(item, list | tuple | set):
                item = f"{len(item)} item(s)"
            elif isinstance(item, Path):
                item = str(item)
            out[key.replace("_", " ")] = item
        return out

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return pd.DataFrame({"value": cells(value)})
    return pd.DataFrame({str(k): cells(v) for k, v in value.items()})
