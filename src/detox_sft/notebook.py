"""Helpers the notebooks call: :func:`start` a step, :func:`require` an earlier step's output, :func:`record` results
(read back with :func:`recorded`), and show tables; nothing here changes the caller's process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

from detox_sft import rephrase
from detox_sft.config import Recipe, load_recipe
from detox_sft.data import load_eval_prompts
from detox_sft.files import atomic_write_json

_STEP_HINTS = {
    "1-sft": "run notebooks/1-sft.ipynb first (or `detox-sft rephrase` and `detox-sft train`)",
    "2-eval": "run notebooks/2-eval.ipynb first (or `detox-sft evaluate`)",
    "3-save_convert_model": "run notebooks/3-save_convert_model.ipynb first (or `detox-sft export` and `detox-sft upload`)",
}


class StepMissing(FileNotFoundError):
    """An earlier step's output is missing; the message names the step to run."""


class ShownPath(type(Path())):  # PosixPath (WindowsPath on Windows): a subclass of Path itself needs Python 3.12
    """A :class:`~pathlib.Path` a notebook shows as the path, not ``PosixPath('...')`` (its ``repr`` is unchanged)."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's text/plain display
        printer.text(str(self))


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (respects HF_HUB_OFFLINE=1 as 'no')."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
            return True
    return False


def start(recipe: str | os.PathLike[str], run_dir: str | None = None, **overrides: Any) -> Recipe:
    """Load the notebook's recipe and create its run directory; without the hub, say how to run the offline profile."""
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
        raise StepMissing(f"{path} is missing: {_STEP_HINTS.get(step, f'run {step} first')}.")
    return path


def record(recipe: Recipe, notebook: str, **values: Any) -> ShownPath:
    """Save a notebook's headline results (JSON) under ``<run_dir>/notebooks/<notebook>.json``; returns that path."""
    out = ShownPath(recipe.run_path, "notebooks", f"{notebook}.json")
    current = json.loads(out.read_text()) if out.exists() else {}

    def plain(value: Any) -> Any:  # dataclasses as dicts; what else JSON cannot write (paths, numpy numbers) as text
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)

    atomic_write_json(out, current | values, indent=2, default=plain)
    return out


def recorded(run_dir: str | os.PathLike[str], notebook: str) -> dict[str, Any]:
    """Read back what :func:`record` saved for a notebook (``<run_dir>/notebooks/<notebook>.json``)."""
    return json.loads((Path(run_dir) / "notebooks" / f"{notebook}.json").read_text())


def sample_prompts(recipe: Recipe, n: int = 5) -> list[str]:
    """The first ``n`` evaluation prompts of the recipe (the same ones notebook 2 used)."""
    return load_eval_prompts(recipe.data, recipe.seed)[:n]


def survival_table(train_set: str | os.PathLike[str], n: int = 5) -> Any:
    """:func:`detox_sft.rephrase.survival_table` of ``train_set``'s continuations (what the detox arm learns): ``n``
    rows, then the means over every rephrased sample; or a note when none was rephrased."""
    import pandas as pd
    from IPython.display import Markdown

    table = rephrase.survival_table(train_set, field="continuation", n=n)
    means = table.attrs
    if not means["rephrased"]:
        return Markdown("TMaRCo rephrased no training sample: the detox arm was trained on the raw texts.")
    shown = table.round({"chrf": 1, "changed_word_share": 3, "toxicity_before": 3, "toxicity_after": 3})
    shown.index = [f"sample {i}" for i in range(len(shown))]
    mean = dict.fromkeys(shown.columns, "") | {
        "original": f"mean over the {means['rephrased']} rephrased samples",
        "chrf": round(means["mean_chrf"], 1),
        "changed_word_share": round(means["mean_changed_word_share"], 3),
    }
    labels = {"chrf": "chrF", "changed_word_share": "share of words changed"}  # the others: "_" -> " "
    table = pd.concat([shown.astype(object), pd.DataFrame([mean], index=["all rephrased"])])
    return table.rename(columns=lambda column: labels.get(column, column.replace("_", " ")))
