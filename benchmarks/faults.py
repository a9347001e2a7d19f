"""Fault injection: kill each long step with SIGKILL inside its work, rerun it, compare with an uninterrupted run.

For each step (rephrase, train, evaluate, export, upload, download), on the offline recipe shrunk so that a run does
a few seconds of work (:data:`SHRINK`):

1. a reference run, uninterrupted, from the step's inputs (the previous step's reference output). The step's child
   writes a start file right before it calls the step; from then on the harness watches the step's unit of progress
   (:data:`PROGRESS`, declared before any measurement) and records when each level was reached, on the step's
   :data:`CLOCK` (the child's CPU time for the compute-bound steps, whose wall time varies several-fold with the load
   of this shared box; wall time for upload and download);
2. killed trials from the same inputs in the same run directory: the step runs in a child forked from a :func:`zygote`
   that imported the libraries before any trial (its start-up is outside every clock). A trial draws its kill target
   in progress space (seeded, in the third of the progress that has the fewest kills so far), waits until the
   observed progress reaches the target's unit, then for the seeded part of that unit's reference duration, and
   SIGKILLs the child's process group. The trial's third is the progress read right after the kill, not the plan. A
   kill that found the step not started or done (its done marker written, or the child exited) is "not interrupted"
   and does not count; trials go on until each third has ``--trials`` interrupting kills (bounded);
3. what the kill left is recorded (the moment and the progress at the kill, its phase, the finished units, whether
   the step's completion marker says done and whether that output is complete), the step is rerun to the end, and its
   output is compared with the reference.

What "lost" means is fixed per step in :data:`LOSS`, before any measurement. One JSON record per trial goes to
``benchmarks/results/faults/<step>/seed<seed>-<trial>.json`` with the provenance of the run (benchmarks/provenance.py);
FAULTS.md is generated from those records (:func:`write_report`) and ``tests/test_faults.py`` checks it.

Run: ``make faults`` (= ``.venv/bin/python benchmarks/faults.py --trials 4``); ``--steps rephrase export`` for some
steps, ``--report`` to regenerate FAULTS.md only. Records already written for the same seed and trial are kept
(``--redo`` to run them again), so an interrupted harness resumes. Upload and download run against a local S3 server
(:class:`detox_sft_dev.s3.LocalS3`) started by the harness, through benchmarks/s3.py's ``DelayProxy`` (a round trip
of :data:`TRANSFER` ``delay_s`` x 2), with s3transfer's bandwidth limit set in the child, so that a transfer takes
several seconds. The children run the steps' Python API, as the CLI and the notebooks do (:func:`child`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "STEPS",
    "LOSS",
    "PROGRESS",
    "SHRINK",
    "Harness",
    "kill_target",
    "plan_kill",
    "third",
    "thirds",
    "load_records",
    "render_report",
    "write_report",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "faults"
REPORT = ROOT / "FAULTS.md"
COMMAND = ".venv/bin/python benchmarks/faults.py --trials 4 --seed 0"  # what `make faults` runs first
ENV_COMMAND = ".venv/bin/python benchmarks/faults_env.py --trials 2 --seed 0"  # and then (faults_env.COMMAND)
STEPS = ("rephrase", "train", "evaluate", "export", "upload", "download")
ARMS = ("raw", "detox")  # detox_sft.config.ARMS (the harness process does not import torch or the package's steps)
EVAL_MODELS = ("base", "raw", "detox")
MAX_FRACTION = 0.95  # fractions(): the kill moments of benchmarks/faults_env.py
# The clock a kill's delay inside a unit runs on. CPU time (the child's, all threads) for the compute-bound steps: on
# this shared box the wall time of the same run varies several-fold with the load, its CPU time less (OpenMP threads
# spinning still inflate it: rephrase 2.8 CPU s at a load of 1, 7.6 at 8; a trial scales by its own pace). Wall time
# for the transfers, which mostly wait on the S3 server (another process).
CLOCK = {"rephrase": "cpu", "train": "cpu", "evaluate": "cpu", "export": "cpu", "upload": "wall", "download": "wall"}

# The offline recipe, cut down: 40 samples (32 train / 8 test: 4 QLoRA steps per arm, a checkpoint after each), TMaRCo
# in batches of 4 (each a cache commit), 6 eval prompts x 2 samples x 8 tokens for base, raw and detox.
SHRINK: dict[str, Any] = {
    "data": {"num_train_samples": 40, "test_size": 0.2, "num_eval_prompts": 6},
    "rephrase": {"batch_size": 4},
    "training": {
        "sft": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "save_steps": 1,
            "save_total_limit": 2,
        }
    },
    "evaluation": {"num_samples": 2, "max_new_tokens": 8, "batch_size": 8, "bootstrap_samples": 200},
}

# What counts as lost, per step: written before the first measurement and printed in FAULTS.md.
LOSS: dict[str, str] = {
    "rephrase": "Finished unit: a batch of TMaRCo outputs committed to the SQLite cache (`rephrase/cache`). Lost: an "
    "output the killed run had committed is computed again by the rerun (the rerun reads fewer outputs from the cache "
    "than the kill left there), or the rerun's `data/train_raw.jsonl` or `data/train_detox.jsonl` differs from the "
    "uninterrupted run's by one byte, or `data/rephrase_summary.jsonl` differs in anything but its wall time and its "
    "computed/cached split. Done marker: `data/train_detox.jsonl` (what training reads).",
    "train": "Finished units: an arm whose `metrics.json` (its done marker, written last) exists, and each complete "
    "checkpoint (its `trainer_state.json`, which the Trainer writes last, is readable). Lost: a finished arm trained "
    "again (its `metrics.json` rewritten), an unfinished arm resumed from an earlier checkpoint than the newest "
    "complete one the kill left (or from scratch despite it), or final outputs that differ from the uninterrupted "
    "run's: the adapter's tensors by more than 1e-4 (max abs), `adapter_config.json` and the tokenizer files by one "
    "byte, `global_step`, `epochs` and `num_input_tokens_seen` at all, `train_loss`, `final_eval_loss` or any logged "
    "train/eval loss by more than 1e-3. Timing, speed, memory and `resumed_from` are not compared.",
    "evaluate": "Finished unit: a model's generation cache (`eval/generations_<model>.json`) present when the run "
    "was killed. Lost: such a cache generated again by the rerun (the file replaced), or final outputs that differ "
    "from the uninterrupted run's: each `generations_<model>.json`, `generations.csv`, `summary.md` and both "
    "figures by one byte, `results.json` in anything but its `timing`. Done marker: `eval/results.json` (written last).",
    "export": "No partial units: an export is all or nothing. Lost: after the rerun a file of `export/` differs from "
    "the uninterrupted run's by one byte (caikit's `config.yml`: apart from its `created`/`saved` times and its random "
    "`tracking_id`), or a file is missing or extra. Done marker: the `export/` directory itself (what `upload` ships): "
    "visible after the kill and not equal to the reference is a false done.",
    "upload": "Finished unit: an object under the prefixes (S3 shows an object only once it is whole). Lost: an object "
    "the killed run had finished is uploaded again by the rerun (it is in the rerun's `uploaded` list), or after the "
    "rerun the objects differ from the uninterrupted upload's (key below the prefix, size, ETag) or the completion "
    "marker's manifest differs (its time and prefix aside). Done marker: `<prefix>/.detox-sft-upload.json` of each of "
    "caikit and hf.",
    "download": "Finished unit: a file under its final name in the destination (it is renamed there once its SHA-256 "
    "is verified). Lost: such a file downloaded again by the rerun (it is in the rerun's `downloaded` list), or after "
    "the rerun a file differs from the uninterrupted download's by one byte, or is missing or extra. No done marker "
    "(a download reports done by finishing): a file visible under its final name after the kill that differs from the "
    "reference is a false done.",
}
# hidden temporary names a killed writer can leave (s3transfer adds a suffix of its own to the download's); not
# outputs: reported as litter when the rerun keeps them
_LITTER = (".tmp", ".detox-sft-part")
_WALL_RUNS = 3  # a wall-clock step's duration: the shortest of this many uninterrupted runs (the load varies)
# Upload and download: a round trip of 2 x delay_s through the DelayProxy (each request pays it, as between a workbench
# and an object store), and s3transfer's own bandwidth limit (TransferConfig.max_bandwidth) in the child so that the
# bytes flow over seconds: the export is a few MB, which loopback moves in milliseconds.
TRANSFER = {"delay_s": 0.025, "bytes_per_s": 2**20}
EXPORT_PHASES = ("merging, saving the merged model", "converting to Caikit", "checking the Caikit model")


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------


def fractions(seed: int, step: str, n: int, block: int = 0) -> list[float]:
    """The kill moments of ``n`` trials of a step as fractions of its reference duration: one seeded uniform draw in
    each of ``n`` equal slices of [0, MAX_FRACTION), in a seeded order. ``block`` > 0 draws a further set (for the
    trials that replace runs which ended before their kill)."""
    rng = random.Random(f"{seed}:{step}:{block}")
    values = [(i + rng.random()) * MAX_FRACTION / n for i in range(n)]
    rng.shuffle(values)
    return values


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_mtime_ns]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _files(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _is_litter(rel: str) -> bool:
    return any(part.startswith(".") and any(mark in part for mark in _LITTER) for part in rel.split("/"))


def _litter(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*") if _is_litter(p.name))


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _compare_digests(ref: dict[str, Any], got: dict[str, Any], what: str) -> list[str]:
    diffs = [f"{what}: {k} missing" for k in sorted(set(ref) - set(got))]
    diffs += [f"{what}: {k} extra" for k in sorted(set(got) - set(ref))]
    diffs += [f"{what}: {k} differs" for k in sorted(set(ref) & set(got)) if ref[k] != got[k]]
    return diffs


# --------------------------------------------------------------------------------------------------------------------
# the steps: what each one's finished units, done marker and outputs are
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """Where a run of a step works: the run directory, the S3 prefix its upload writes to, the local S3."""

    run: Path
    prefix: str
    ref_prefix: str
    s3: Any = None

    def client(self) -> Any:
        return self.s3.client()

    def bucket(self) -> str:
        return self.s3.bucket


@dataclass
class Step:
    """One step under test: its units, done marker, outputs and the comparison with the reference.

    Attributes:
        name: the step.
        units: the finished units in a run directory now (name -> identity).
        done: whether the step's completion marker says it is done.
        outputs: the final outputs, in comparable form.
        compare: differences between reference and trial outputs.
        redone: finished units of the kill that the rerun did again, from the units at the kill, after the rerun and
            the rerun's own report.
        phase: what the run was doing, read from what it left.
        done_parts: for a partly done step (train arms, upload kinds), which parts' outputs the marker vouches for.
    """

    name: str
    units: Callable[[Ctx], dict[str, Any]]
    done: Callable[[Ctx], bool]
    outputs: Callable[[Ctx], dict[str, Any]]
    compare: Callable[[dict[str, Any], dict[str, Any]], list[str]]
    redone: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], list[str]]
    phase: Callable[[Ctx, dict[str, Any]], str]
    done_parts: Callable[[Ctx], list[str]] = field(default=lambda ctx: [])


# -- rephrase ---------------------------------------------------------------------------------------------------------


def _rephrase_units(ctx: Ctx) -> dict[str, Any]:
    db = ctx.run / "rephrase" / "cache" / "rephrase.sqlite"
    if not db.is_file():
        return {}
    # a plain connection: it rolls back a hot journal the kill left, as the rerun's will
    conn = sqlite3.connect(db, timeout=60)
    try:
        rows = conn.execute("SELECT k FROM out").fetchall()
    except sqlite3.OperationalError:  # the kill came before the table was created
        rows = []
    finally:
        conn.close()
    return {k: 1 for (k,) in rows}


def _rephrase_outputs(ctx: Ctx) -> dict[str, Any]:
    data = ctx.run / "data"
    out = {name: _sha(data / name) for name in ("train_raw.jsonl", "train_detox.jsonl") if (data / name).is_file()}
    summary = data / "rephrase_summary.jsonl"
    if summary.is_file():
        row = json.loads(summary.read_text().splitlines()[0])
        out["rephrase_summary.jsonl"] = {k: v for k, v in row.items() if k not in ("seconds", "computed", "cached")}
    return out


def _rephrase_redone(at_kill: dict[str, Any], after: dict[str, Any], report: dict[str, Any]) -> list[str]:
    cached = int(report.get("cached", 0))
    return [f"{len(at_kill) - cached} cached output(s) computed again"] if cached < len(at_kill) else []


def _rephrase_phase(ctx: Ctx, units: dict[str, Any]) -> str:
    data = ctx.run / "data"
    if (data / "rephrase_summary.jsonl").is_file():
        return "finished"
    if (data / "train_detox.jsonl").is_file():
        return "writing the summary"
    if units:
        return f"rephrasing ({len(units)} outputs cached)"
    if (ctx.run / "rephrase" / "cache" / "rephrase.sqlite").is_file():
        return "gating / loading TMaRCo"
    if (data / "train_raw.jsonl").is_file():
        return "opening the cache"
    return "start-up (imports, data)"


# -- train ------------------------------------------------------------------------------------------------------------


def _complete_checkpoints(arm_dir: Path) -> list[int]:
    steps = []
    for path in (arm_dir / "checkpoints").glob("checkpoint-*"):
        step = path.name.rpartition("-")[2]
        if step.isdigit() and isinstance(_read_json(path / "trainer_state.json"), dict):
            steps.append(int(step))
    return sorted(steps)


def _train_units(ctx: Ctx) -> dict[str, Any]:
    units: dict[str, Any] = {}
    for arm in ARMS:
        arm_dir = ctx.run / "adapters" / arm
        marker = arm_dir / "metrics.json"
        if isinstance(_read_json(marker), dict):
            units[f"{arm}:done"] = _identity(marker)
        checkpoints = _complete_checkpoints(arm_dir)
        if checkpoints:
            units[f"{arm}:checkpoint"] = checkpoints[-1]
    return units


def _train_done_parts(ctx: Ctx) -> list[str]:
    return [arm for arm in ARMS if isinstance(_read_json(ctx.run / "adapters" / arm / "metrics.json"), dict)]


_ARM_OWN_FILES = ("metrics.json", "log_history.json", "adapter_model.safetensors")
_EXACT_METRICS = ("global_step", "epochs", "num_input_tokens_seen", "num_train_samples", "num_eval_samples")
_LOSS_TOLERANCE = 1e-3
_TENSOR_TOLERANCE = 1e-4


def _train_outputs(ctx: Ctx, arms: tuple[str, ...] = ARMS) -> dict[str, Any]:
    from safetensors.numpy import load_file

    out: dict[str, Any] = {}
    for arm in arms:
        arm_dir = ctx.run / "adapters" / arm
        metrics = _read_json(arm_dir / "metrics.json")
        if not isinstance(metrics, dict):
            continue
        files = {rel: _sha(p) for rel, p in _files(arm_dir).items() if rel not in _ARM_OWN_FILES and "/" not in rel}
        weights = arm_dir / "adapter_model.safetensors"
        tensors = load_file(str(weights)) if weights.is_file() else {}
        out[arm] = {
            "files": files,
            "tensors": tensors,
            "exact": {k: metrics.get(k) for k in _EXACT_METRICS},
            "losses": {
                "train_loss": metrics.get("train_loss"),
                "final_eval_loss": metrics.get("final_eval_loss"),
                **{
                    f"{kind}@{p['step']}": p["loss"]
                    for kind in ("train", "eval")
                    for p in (metrics.get("loss_curve") or {}).get(kind, [])
                },
            },
        }
    return out


def _train_compare(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    import numpy as np

    diffs = [f"{arm}: not trained" for arm in ref if arm not in got]
    for arm in [a for a in ref if a in got]:
        r, g = ref[arm], got[arm]
        diffs += _compare_digests(r["files"], g["files"], arm)
        if set(r["tensors"]) != set(g["tensors"]):
            diffs.append(f"{arm}: adapter tensors differ in names")
        else:
            worst = max((float(np.max(np.abs(r["tensors"][k] - g["tensors"][k]))) for k in r["tensors"]), default=0)
            if worst > _TENSOR_TOLERANCE:
                diffs.append(f"{arm}: adapter tensors differ by up to {worst:.2e}")
        diffs += [
            f"{arm}: {k} {r['exact'][k]} != {g['exact'][k]}" for k in r["exact"] if r["exact"][k] != g["exact"][k]
        ]
        for k, value in r["losses"].items():
            other = g["losses"].get(k)
            if (value is None) != (other is None) or (value is not None and abs(value - other) > _LOSS_TOLERANCE):
                diffs.append(f"{arm}: {k} {value} != {other}")
        diffs += [f"{arm}: logged loss {k} extra" for k in sorted(set(g["losses"]) - set(r["losses"]))]
    return diffs


def _train_redone(at_kill: dict[str, Any], after: dict[str, Any], report: dict[str, Any]) -> list[str]:
    redone = []
    for arm in ARMS:
        if f"{arm}:done" in at_kill:
            if after.get(f"{arm}:done") != at_kill[f"{arm}:done"]:
                redone.append(f"{arm} was finished and was trained again")
            continue
        newest = at_kill.get(f"{arm}:checkpoint")
        resumed = (report.get(arm) or {}).get("resumed_from")
        if newest is not None and resumed != f"checkpoint-{newest}":
            redone.append(f"{arm} resumed from {resumed}, not from checkpoint-{newest}")
    return redone


def _train_phase(ctx: Ctx, units: dict[str, Any]) -> str:
    for arm in ARMS:
        arm_dir = ctx.run / "adapters" / arm
        if f"{arm}:done" in units:
            continue
        if (arm_dir / "adapter_model.safetensors").is_file():
            return f"{arm}: saving"
        checkpoints = _complete_checkpoints(arm_dir)
        if checkpoints:
            return f"{arm}: training (checkpoint-{checkpoints[-1]} saved)"
        if (arm_dir / "checkpoints").is_dir():
            return f"{arm}: training (first step)"
        return "start-up (imports, data, model)" if arm == ARMS[0] else f"{arm}: start-up (model)"
    return "finished"


# -- evaluate ---------------------------------------------------------------------------------------------------------


def _eval_units(ctx: Ctx) -> dict[str, Any]:
    eval_dir = ctx.run / "eval"
    return {
        m: _identity(eval_dir / f"generations_{m}.json")
        for m in EVAL_MODELS
        if isinstance(_read_json(eval_dir / f"generations_{m}.json"), dict)
    }


def _eval_outputs(ctx: Ctx) -> dict[str, Any]:
    eval_dir, figures = ctx.run / "eval", ctx.run / "figures"
    out: dict[str, Any] = {
        f"eval/{p.name}": _sha(p)
        for p in [*(eval_dir / f"generations_{m}.json" for m in EVAL_MODELS), eval_dir / "generations.csv"]
        + [eval_dir / "summary.md"]
        if p.is_file()
    }
    out.update({f"figures/{p.name}": _sha(p) for p in sorted(figures.glob("eval_*.png"))})
    results = _read_json(eval_dir / "results.json")
    if isinstance(results, dict):
        out["eval/results.json"] = json.dumps(_without_timing(results), sort_keys=True)
    return out


def _without_timing(value: Any) -> Any:
    """``value`` without its ``timing`` entries, at any depth (wall times are not outputs)."""
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k != "timing"}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _eval_redone(at_kill: dict[str, Any], after: dict[str, Any], report: dict[str, Any]) -> list[str]:
    return [f"generations of {m} made again" for m, ident in at_kill.items() if after.get(m) != ident]


def _eval_phase(ctx: Ctx, units: dict[str, Any]) -> str:
    if (ctx.run / "eval" / "results.json").is_file():
        return "finished"
    if len(units) == len(EVAL_MODELS):
        return "scoring, perplexity, writing"
    if units or (ctx.run / "eval").is_dir():
        return f"generating ({len(units)} of {len(EVAL_MODELS)} models cached)"
    return "start-up (imports, scorers)"


# -- export -----------------------------------------------------------------------------------------------------------


def _export_outputs(ctx: Ctx) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for rel, path in _files(ctx.run / "export").items():
        if _is_litter(rel):
            continue
        if path.name == "config.yml":
            config = yaml.safe_load(path.read_text())
            out[rel] = {k: v for k, v in config.items() if k not in ("created", "saved", "tracking_id")}
        else:
            out[rel] = _sha(path)
    return out


def _export_phase(ctx: Ctx, units: dict[str, Any]) -> str:
    return "finished" if (ctx.run / "export").is_dir() else EXPORT_PHASES[_export_progress(ctx)]


# -- upload / download ------------------------------------------------------------------------------------------------

_KINDS = ("caikit", "hf")
_MARKER = ".detox-sft-upload.json"
_LOCK = ".detox-sft-upload.lock"


def _objects(ctx: Ctx, prefix: str) -> dict[str, dict[str, Any]]:
    client, found = ctx.client(), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=ctx.bucket(), Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix.rstrip("/")) + 1 :]
            found[rel] = {"size": obj["Size"], "etag": obj["ETag"].strip('"')}
    return found


def _upload_units(ctx: Ctx) -> dict[str, Any]:
    units = {}
    for kind in _KINDS:
        for rel, obj in _objects(ctx, f"{ctx.prefix}/{kind}").items():
            if rel.rsplit("/", 1)[-1] not in (_MARKER, _LOCK):
                units[f"{ctx.prefix}/{kind}/{rel}"] = obj["etag"]
    return units


def _upload_done_parts(ctx: Ctx) -> list[str]:
    return [kind for kind in _KINDS if _MARKER in _objects(ctx, f"{ctx.prefix}/{kind}")]


def _upload_outputs(ctx: Ctx, prefix: str | None = None) -> dict[str, Any]:
    prefix = prefix or ctx.prefix
    out: dict[str, Any] = {}
    for kind in _KINDS:
        objects = _objects(ctx, f"{prefix}/{kind}")
        if _MARKER not in objects:
            continue
        body = ctx.client().get_object(Bucket=ctx.bucket(), Key=f"{prefix}/{kind}/{_MARKER}")["Body"].read()
        manifest = json.loads(body)
        out[kind] = {
            "objects": {rel: obj for rel, obj in objects.items() if rel.rsplit("/", 1)[-1] not in (_MARKER, _LOCK)},
            "manifest": manifest.get("files"),
        }
    return out


def _upload_compare(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    diffs = [f"{kind}: no completion marker" for kind in ref if kind not in got]
    for kind in [k for k in ref if k in got]:
        diffs += _compare_digests(ref[kind]["objects"], got[kind]["objects"], kind)
        if ref[kind]["manifest"] != got[kind]["manifest"]:
            diffs.append(f"{kind}: manifest differs")
    return diffs


def _upload_redone(at_kill: dict[str, Any], after: dict[str, Any], report: dict[str, Any]) -> list[str]:
    uploaded = {key for r in report.values() for key in r.get("uploaded", [])}
    return [f"{key} uploaded again" for key in sorted(set(at_kill) & uploaded)]


def _upload_phase(ctx: Ctx, units: dict[str, Any]) -> str:
    done = _upload_done_parts(ctx)
    if len(done) == len(_KINDS):
        return "finished"
    if units:
        return f"uploading ({len(units)} objects, markers: {', '.join(done) or 'none'})"
    return "start-up / hashing"


def _download_root(ctx: Ctx) -> Path:
    return ctx.run / "download"


def _download_units(ctx: Ctx) -> dict[str, Any]:
    return {rel: _identity(p) for rel, p in _files(_download_root(ctx)).items() if not _is_litter(rel)}


def _download_outputs(ctx: Ctx) -> dict[str, Any]:
    return {rel: _sha(p) for rel, p in _files(_download_root(ctx)).items() if not _is_litter(rel)}


def _download_redone(at_kill: dict[str, Any], after: dict[str, Any], report: dict[str, Any]) -> list[str]:
    downloaded = {f"{kind}/{rel}" for kind, r in report.items() for rel in r.get("downloaded", [])}
    return [f"{rel} downloaded again" for rel in sorted(set(at_kill) & downloaded)]


def _download_phase(ctx: Ctx, units: dict[str, Any]) -> str:
    kinds = sorted({rel.split("/", 1)[0] for rel in units})
    return f"downloading ({len(units)} files; {', '.join(kinds) or 'none yet'})" if units else "start-up / listing"


STEP_DEFS: dict[str, Step] = {
    "rephrase": Step(
        "rephrase",
        _rephrase_units,
        lambda ctx: (ctx.run / "data" / "train_detox.jsonl").is_file(),
        _rephrase_outputs,
        lambda ref, got: _compare_digests(ref, got, "data"),
        _rephrase_redone,
        _rephrase_phase,
    ),
    "train": Step(
        "train",
        _train_units,
        lambda ctx: bool(_train_done_parts(ctx)),
        _train_outputs,
        _train_compare,
        _train_redone,
        _train_phase,
        _train_done_parts,
    ),
    "evaluate": Step(
        "evaluate",
        _eval_units,
        lambda ctx: (ctx.run / "eval" / "results.json").is_file(),
        _eval_outputs,
        lambda ref, got: _compare_digests(ref, got, "eval"),
        _eval_redone,
        _eval_phase,
    ),
    "export": Step(
        "export",
        lambda ctx: {},
        lambda ctx: (ctx.run / "export").exists(),
        _export_outputs,
        lambda ref, got: _compare_digests(ref, got, "export"),
        lambda at_kill, after, report: [],
        _export_phase,
    ),
    "upload": Step(
        "upload",
        _upload_units,
        lambda ctx: bool(_upload_done_parts(ctx)),
        _upload_outputs,
        _upload_compare,
        _upload_redone,
        _upload_phase,
        _upload_done_parts,
    ),
    "download": Step(
        "download",
        _download_units,
        lambda ctx: False,
        _download_outputs,
        lambda ref, got: _compare_digests(ref, got, "download"),
        _download_redone,
        _download_phase,
    ),
}


# -- progress: each step's unit, declared before measuring, and how the harness sees it while the child runs -----------


def _count(path: Path | None) -> int:
    """The count a child reports in its progress file (:class:`_Counter`); 0 before its first report."""
    try:
        return int(path.read_bytes()[:20] or 0) if path is not None else 0
    except (OSError, ValueError):
        return 0


def _train_progress(ctx: Ctx) -> int:
    done = 0
    for arm in ARMS:
        arm_dir = ctx.run / "adapters" / arm
        metrics = _read_json(arm_dir / "metrics.json")
        checkpoints = _complete_checkpoints(arm_dir)
        done += (
            int(metrics.get("global_step") or 0) if isinstance(metrics, dict) else checkpoints[-1] if checkpoints else 0
        )
    return done


def _export_progress(ctx: Ctx) -> int:
    """Export's phases finished: each part is swapped into its build directory whole (``files.dir_writer``)."""
    if (ctx.run / "export").exists():
        return len(EXPORT_PHASES)
    for building in ctx.run.glob(".export.*"):
        if not (building / "hf").is_dir():
            return 0
        caikit = building / "caikit"
        return 2 if caikit.is_dir() and any(not p.name.startswith(".") for p in caikit.iterdir()) else 1
    return 0


