"""Rehearse the tutorial at full size (``recipes/rehearsal.yaml``): run notebooks headless and record each one's wall
time, the GPU memory at its peak, and the token lengths behind the times.

    python -m detox_sft_dev.rehearsal --recipe rehearsal --notebooks 1-sft 2-eval --out rehearsal.json

The rehearsal's models have the hub models' shapes and random weights: random experts barely disagree (TMaRCo masks
little), a random OPT emits placeholder tokens that re-tokenize into several, and so on. Its times are those of its
token lengths, which may differ from the real models' ones, so :func:`rehearsal_report` puts them side by side.
``detox-sft-dev demo --recipe rehearsal`` runs all four notebooks with the local S3 and model server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.config import ARMS, Recipe, load_recipe
from detox_sft.data import read_jsonl
from detox_sft.files import atomic_write_json, read_json_or_none
from detox_sft.prompts import generation_prompt
from detox_sft.refs import resolve_ref
from detox_sft_dev.demo import NOTEBOOKS, execute_notebook

__all__ = ["GpuMemoryPoll", "rehearsal_report", "run_rehearsal"]

_GATED = ("rephrased", "unchanged", "error", "empty_continuation", "unchanged_continuation")


def _tokenizer(ref: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_ref(ref))


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    if not len(values):
        return {"n": 0, "mean": None, "max": None}
    return {"n": len(values), "mean": round(float(np.mean(values)), 1), "max": int(np.max(values))}


def _rephrase_part(recipe: Recipe) -> dict[str, Any] | None:
    """The rephrase step's time and the BART token lengths of what it worked on (gated samples, masked tokens)."""
    path = recipe.paths.train_set("detox")
    if not path.is_file():
        return None
    summary = read_jsonl(recipe.paths.data / "rephrase_summary.jsonl")[0]
    tok = _tokenizer(recipe.rephrase.base_model)
    gated = [r for r in read_jsonl(path) if r.get("rephrase_status") in _GATED]
    tokens = [len(tok.tokenize(r["sample"])) for r in gated]
    masked = sum((r.get("masked_text") or "").count(tok.mask_token) for r in gated)
    return {
        "seconds": round(summary["seconds"], 1),
        "samples": summary["total"],
        "gated": summary["gated"],
        "rephrased": summary["rephrased"],
        "gated_sample_tokens": _stats(tokens),
        "masked_token_share": round(masked / sum(tokens), 4) if tokens else None,
        "mean_chrf": summary.get("mean_chrf"),
    }


def _training_part(recipe: Recipe) -> dict[str, Any]:
    """Each arm's training time, memory and tokens per sample (from its metrics.json)."""
    out = {}
    for arm in ARMS:
        m = read_json_or_none(recipe.paths.adapter(arm) / "metrics.json")
        if not isinstance(m, dict):
            continue
        samples = (m.get("global_step") or 0) * (m.get("global_batch_size") or 0)
        seen = m.get("num_input_tokens_seen")
        out[arm] = {
            "wall_time_s": m.get("wall_time_s"),
            "train_runtime_s": m.get("train_runtime_s"),
            "steps": m.get("global_step"),
            "peak_memory_bytes": m.get("peak_memory_bytes"),
            "peak_memory_kind": m.get("peak_memory_kind"),
            "tokens_per_sample": round(seen / samples, 1) if seen and samples else None,
        }
    return out


def _evaluation_part(recipe: Recipe) -> dict[str, Any] | None:
    """The evaluation's times and the token lengths it ran on: prompts, continuations as scored, per model."""
    results = read_json_or_none(recipe.paths.results)
    if not isinstance(results, dict):
        return None
    import pandas as pd

    tok = _tokenizer(recipe.evaluation.perplexity_model or recipe.training.base_model)
    frame = pd.read_csv(recipe.paths.eval / "generations.csv", keep_default_na=False)
    prompts = list(dict.fromkeys(frame["prompt"].astype(str)))
    inputs = [generation_prompt(p) for p in prompts] if recipe.evaluation.prompt_template else prompts
    return {
        "timing": results.get("timing"),
        "prompts": results["num_prompts"],
        "samples_per_prompt": results["num_samples"],
        "max_new_tokens": recipe.evaluation.max_new_tokens,
        "model_input_tokens": _stats([len(ids) for ids in tok(inputs)["input_ids"]]),
        # the continuations' text re-tokenized, as the perplexity step scores it (placeholder tokens of a random
        # model re-tokenize into several)
        "continuation_tokens": {
            model: _stats(part["num_tokens"].to_numpy()) for model, part in frame.groupby("model", sort=False)
        },
        "nontoxic": (results.get("nontoxic") or {}).get("timing"),
    }


