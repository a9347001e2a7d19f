"""Record a finished run's results in the repository, so README's numbers can be checked against them.

Copies from a run (``runs/<stamp>`` made by ``make demo``, or its ``run/`` directory) into a small committed record:

* ``results.json``: the evaluation's summary (``eval/results.json``) without per-continuation fields;
* ``summary.md``: its results tables (``eval/summary.md``);
* ``rephrase_summary.json``: the rephrase step's counts and toxicity before / after;
* ``notebooks/<name>.json``: what each notebook recorded (:func:`detox_sft.notebook.record`);
* ``record.json``: recipe, run, machine (platform, CPU model, cores), date, the headline numbers as README quotes them
  (:func:`detox_sft.evaluation.headline_numbers`), and from the demo's run directory: the provenance the demo took as
  it started (commit, clean tree, command, measured files: ``benchmarks/provenance.py`` says whether it is stale) and
  the CPU capability torch dispatched to in each notebook's kernel, with the recipe's CPU pins (``cpu``).

Run: ``.venv/bin/python benchmarks/record_run.py runs/<stamp> results/offline``. The record is written to a temporary
directory next to the target and swapped in whole; ``tests/test_results_record.py`` then checks README against it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from detox_sft.config import RunPaths
from detox_sft.evaluation import headline_numbers

__all__ = ["BIG_FIELDS", "find_run", "machine", "run_provenance", "record_run", "main"]

ROOT = Path(__file__).resolve().parents[1]
# per-continuation or per-prompt data: the record keeps summaries only
BIG_FIELDS = frozenset({"generations", "scores", "prompts", "continuations_table", "nll", "token_counts"})


def find_run(path: str | os.PathLike[str]) -> Path:
    """The run directory (the one holding ``eval/``) of a demo output ``runs/<stamp>`` or of a run directory.

    Raises:
        FileNotFoundError: no finished evaluation there.
    """
    path = Path(path).resolve()
    for candidate in (path / "run", path):
        if RunPaths(candidate).results.is_file():
            return candidate
    raise FileNotFoundError(
        f"no eval/results.json under {path} or {path / 'run'} — run `make demo` (or notebooks 1 and 2) first"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    """Where the run was recorded: platform, Python, CPU model, cores, torch and its GPU if any."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def run_provenance(run_dir: Path) -> dict[str, Any]:
    """What the demo wrote beside ``run_dir`` as it ran: ``{"provenance": ..., "cpu": {notebook: {"torch_cpu_capability",
    "env"}}}``, each key only when its files exist (notebooks run by hand leave neither)."""
    demo = run_dir.parent if run_dir.name == "run" else run_dir
    found: dict[str, Any] = {}
    if (demo / "provenance.json").is_file():
        found["provenance"] = json.loads((demo / "provenance.json").read_text())
    kernels = sorted((demo / "kernels").glob("*.json"))
    if kernels:
        found["cpu"] = {k.stem: json.loads(k.read_text()) for k in kernels}
    return found


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in BIG_FIELDS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def record_run(run: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write the record of ``run`` to ``out_dir`` (replacing an older record there); return ``out_dir/record.json``.

    Args:
        run: ``runs/<stamp>`` (a demo's output) or a run directory with ``eval/results.json``.
        out_dir: the record's directory, e.g. ``results/offline``.
    """
    run_dir = find_run(run)
    paths = RunPaths(run_dir)
    out_dir = Path(out_dir).resolve()
    summary = _strip(json.loads(paths.results.read_text()))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        files = ["results.json"]
        _write_json(tmp / "results.json", summary)
        if (paths.eval / "summary.md").is_file():
            shutil.copyfile(paths.eval / "summary.md", tmp / "summary.md")
            files.append("summary.md")
        rephrase = paths.data / "rephrase_summary.jsonl"
        if rephrase.is_file():
            _write_json(tmp / "rephrase_summary.json", json.loads(rephrase.read_text().splitlines()[0]))
            files.append("rephrase_summary.json")
        for nb in sorted((run_dir / "notebooks").glob("*.json")):
            _write_json(tmp / "notebooks" / nb.name, _strip(json.loads(nb.read_text())))
            files.append(f"notebooks/{nb.name}")
        demo_recipe = run_dir.parent / "recipe.json"
        record = {
            "recipe": summary.get("recipe"),
            "profile": summary.get("profile"),
            "run": str(run_dir.parent.name if run_dir.name == "run" else run_dir.name),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(paths.results.stat().st_mtime)),
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **run_provenance(run_dir),
            "machine": machine(),
            "headline_scorer": summary["headline_scorer"],
            "headline": headline_numbers(summary),
            "files": files,
        }
        if demo_recipe.is_file():
            _write_json(tmp / "recipe.json", json.loads(demo_recipe.read_text()))
            record["files"].append("recipe.json")
        _write_json(tmp / "record.json", record)
        old = out_dir.with_name(f".{out_dir.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "record.json"


def main(argv: list[str] | None = None) -> int:
    """``record_run.py RUN_DIR OUT_DIR``: write the record and print its headline numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="runs/<stamp> (from make demo) or a run directory")
    parser.add_argument("out", nargs="?", default=str(ROOT / "results" / "offline"), help="default: results/offline")
    args = parser.parse_args(argv)
    try:
        path = record_run(args.run, args.out)
    except FileNotFoundError as exc:
        print(f"record_run: {exc}", file=sys.stderr)
        return 1
    record = json.loads(path.read_text())
    commit = record["provenance"]["commit"][:7] if "provenance" in record else "unknown: no provenance.json"
    print(f"recorded {record['run']} ({record['recipe']}, commit {commit}) in {path.parent}")
    for key, text in record["headline"].items():
        print(f"  {key}: {text}")
    print("README.md must quote each of these (tests/test_results_record.py checks it).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