# (the unit, its count in a run now: from what the step writes, or from the child's progress file where that is too
# coarse). A kill's third is min(2, 3 x done // total), total being the reference run's final count.
PROGRESS: dict[str, tuple[str, Callable[[Ctx, Path | None], int]]] = {
    "rephrase": ("TMaRCo outputs committed to the cache (its rows)", lambda ctx, _: len(_rephrase_units(ctx))),
    "train": (
        "optimizer steps of both arms (an arm's newest complete checkpoint, its `global_step` once done)",
        lambda ctx, _: _train_progress(ctx),
    ),
    "evaluate": (
        "texts generated plus texts scored (the child counts each batch of generation and of scoring)",
        lambda ctx, count: _count(count),
    ),
    "export": (
        "named phases finished, in order: "
        + "; ".join(EXPORT_PHASES)
        + " (`hf/`, then `caikit/<model id>`, then `export/` itself appearing whole: each is swapped in complete)",
        lambda ctx, _: _export_progress(ctx),
    ),
    "upload": ("bytes sent (s3transfer's progress callbacks, in the child)", lambda ctx, count: _count(count)),
    "download": ("bytes received (s3transfer's progress callbacks, in the child)", lambda ctx, count: _count(count)),
}


def _finished(step: str, ctx: Ctx) -> bool:
    """Whether the step's completion marker says the whole step is done (a kill then interrupted nothing)."""
    if step == "train":
        return len(_train_done_parts(ctx)) == len(ARMS)
    if step == "upload":
        return len(_upload_done_parts(ctx)) == len(_KINDS)
    return STEP_DEFS[step].done(ctx)