def rehearsal_report(run_dir: str | os.PathLike[str], recipe: str | os.PathLike[str] = "rehearsal") -> dict[str, Any]:
    """Each step's time beside the token lengths it ran on, read from a run directory (steps not run are `None`).

    Args:
        run_dir: the run directory (``runs/rehearsal``, or a demo's ``runs/<stamp>/run``).
        recipe: the recipe it ran (name or path).
    """
    loaded = load_recipe(recipe, run_dir=str(run_dir))
    return {
        "recipe": loaded.name,
        "run_dir": str(loaded.run_path),
        "models": {
            "training": loaded.training.base_model,
            "rephrase": [loaded.rephrase.base_model, loaded.rephrase.expert, loaded.rephrase.anti_expert],
            "scorers": loaded.evaluation.scorers,
        },
        "rephrase": _rephrase_part(loaded),
        "training": _training_part(loaded),
        "evaluation": _evaluation_part(loaded),
    }


class GpuMemoryPoll:
    """The highest GPU memory in use (all processes, every GPU, MiB) while it runs, from ``nvidia-smi`` every 0.5 s.

    Notebook kernels are processes of their own, so the device's view is the one that sees them. Without
    ``nvidia-smi`` (no GPU) :attr:`peak_mib` stays `None`.
    """

    def __init__(self, interval_ms: int = 500):
        self.interval_ms = interval_ms
        self.peak_mib: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuMemoryPoll:
        exe = shutil.which("nvidia-smi")
        if exe:
            query = [exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"]
            self._proc = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                used = int(line.strip())
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)


@contextlib.contextmanager
def _timed(record: dict[str, Any]) -> Iterator[None]:
    started = time.perf_counter()
    with GpuMemoryPoll() as poll:
        try:
            yield
        finally:
            record["wall_s"] = round(time.perf_counter() - started, 1)
            record["peak_gpu_memory_mib"] = poll.peak_mib


def run_rehearsal(
    recipe: str = "rehearsal",
    notebooks: Sequence[str] = NOTEBOOKS[:2],
    out: str | os.PathLike[str] = "runs/rehearsal/rehearsal.json",
    run_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run ``notebooks`` headless on ``recipe``; write each one's wall time and peak GPU memory, and the report.

    The executed notebooks go beside ``out``; the JSON is written after every notebook (a crash keeps the ones
    before), and an earlier run's entries for other notebooks are kept, so notebooks can run one per call (notebook
    2 reads notebook 1's adapters from the same run directory). Notebooks 3 and 4 need the local S3 and model
    server: run them with ``detox-sft-dev demo``.

    Returns:
        What was written to ``out``: ``notebooks`` (wall time, peak GPU memory in MiB) and :func:`rehearsal_report`.
    """
    import torch

    loaded = load_recipe(recipe, run_dir=None if run_dir is None else str(run_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = {"recipe": str(recipe), "run_dir": str(loaded.run_path.resolve())}
    with GpuMemoryPoll() as idle:
        time.sleep(1.0)
    earlier = read_json_or_none(out)
    record: dict[str, Any] = {
        "recipe": loaded.name,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_before_mib": idle.peak_mib,
        "notebooks": dict(earlier.get("notebooks") or {}) if isinstance(earlier, dict) else {},
    }
    for name in notebooks:
        entry: dict[str, Any] = {}
        record["notebooks"][name] = entry
        try:
            with _timed(entry):
                execute_notebook(name, out.parent, params)
        finally:
            record["report"] = rehearsal_report(loaded.run_path, recipe)
            atomic_write_json(out, record, indent=2)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m detox_sft_dev.rehearsal``: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="rehearsal", help="recipe name or path (default: rehearsal)")
    parser.add_argument("--notebooks", nargs="+", default=list(NOTEBOOKS[:2]), choices=NOTEBOOKS)
    parser.add_argument("--out", default="runs/rehearsal/rehearsal.json", help="where the JSON goes")
    parser.add_argument("--run-dir", default=None, help="the run directory (default: the recipe's)")
    args = parser.parse_args(argv)
    record = run_rehearsal(args.recipe, args.notebooks, args.out, args.run_dir)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
