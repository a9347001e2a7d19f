"""Small helpers the notebooks call: start a step, guard on an earlier step's output, record results, and show the
real objects of a step (TMaRCo's token scores, tables).

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

from detox_sft import rephrase
from detox_sft.config import Recipe, load_recipe
from detox_sft.data import load_eval_prompts

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