def third(done: int, total: int) -> int:
    """The third (0, 1, 2) of a step's progress that ``done`` of ``total`` units is in (export: the phase)."""
    return min(2, 3 * done // total)


def thirds(records: list[dict[str, Any]]) -> list[int]:
    """Interrupting kills per third of the observed progress at the kill (not of the planned target)."""
    counts = [0, 0, 0]
    for r in records:
        if r.get("interrupted"):
            counts[third(r["progress"], r["total"])] += 1
    return counts


def kill_target(seed: int, step: str, trial: int, which: int) -> float:
    """A trial's seeded kill target: a fraction of the step's progress, uniform in third ``which``."""
    return (which + random.Random(f"{seed}:{step}:{trial}").random()) / 3


def plan_kill(timeline: list[list[float]], target: float, clock: str) -> tuple[int, float]:
    """(the progress to wait for, then the delay on the step's clock) that lands a kill at ``target`` of the progress.

    ``timeline``: the reference run's ``[cpu s, wall s, units done]`` at each change, from the start ``[0, 0, 0]``. The
    target falls in a unit (between two levels); the delay is the target's part of that unit's reference duration.
    """
    total = timeline[-1][2]
    x = target * total
    j = max(i for i, point in enumerate(timeline) if point[2] <= x)
    at, after = timeline[j], timeline[min(j + 1, len(timeline) - 1)]
    part = (x - at[2]) / (after[2] - at[2]) if after[2] > at[2] else 0.0
    k = 0 if clock == "cpu" else 1
    return int(at[2]), part * (after[k] - at[k])


def _false_done(step: str, ctx: Ctx, ref: dict[str, Any]) -> list[str]:
    """What the kill left that its done marker vouches for but that is not the reference's output."""
    s = STEP_DEFS[step]
    if step == "download":  # no marker: every file under its final name must be complete
        got = _download_outputs(ctx)
        return [f"{rel} visible but differs" for rel in got if got[rel] != ref.get(rel)]
    if not s.done(ctx):
        return []
    if step == "train":
        parts = s.done_parts(ctx)
        return _train_compare({a: ref[a] for a in parts}, _train_outputs(ctx, tuple(parts)))
    if step == "upload":
        parts = s.done_parts(ctx)
        return _upload_compare({k: ref[k] for k in parts}, _upload_outputs(ctx))
    return s.compare(ref, s.outputs(ctx))


# --------------------------------------------------------------------------------------------------------------------
# the child: one step, through the package's API
# --------------------------------------------------------------------------------------------------------------------


class _Counter:
    """The child's progress report: a running count, overwritten in place (20 digits) in its progress file."""

    def __init__(self, path: str) -> None:
        import threading

        self.fd, self.value, self.lock = (
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            0,
            threading.Lock(),
        )
        self.set(0)

    def set(self, value: int) -> None:
        with self.lock:
            self.value = value
            os.pwrite(self.fd, b"%020d" % max(0, value), 0)

    def add(self, amount: int) -> None:  # s3transfer calls it from its threads (negative on a retried chunk)
        with self.lock:
            self.value += amount
            os.pwrite(self.fd, b"%020d" % max(0, self.value), 0)


def _count_batches(fn: Callable, texts: Callable[[dict[str, Any]], int], counter: _Counter) -> Callable:
    """``fn`` (a generation or scoring function with an ``on_batch(done, total)``), adding its texts to ``counter``."""
    import functools
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def counted(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        inner, base, n = bound.arguments.get("on_batch"), counter.value, texts(bound.arguments)

        def on_batch(done: int, total: int) -> None:
            counter.set(base + n * done // total)
            if inner is not None:
                inner(done, total)

        bound.arguments["on_batch"] = on_batch
        out = fn(*bound.args, **bound.kwargs)
        counter.set(base + n)
        return out

    return counted


def _report_progress(step: str, counter: _Counter) -> None:
    """Where a step's own artifacts are too coarse, count its progress in this child (never in the package)."""
    if step == "evaluate":
        from detox_sft.evaluation import generation

        generation.generate_continuations = _count_batches(
            generation.generate_continuations, lambda a: len(a["prompts"]) * a["cfg"].num_samples, counter
        )
        generation.score_continuations = _count_batches(
            generation.score_continuations, lambda a: sum(len(row) for row in a["continuations"]), counter
        )
    elif step in ("upload", "download"):
        from boto3.s3.transfer import ProgressCallbackInvoker

        from detox_sft import storage

        transfers = storage._transfers

        def limited(client: Any, concurrency: int, total: int, desc: str, progress: bool, max_bandwidth=None):
            tm, bar, subscribers = transfers(client, concurrency, total, desc, progress, TRANSFER["bytes_per_s"])
            return tm, bar, [*subscribers, ProgressCallbackInvoker(counter.add)]

        storage._transfers = limited


def child(step: str, recipe_path: str, report_path: str, ref_prefix: str, progress: str | None = None) -> int:
    """Run one step to the end (the process the harness kills) and write what it did to ``report_path``.

    With ``progress`` (a path), the child writes ``<progress>.start`` (its wall and CPU time) right before it calls
    the step, and counts the step's progress in ``<progress>.count`` where :data:`PROGRESS` needs it.
    """
    from detox_sft.config import load_recipe

    recipe = load_recipe(recipe_path)
    report: dict[str, Any] = {}
    if progress is not None:
        _report_progress(step, _Counter(f"{progress}.count"))
        start = {"wall": time.time(), "cpu": time.process_time()}
        Path(f"{progress}.start.tmp").write_text(json.dumps(start))
        os.replace(f"{progress}.start.tmp", f"{progress}.start")
    if step == "rephrase":
        from detox_sft.data import load_train_dataset
        from detox_sft.rephrase import detoxify_training_set

        _, summary = detoxify_training_set(recipe, load_train_dataset(recipe.data, recipe.seed), progress=False)
        report = summary.to_dict()
    elif step == "train":
        from detox_sft.training import load_arm_datasets, train_arms

        results = train_arms(recipe, load_arm_datasets(recipe))
        report = {
            arm: {"skipped": r.skipped, "resumed_from": r.metrics.get("resumed_from")} for arm, r in results.items()
        }
    elif step == "evaluate":
        from detox_sft.evaluation import evaluate_models

        evaluate_models(recipe, progress=False)
    elif step == "export":
        from detox_sft.export import export_model

        export_model(recipe)
    elif step == "upload":
        from detox_sft.storage import S3Settings, upload_export

        reports = upload_export(recipe, settings=S3Settings.from_env(), create_bucket=True, progress=False)
        report = {kind: {"uploaded": r.uploaded, "skipped": r.skipped} for kind, r in reports.items()}
    elif step == "download":
        from detox_sft.storage import S3Settings, download_prefix

        for kind in _KINDS:
            r = download_prefix(
                f"{ref_prefix}/{kind}",
                recipe.run_path / "download" / kind,
                settings=S3Settings.from_env(),
                progress=False,
            )
            report[kind] = {"downloaded": r.downloaded, "skipped": r.skipped}
    else:
        raise SystemExit(f"unknown step {step!r}")
    Path(report_path).write_text(json.dumps(report, default=str))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# the harness
# --------------------------------------------------------------------------------------------------------------------


# the libraries every step imports: loaded once by the zygote, so a run's time is the step's own work
_PREIMPORT = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "scipy.spatial.distance",
    "sklearn",
    "pandas",
    "matplotlib.figure",
    "boto3",
    "yaml",
    "caikit_nlp",
    "detox_sft.config",
    "detox_sft.refs",
    "detox_sft_dev.zoo",
    "detox_sft.compat",
    "detox_sft.data",
    "detox_sft.rephrase",
    "detox_sft.training",
    "detox_sft.evaluation",
    "detox_sft.export",
    "detox_sft.storage",
    "detox_sft.toxicity",
)


def zygote() -> int:
    """Import the heavy libraries once, then fork one child per request line on stdin (the step's process).

    Protocol, one JSON object a line: a request ``{step, recipe, report, ref_prefix, log, progress}`` is answered with
    ``{"pid": ...}`` as soon as the child runs, then ``{"rc": ..., "cpu": ...}`` when it has ended (killed or not).
    A child starts a session of its own (the harness kills its process group) and writes its output to ``log``.
    The parent runs no torch operation, so no OpenMP thread pool exists when it forks.
    """
    import importlib
    import threading
    import traceback
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _PREIMPORT:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        # the zoo's directory is named by a hash of its build code as imported: pinned here, every child uses this
        # zoo, even while someone edits the zoo's code (which would name, and build, another one)
        from detox_sft_dev.zoo import ensure_zoo, zoo_dir

        if not (zoo_dir() / "manifest.json").is_file():  # built in a child: building runs torch, the zygote must not
            pid = os.fork()
            if pid == 0:
                try:
                    ensure_zoo()
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        ensure_zoo()  # only reads its manifest now
    if threading.active_count() != 1:
        raise SystemExit(f"the zygote has {threading.active_count()} threads after its imports: forking is unsafe")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: the step, then exit without running the parent's cleanup
            rc = 1
            try:
                os.setsid()
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if request.get("fsize"):  # the disk-full trials (faults_env.py): every write past it fails (EFBIG)
                    import resource

                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (Python ignores it already; said for the reader)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], resource.RLIM_INFINITY))
                rc = child(
                    request["step"],
                    request["recipe"],
                    request["report"],
                    request["ref_prefix"],
                    request.get("progress"),
                )
            except BaseException as exc:  # the child must never return into the zygote's loop: report and exit
                with contextlib.suppress(BaseException):  # the log may be past a file-size limit: the error, short
                    Path(request["report"]).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:400]}))
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
        _, status, usage = os.wait4(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime}), flush=True)
    return 0


class Zygote:
    """The harness's side of :func:`zygote`."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "zygote"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._read()  # ready

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited (rc {self.proc.wait()})")
        return json.loads(line)

    def start(self, request: dict[str, Any]) -> int:
        """Fork a child for ``request``; its pid."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(self._read()["pid"])

    def wait(self) -> tuple[int, float]:
        """Wait for the child to end: (exit code, negative for a signal; CPU seconds)."""
        reply = self._read()
        return int(reply["rc"]), float(reply["cpu"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of a running process; `None` once it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Watch:
    """The harness's view of one running child: its start file, its clock since then, its progress."""

    def __init__(self, step: str, pid: int, ctx: Ctx, progress: Path) -> None:
        self.step, self.pid, self.ctx, self.progress = step, pid, ctx, progress
        self.start: dict[str, float] | None = None
        self.last = (0.0, 0.0)  # the clock when last seen running

    def alive(self) -> bool:
        return _cpu_seconds(self.pid) is not None

    def started(self) -> bool:
        if self.start is None:
            self.start = _read_json(Path(f"{self.progress}.start"))
        return self.start is not None

    def clock(self) -> tuple[float, float]:
        """(the child's CPU seconds, wall seconds) since it started its step; the last seen once it has ended."""
        cpu = _cpu_seconds(self.pid)
        if cpu is not None and self.started():
            self.last = (cpu - self.start["cpu"], time.time() - self.start["wall"])
        return self.last

    def done(self) -> int:
        return PROGRESS[self.step][1](self.ctx, Path(f"{self.progress}.count"))

    def until(self, units: int, timeout: float, poll: float = 0.005) -> bool:
        """Wait until the step has started and done ``units``; whether the child still runs then.

        Raises:
            TimeoutError: ``timeout`` wall seconds passed without it (the child is killed first).
        """
        deadline = time.monotonic() + timeout
        while self.alive():
            if self.started() and self.done() >= units:
                return self.alive()
            if time.monotonic() > deadline:
                _kill_group(self.pid)
                raise TimeoutError(f"waited {timeout:.0f} s for {units} units of {self.step}; the child still ran")
            time.sleep(poll)
        return False

    def wait(self, delay: float, clock: str, poll: float = 0.005) -> bool:
        """Wait ``delay`` seconds on the step's ``clock`` from now; whether the child still runs then."""
        k = 0 if clock == "cpu" else 1
        end = self.clock()[k] + delay
        while self.alive():
            if self.clock()[k] >= end:
                return self.alive()
            time.sleep(poll)
        return False

    def timeline(self, poll: float = 0.01) -> list[list[float]]:
        """Watch the run to its end: ``[cpu s, wall s, units done]`` at each change of progress, from the start."""
        points = [[0.0, 0.0, 0]]
        while self.alive():
            if self.started() and (done := self.done()) > points[-1][2]:
                points.append([*map(lambda v: round(v, 4), self.clock()), done])
            time.sleep(poll)
        if (done := self.done()) > points[-1][2]:  # reached between the last look and the exit: its CPU time is
            points.append([None, round(time.time() - self.start["wall"], 4), done])  # the caller's (wait4's)
        return points


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # not yet the leader of its own group (killed right after the fork)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Harness:
    """Reference runs and kill trials of the steps, in one work directory (see the module docstring).

    Args:
        work: scratch directory (run directory, snapshots of each step's reference output, logs).
        results: where the trial records go.
        seed: the kill targets' seed.
        trials: interrupting kills wanted in each third of a step's progress (export: in each phase).
        s3: a started :class:`detox_sft_dev.s3.LocalS3` (needed by upload and download), or `None`.
        command: how to make the records again (recorded in each).
        endpoint: the S3 endpoint the children use (the DelayProxy's), default the server's own.
        provenance: benchmarks/provenance.py's ``capture`` taken as the run started, stored in each record.
    """

    def __init__(
        self,
        work: Path,
        results: Path = RESULTS,
        seed: int = 0,
        trials: int = 4,
        s3: Any = None,
        command: str = COMMAND,
        endpoint: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        self.work, self.results, self.seed, self.trials, self.s3 = Path(work), Path(results), seed, trials, s3
        self.command, self.endpoint, self.provenance = command, endpoint, provenance
        self.run = self.work / "run"
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.reference_s: dict[str, float] = {}  # the reference run's duration, on the step's CLOCK
        self.reference_wall: dict[str, float] = {}
        self.plan: dict[str, dict[str, Any]] = {}  # the reference run's progress: total units and timeline
        self._rerun = False  # whether a reference was made in this run (the later ones then are too)
        self.zygote: Zygote | None = None
        self.reference_out: dict[str, dict[str, Any]] = {}
        self.recipes = {which: self._write_recipe(which) for which in ("ref", "trial")}

    def ctx(self, which: str = "trial") -> Ctx:
        return Ctx(self.run, f"faults/{which}", "faults/ref", self.s3)

    def _write_recipe(self, which: str) -> Path:
        import yaml

        values = yaml.safe_load((ROOT / "recipes" / "offline.yaml").read_text())
        values = _deep_merge(values, SHRINK)
        values.update(name="faults", run_dir=str(self.run))  # one name: results.json records it
        values["storage"] = {**values.get("storage", {}), "prefix": f"faults/{which}"}
        path = self.work / f"recipe-{which}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    # -- running the child ------------------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
        )
        # one string hash for every zygote: peft writes adapter_config.json's target_modules from a set, so a
        # reference made by an earlier harness run would differ by its order only
        env["PYTHONHASHSEED"] = "0"
        if self.s3 is not None:
            env.update(self.s3.env())
        if self.endpoint is not None:
            env["AWS_S3_ENDPOINT"] = self.endpoint
        return env

    def _progress_path(self, log_name: str) -> Path:
        return self.work / "progress" / log_name

    def _start(self, step: str, which: str, log_name: str, fsize: int | None = None) -> tuple[int, Path]:
        """Fork the step's child (``fsize``: a file-size limit in bytes for its writes); (its pid, its report)."""
        if self.zygote is None:
            self.zygote = Zygote(self._env())
        report = self.work / f"report-{log_name}.json"
        report.unlink(missing_ok=True)
        progress = self._progress_path(log_name)
        progress.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".start", ".count"):
            Path(f"{progress}{suffix}").unlink(missing_ok=True)
        request = {
            "step": step,
            "recipe": str(self.recipes[which]),
            "report": str(report),
            "ref_prefix": self.ctx().ref_prefix,
            "log": str(self.logs / f"{log_name}.log"),
            "fsize": fsize,
            "progress": str(progress),
        }
        return self.zygote.start(request), report

    def _run_to_end(
        self, step: str, which: str, log_name: str, timeline: list | None = None
    ) -> tuple[int, float, float, dict[str, Any]]:
        """Run ``step`` to its end: (exit code, wall s, CPU s, the child's report); its progress timeline
        (:meth:`_Watch.timeline`) appended to ``timeline`` when one is given."""
        if self.zygote is None:
            self.zygote = Zygote(self._env())  # its start-up (the imports) is not the step's time
        started = time.perf_counter()
        pid, report = self._start(step, which, log_name)
        if timeline is not None:
            watch = _Watch(step, pid, self.ctx(which), self._progress_path(log_name))
            timeline += watch.timeline()
        rc, cpu = self.zygote.wait()
        if timeline is not None and timeline[-1][0] is None:
            timeline[-1][0] = round(cpu - watch.start["cpu"], 4)
        return rc, time.perf_counter() - started, cpu, _read_json(report) or {}

    def close(self) -> None:
        """Stop the zygote."""
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None

    # -- inputs -----------------------------------------------------------------------------------------------------

    def _snapshot(self, step: str) -> Path:
        return self.work / "after" / step

    def _restore_inputs(self, step: str) -> None:
        shutil.rmtree(self.run, ignore_errors=True)
        before = STEPS[STEPS.index(step) - 1] if STEPS.index(step) else None
        if before is None:
            self.run.mkdir(parents=True)
        else:
            snapshot = self._snapshot(before)
            if not snapshot.is_dir():
                raise RuntimeError(f"no reference output of {before}: run its reference first")
            shutil.copytree(snapshot, self.run, copy_function=shutil.copy2, symlinks=True)
        if step == "upload":
            self._clear_prefix("faults/trial")

    def _clear_prefix(self, prefix: str) -> None:
        client, bucket = self.s3.client(), self.s3.bucket
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/").get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    # -- reference --------------------------------------------------------------------------------------------------

    def reference(self, step: str) -> float:
        """The uninterrupted run of ``step`` (from the previous step's reference output), its progress watched;
        returns its duration on the step's clock."""
        state = self.work / "after" / f"{step}.json"
        saved = _read_json(state)
        code = (self.provenance or {}).get("files")  # a reference of other code is not this code's reference
        if (
            saved
            and not self._rerun  # an earlier step's reference was made again: this step's inputs changed
            and saved.get("unit") == PROGRESS[step][0]
            and saved.get("code") == code
            and self._snapshot(step).is_dir()
        ):
            self.reference_s[step], self.reference_wall[step] = saved[f"{CLOCK[step]}_s"], saved["wall_s"]
            self.plan[step] = {"total": saved["timeline"][-1][2], "timeline": saved["timeline"]}
            self._load_reference_outputs(step)
            if self.reference_out[step]:  # (an upload's reference lives in the S3 server's data: it may be gone)
                return self.reference_s[step]
        self._rerun, runs = True, []
        for again in range(_WALL_RUNS if CLOCK[step] == "wall" else 1):  # the same run, from the same state
            self._restore_inputs(step)
            if step == "upload":
                self._clear_prefix("faults/ref")
            log = f"{step}-reference" + (f"-{again}" if again else "")
            timeline: list[list[float]] = []
            rc, wall, cpu, _ = self._run_to_end(step, "ref", log, timeline)
            if rc != 0:
                raise RuntimeError(f"the reference run of {step} failed (rc {rc}); see {self.logs / f'{log}.log'}")
            if timeline[-1][2] <= 0:
                raise RuntimeError(f"the reference run of {step} showed no progress ({PROGRESS[step][0]})")
            if not again:
                snapshot = self._snapshot(step)
                shutil.rmtree(snapshot, ignore_errors=True)
                shutil.copytree(self.run, snapshot, copy_function=shutil.copy2, symlinks=True)
            runs.append((wall, cpu, timeline))
        wall, cpu, timeline = min(runs)  # a wall-clock step: its fastest run
        state.write_text(
            json.dumps({"cpu_s": cpu, "wall_s": wall, "unit": PROGRESS[step][0], "code": code, "timeline": timeline})
        )
        self.reference_s[step], self.reference_wall[step] = (cpu if CLOCK[step] == "cpu" else wall), wall
        self.plan[step] = {"total": timeline[-1][2], "timeline": timeline}
        self._load_reference_outputs(step)
        print(
            f"[faults] {step}: reference run {cpu:.1f} CPU s ({wall:.1f} s wall), {timeline[-1][2]} units of progress "
            f"in {len(timeline) - 1} steps",
            flush=True,
        )
        return self.reference_s[step]

    def _load_reference_outputs(self, step: str) -> None:
        if step == "upload":
            self.reference_out[step] = _upload_outputs(self.ctx("ref"), "faults/ref")
            return
        self.reference_out[step] = STEP_DEFS[step].outputs(
            Ctx(self._snapshot(step), "faults/ref", "faults/ref", self.s3)
        )

    # -- a trial ----------------------------------------------------------------------------------------------------

    def record_path(self, step: str, trial: int) -> Path:
        return self.results / step / f"seed{self.seed}-{trial:02d}.json"

    def trial(
        self, step: str, trial: int, target: float, planned: int | None = None, timeout: float = 600.0
    ) -> dict[str, Any]:
        """Kill ``step`` at ``target`` (a fraction of its progress: :func:`plan_kill`), waiting for the progress at
        most ``timeout`` s; rerun it, compare; returns (and writes) the record."""
        s, ctx = STEP_DEFS[step], self.ctx()
        ref, total = self.reference_out[step], self.plan[step]["total"]
        self._restore_inputs(step)
        name = f"{step}-{trial:02d}"
        units, delay = plan_kill(self.plan[step]["timeline"], target, CLOCK[step])
        pid, _ = self._start(step, "trial", f"{name}-killed")
        watch = _Watch(step, pid, ctx, self._progress_path(f"{name}-killed"))
        try:
            running = watch.until(units, timeout)
        except TimeoutError:
            self.zygote.wait()  # the killed child's exit line, before the next request
            raise
        # the unit's reference duration scaled by this run's pace so far (a loaded box slows even the CPU clock:
        # OpenMP threads spin), so that the kill lands inside the unit
        reached = next(p for p in self.plan[step]["timeline"] if p[2] >= units)[0 if CLOCK[step] == "cpu" else 1]
        now = watch.clock()[0 if CLOCK[step] == "cpu" else 1]
        pace = min(4.0, max(0.25, now / reached)) if units and reached > 0 else 1.0
        running = running and watch.wait(delay * pace, CLOCK[step])
        cpu_s, wall_s = watch.clock()
        if running:
            _kill_group(pid)
        rc_killed, _ = self.zygote.wait()
        done = watch.done()  # right after the kill: where the progress was
        finished = _finished(step, ctx)
        why = (
            "not started"
            if not watch.started()
            else f"ended before the kill (rc {rc_killed})"
            if not running
            else "done marker written"
            if finished
            else None
        )
        record: dict[str, Any] = {
            "step": step,
            "seed": self.seed,
            "trial": trial,
            "target": round(target, 4),
            "planned_third": planned,
            "clock": CLOCK[step],
            "wait_for_units": units,
            "delay_s": round(delay, 3),
            "pace": round(pace, 2),
            "moment_s": round(wall_s, 3),  # wall seconds since the child started its step
            "moment_clock_s": round(cpu_s if CLOCK[step] == "cpu" else wall_s, 3),
            "progress": done,
            "total": total,
            "third": third(done, total),
            "interrupted": why is None,
            "not_interrupted": why,
            "reference_s": round(self.reference_s[step], 2),
            "reference_wall_s": round(self.reference_wall[step], 2),
            "load_average": round(os.getloadavg()[0], 1),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": self.command,
            "provenance": self.provenance,
        }
        found = s.units(ctx)
        record["phase"] = s.phase(ctx, found) if running else "finished before the kill"
        record["units_at_kill"] = len(found)
        record["done_after_kill"] = s.done(ctx)
        false_done = _false_done(step, ctx, ref)
        rc, rerun_wall, rerun_cpu, report = self._run_to_end(step, "trial", f"{name}-rerun")
        after = s.units(ctx)
        differences = s.compare(ref, s.outputs(ctx)) if rc == 0 else [f"rerun failed (rc {rc})"]
        redone = s.redone(found, after, report) if rc == 0 else []
        record.update(
            rerun_rc=rc,
            rerun_s=round(rerun_cpu if CLOCK[step] == "cpu" else rerun_wall, 2),
            redone=redone,
            differences=differences,
            false_done=false_done,
            litter=_litter(self.run),
        )
        if false_done:
            outcome = "false done"
        elif redone or differences:
            outcome = "lost"
        elif why is not None:
            outcome = "not interrupted"
        else:
            outcome = "survived"
        record["outcome"] = outcome
        _sibling("provenance").write(self.record_path(step, trial), record)  # atomically: a resumed run trusts it
        print(
            f"[faults] {step} trial {trial}: target {target:.2f}, killed at {wall_s:.2f} s ({CLOCK[step]} "
            f"{record['moment_clock_s']:.2f} s), progress {done}/{total}, {record['phase']}: {outcome}"
            + (f" ({why})" if why else "")
            + (f" {redone + differences + false_done}" if outcome not in ("survived", "not interrupted") else ""),
            flush=True,
        )
        return record

    def run_steps(self, steps: list[str], redo: bool = False, deadline: float | None = None) -> list[dict[str, Any]]:
        """References for every step up to the last of ``steps``, then the trials, round robin over the steps.

        A step's trials go on until each third of its progress (as observed at the kill) has ``trials`` interrupting
        kills, each trial aimed at the third with the fewest so far, at most ``4 x 3 x trials`` trials a step.
        """
        needed = STEPS[: max(STEPS.index(s) for s in steps) + 1]
        for step in needed:
            self.reference(step)
        records: list[dict[str, Any]] = []
        next_trial = dict.fromkeys(steps, 0)
        counts = {step: [0, 0, 0] for step in steps}
        while pending := [s for s in steps if min(counts[s]) < self.trials and next_trial[s] < 12 * self.trials]:
            for step in pending:
                if deadline is not None and time.time() > deadline:
                    print("[faults] time is up: stopping; the records so far are kept", flush=True)
                    return records
                trial = next_trial[step]
                next_trial[step] += 1
                path = self.record_path(step, trial)
                if path.is_file() and not redo:
                    record = json.loads(path.read_text())
                else:
                    planned = counts[step].index(min(counts[step]))
                    record = self.trial(step, trial, kill_target(self.seed, step, trial, planned), planned)
                    records.append(record)
                counts[step] = [a + b for a, b in zip(counts[step], thirds([record]), strict=True)]
        return records


# --------------------------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------------------------


def load_records(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every trial record under ``results``, by step (in pipeline order), seed and trial."""
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*/seed*.json"))]
    return sorted(records, key=lambda r: (STEPS.index(r["step"]), r["seed"], r["trial"]))


def _sibling(name: str) -> Any:
    """benchmarks/<name>.py under the name the benchmarks import it by (this file may be loaded by path; faults_env
    imports this module, so it is loaded lazily)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_ORDINAL = ("1st", "2nd", "3rd")


def _where(r: dict[str, Any]) -> str:
    """A record's third of the progress at the kill (export: its phase)."""
    k = third(r["progress"], r["total"])
    return EXPORT_PHASES[k] if r["step"] == "export" else _ORDINAL[k]


def _measured(rs: list[dict[str, Any]]) -> str:
    """Which code a step's records measured, and whether it changed since (provenance.status)."""
    status = _sibling("provenance").status
    seen: dict[str, int] = {}
    for r in rs:
        prov = r.get("provenance")
        at = f"{prov['commit'][:7]}{'' if prov['clean'] else ' (uncommitted changes)'}: " if prov else ""
        key = at + status(r)
        seen[key] = seen.get(key, 0) + 1
    return "; ".join(f"{n} at {key}" for key, n in seen.items())


def render_report(records: list[dict[str, Any]], env_records: list[dict[str, Any]] = ()) -> str:
    """FAULTS.md from the trial records: definitions, a summary per step, every trial; then the environment's faults."""
    lines = [
        "# Fault injection: each long step killed with SIGKILL inside its work, rerun, compared",
        "",
        "Generated by `benchmarks/faults.py` from the records in `benchmarks/results/faults/` (do not edit; "
        "`.venv/bin/python benchmarks/faults.py --report` rewrites it). "
        f"Command: `make faults` (`{COMMAND}`, then `{ENV_COMMAND}` for the faults of the environment at the "
        "end); the kill records were made by "
        + ", ".join(f"`{c}`" for c in sorted({r["command"] for r in records}))
        + ".",
        "",
        "Each step runs on the offline recipe shrunk to a few seconds of work (`SHRINK` in the script: 40 samples, "
        "4 QLoRA steps per arm with a checkpoint after each, TMaRCo in batches of 4, 6 eval prompts x 2 samples). "
        "The children are forked from a process that imported the libraries before any trial; a child writes a "
        "start file right before it calls its step, and the clock starts there. Each step's unit of progress is "
        "declared below, before measuring, and watched while the child runs. An uninterrupted reference run records "
        "when each level of progress was reached, on the step's clock (the child's CPU time for the compute-bound "
        "steps, whose wall time varies several-fold with the load of this shared 2-core box; wall time for upload "
        "and download). A trial draws a seeded target in progress space, in the third that has the fewest kills so "
        "far, waits until the observed progress reaches the target's unit and then for the target's part of that "
        "unit's reference duration, and SIGKILLs the child's process group; it records what the kill left, reruns "
        "the step to the end and compares with the reference. The third of a kill is where the progress was right "
        "after the kill, not the plan. A kill that found the step not started, or done (its completion marker "
        "written, or the child ended), is listed as not interrupted and replaced. Upload and download go through a "
        f"delay proxy ({TRANSFER['delay_s'] * 2000:g} ms round trip) to the local S3 server (SeaweedFS), with "
        f"s3transfer's bandwidth limit at {TRANSFER['bytes_per_s'] / 2**20:g} MiB/s, so that a transfer takes "
        "seconds. The killed-at column gives seconds since the child started its step (and its CPU seconds).",
        "",
        "## Units of progress (declared before measuring)",
        "",
    ]
    lines += [f"- **{step}**: {PROGRESS[step][0]}." for step in STEPS]
    lines += ["", "## What counts as lost (fixed before measuring)", ""]
    lines += [f"- **{step}**: {LOSS[step]}" for step in STEPS]
    lines += [
        "",
        "A **false done** is a completion marker the killed run left (or a rerun that finished) vouching for output "
        "that is partial or differs from the reference. **Litter**: hidden temporary files a killed writer left that "
        "the rerun did not remove (not outputs; listed, not counted as lost).",
        "",
        "## Summary",
        "",
        "| step | reference run | progress units | interrupting kills | in 1st / 2nd / 3rd third of the progress "
        "(export: phase) | survived | lost | false done | not interrupted | litter | phases hit |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    by_step = {step: [r for r in records if r["step"] == step] for step in STEPS}
    for step, rs in by_step.items():
        if not rs:
            lines.append(f"| {step} | | | 0 | | | | | | | |")
            continue
        hit = [r for r in rs if r.get("interrupted")]
        count = {o: sum(r["outcome"] == o for r in rs) for o in ("survived", "lost", "false done", "not interrupted")}
        phases = sorted({r["phase"].split(" (")[0] for r in hit})
        lines.append(
            f"| {step} | {rs[-1]['reference_s']:.2f} {rs[-1]['clock']} s | {rs[-1].get('total', '')} | {len(hit)} | "
            f"{' / '.join(map(str, thirds(rs)))} | {count['survived']} | {count['lost']} | {count['false done']} | "
            f"{count['not interrupted']} | {sum(bool(r['litter']) for r in rs)} | {'; '.join(phases)} |"
        )
    hit = [r for r in records if r.get("interrupted")]
    lines += [
        "",
        f"Total: {len(hit)} interrupting kills, {sum(r['outcome'] == 'survived' for r in hit)} survived, "
        f"{sum(r['outcome'] == 'lost' for r in records)} lost, "
        f"{sum(r['outcome'] == 'false done' for r in records)} false done.",
        "",
        "Code measured (commit at the start of the run; `benchmarks/provenance.py`'s status now):",
        "",
    ]
    lines += [f"- {step}: {_measured(rs)}" for step, rs in by_step.items() if rs]
    lines += ["", "## Trials"]
    for step, rs in by_step.items():
        if not rs:
            continue
        lines += [
            "",
            f"### {step}",
            "",
            "| seed | trial | target (planned) | killed at | progress at the kill | third | phase at the kill "
            "| units finished | marker said done | rerun | outcome | details |",
            "|---:|---:|---:|---:|---:|---|---|---:|---|---:|---|---|",
        ]
        for r in rs:
            details = "; ".join(
                ([r["not_interrupted"]] if r.get("not_interrupted") else [])
                + r["redone"]
                + r["differences"]
                + r["false_done"]
                + [f"litter: {x}" for x in r["litter"]]
            )
            if "progress" in r:
                cpu = f" ({r['moment_clock_s']:.2f} cpu s)" if r["clock"] == "cpu" else ""
                moment, target = f"{r['moment_s']:.2f} s{cpu}", f"{r['target']:.2f}"
                progress = f"{r['progress']}/{r['total']} ({r['progress'] / r['total']:.2f})"
                where = _where(r)
            else:  # a record of the earlier harness: killed at a planned moment, its progress not observed
                moment, target, progress, where = "-", f"{r['fraction']:.2f} of D", "not observed", "-"
            lines.append(
                f"| {r['seed']} | {r['trial']} | {target} | {moment} | {progress} | {where} | {r['phase']} | "
                f"{r['units_at_kill']} | {'yes' if r['done_after_kill'] else 'no'} | {r['rerun_s']:.2f} {r['clock']} s "
                f"| {r['outcome']} | {details.replace('|', '/')} |"
            )
    if env_records:
        lines += _sibling("faults_env").render_env(list(env_records))
    return "\n".join(lines) + "\n"


def write_report(results: Path = RESULTS, report: Path = REPORT) -> Path:
    """Regenerate FAULTS.md from the records (the kills, and the faults of the environment)."""
    report.write_text(render_report(load_records(results), _sibling("faults_env").load_env_records(results / "env")))
    return report


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    run_child = sub.add_parser("child", help="run one step (the process the harness kills)")
    run_child.add_argument("step", choices=STEPS)
    run_child.add_argument("--recipe", required=True)
    run_child.add_argument("--report", required=True)
    run_child.add_argument("--ref-prefix", required=True)
    run_child.add_argument("--progress", default=None, help="report the start and the progress to this path")
    sub.add_parser("zygote", help="import once, fork a child per request (used by the harness)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument(
        "--trials", type=int, default=4, help="interrupting kills per third of each step's progress (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch directory (default: benchmarks/results/faults-work)")
    parser.add_argument("--redo", action="store_true", help="run trials whose record exists again")
    parser.add_argument("--minutes", type=float, default=None, help="stop starting trials after this long")
    parser.add_argument("--report", action="store_true", help="only regenerate FAULTS.md from the records")
    parser.add_argument(
        "--results",
        default=None,
        help="records directory (default benchmarks/results/faults; another one gets its own FAULTS.md inside it)",
    )
    args = parser.parse_args(argv)
    command = " ".join([".venv/bin/python", "benchmarks/faults.py", *(sys.argv[1:] if argv is None else argv)])
    if args.command == "child":
        return child(args.step, args.recipe, args.report, args.ref_prefix, args.progress)
    if args.command == "zygote":
        return zygote()
    results = Path(args.results) if args.results else RESULTS
    if not args.report:
        work = Path(args.work) if args.work else ROOT / "benchmarks" / "results" / "faults-work"
        deadline = time.time() + args.minutes * 60 if args.minutes else None
        prov = _sibling("provenance").capture(__file__)  # the code as the run starts
        with contextlib.ExitStack() as stack:
            s3 = proxy = None
            if {"upload", "download"} & set(args.steps):
                from s3 import DelayProxy  # benchmarks/s3.py (this script's directory is on sys.path)

                from detox_sft_dev.s3 import LocalS3

                s3 = stack.enter_context(LocalS3(bucket="detox-sft", data_dir=work / "s3"))
                proxy = DelayProxy(s3.ports["s3"], TRANSFER["delay_s"])
                stack.callback(proxy.close)
            # SIGTERM stops like Ctrl-C: the zygote and the S3 server are stopped on the way out
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            harness = Harness(
                work,
                results,
                seed=args.seed,
                trials=args.trials,
                s3=s3,
                command=command,
                endpoint=proxy.url if proxy else None,
                provenance=prov,
            )
            stack.enter_context(contextlib.closing(harness))
            harness.run_steps(args.steps, args.redo, deadline)
    report = REPORT if results == RESULTS else results / "FAULTS.md"
    print(f"[faults] report: {write_report(results, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
