"""Fault injection: kill each long step with SIGKILL at seeded moments, rerun it, compare with an uninterrupted run.

For each step (rephrase, train, evaluate, export, upload, download), on the offline recipe shrunk so that a run does
a few seconds of work (:data:`SHRINK`):

1. a reference run, uninterrupted, from the step's inputs (the previous step's reference output); its duration is D,
   on the step's :data:`CLOCK`: the child's CPU time for the compute-bound steps (the wall time of one run varies
   several-fold with the load of this shared box), wall time for upload and download (the shortest of three runs);
2. ``--trials`` killed trials, each from the same inputs in the same run directory: the step runs in a child
   process, forked from a :func:`zygote` that has imported the libraries once (so D is the step's own work), and its
   process group is SIGKILLed once it has run for ``f * D``. The fractions are stratified seeded uniform draws, one in
   each 1/n slice of [0, 0.95), so the kills spread over the whole run; a run that ends before its kill is recorded
   as not interrupted and another trial takes its place;
3. what the kill left is recorded (its phase, the finished units, whether the step's completion marker says done and
   whether that output is complete), the step is rerun to the end, and its output is compared with the reference.

What "lost" means is fixed per step in :data:`LOSS`, before any measurement. One JSON record per trial goes to
``benchmarks/results/faults/<step>/seed<seed>-<trial>.json``; FAULTS.md is generated from those records
(:func:`write_report`) and ``tests/test_faults.py`` checks it.

Run: ``make faults`` (= ``.venv/bin/python benchmarks/faults.py --trials 10``); ``--steps rephrase export`` for some
steps, ``--report`` to regenerate FAULTS.md only. Records already written for the same seed and trial are kept
(``--redo`` to run them again), so an interrupted harness resumes. Upload and download run against a local S3 server
(:class:`detox_sft_dev.s3.LocalS3`) started by the harness. The children run the steps' Python API, as the CLI and
the notebooks do (:func:`child`), with the package's code and the offline zoo as the zygote imported them.
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

__all__ = ["STEPS", "LOSS", "SHRINK", "Harness", "fractions", "load_records", "render_report", "write_report", "main"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "faults"
REPORT = ROOT / "FAULTS.md"
COMMAND = ".venv/bin/python benchmarks/faults.py --trials 10 --seed 0"  # what `make faults` runs first
ENV_COMMAND = ".venv/bin/python benchmarks/faults_env.py --trials 4 --seed 0"  # and then (faults_env.COMMAND)
STEPS = ("rephrase", "train", "evaluate", "export", "upload", "download")
ARMS = ("raw", "detox")  # detox_sft.config.ARMS (the harness process does not import torch or the package's steps)
EVAL_MODELS = ("base", "raw", "detox")
MAX_FRACTION = 0.95  # a kill later than this often lands after the end of the run
# What a step's duration is measured in. CPU time (the child's, all threads) for the compute-bound steps: on this
# shared box the wall time of the same run varies several-fold with the load, its CPU time little. Wall time for the
# transfers, which mostly wait on the S3 server (another process).
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
    if (ctx.run / "export").is_dir():
        return "finished"
    building = sorted(ctx.run.glob(".export.*"))
    if not building:
        return "start-up / merging"
    inside = _files(building[0])
    if any(rel.endswith("config.yml") for rel in inside):
        return "checking the Caikit model"
    if any(rel.startswith("caikit/") for rel in inside):
        return "converting to Caikit"
    return "saving the merged model"


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


# Progress a kill can wait for instead of a moment (tests/test_faults.py's quick trials): seen in the run directory, so
# the kill lands inside the step's work whatever the machine's load. (What is awaited, whether the run shows it.)
PROGRESS: dict[str, tuple[str, Callable[[Ctx], bool]]] = {
    "rephrase": (
        "a batch of TMaRCo outputs committed to the cache, `data/train_detox.jsonl` not yet written",
        lambda ctx: bool(_rephrase_units(ctx)) and not STEP_DEFS["rephrase"].done(ctx),
    ),
    "export": (
        "a file in export's hidden build directory, `export/` not yet in place",
        lambda ctx: not (ctx.run / "export").exists() and any(_files(b) for b in ctx.run.glob(".export.*")),
    ),
}


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


def child(step: str, recipe_path: str, report_path: str, ref_prefix: str) -> int:
    """Run one step to the end (the process the harness kills) and write what it did to ``report_path``."""
    from detox_sft.config import load_recipe

    recipe = load_recipe(recipe_path)
    report: dict[str, Any] = {}
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

    Protocol, one JSON object a line: a request ``{step, recipe, report, ref_prefix, log}`` is answered with
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
                rc = child(request["step"], request["recipe"], request["report"], request["ref_prefix"])
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


def _cpu_until(pid: int, seconds: float, poll: float = 0.02) -> float | None:
    """Wait until ``pid`` has used ``seconds`` of CPU; its CPU time then, or `None` if it ended first."""
    while True:
        used = _cpu_seconds(pid)
        if used is None or used >= seconds:
            return used
        time.sleep(poll)


def _wall_until(pid: int, deadline: float, poll: float = 0.005) -> bool:
    """Wait until ``time.perf_counter()`` reaches ``deadline``; whether ``pid`` is still running then."""
    while time.perf_counter() < deadline:
        if _cpu_seconds(pid) is None:
            return False
        time.sleep(min(poll, max(0.0, deadline - time.perf_counter())))
    return _cpu_seconds(pid) is not None


def _seen_until(pid: int, seen: Callable[[], bool], what: str, timeout: float, poll: float = 0.02) -> bool:
    """Wait until ``seen()``; whether ``pid`` is still running then (`False`: it ended first).

    Raises:
        TimeoutError: ``timeout`` wall seconds passed without it (the child is killed first).
    """
    deadline = time.monotonic() + timeout
    while _cpu_seconds(pid) is not None:
        if seen():
            return _cpu_seconds(pid) is not None
        if time.monotonic() > deadline:
            _kill_group(pid)
            raise TimeoutError(f"waited {timeout:.0f} s for {what}; the child still ran (killed): see its log")
        time.sleep(poll)
    return False


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
        seed: the kill moments' seed.
        trials: trials per step.
        s3: a started :class:`detox_sft_dev.s3.LocalS3` (needed by upload and download), or `None`.
    """

    def __init__(
        self,
        work: Path,
        results: Path = RESULTS,
        seed: int = 0,
        trials: int = 10,
        s3: Any = None,
        command: str = COMMAND,
    ) -> None:
        self.work, self.results, self.seed, self.trials, self.s3 = Path(work), Path(results), seed, trials, s3
        self.command = command  # recorded in each trial: how to make it again
        self.run = self.work / "run"
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.reference_s: dict[str, float] = {}  # the reference run's duration, on the step's CLOCK
        self.reference_wall: dict[str, float] = {}
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
        if self.s3 is not None:
            env.update(self.s3.env())
        return env

    def _start(self, step: str, which: str, log_name: str, fsize: int | None = None) -> tuple[int, Path]:
        """Fork the step's child (``fsize``: a file-size limit in bytes for its writes); (its pid, its report)."""
        if self.zygote is None:
            self.zygote = Zygote(self._env())
        report = self.work / f"report-{log_name}.json"
        report.unlink(missing_ok=True)
        request = {
            "step": step,
            "recipe": str(self.recipes[which]),
            "report": str(report),
            "ref_prefix": self.ctx().ref_prefix,
            "log": str(self.logs / f"{log_name}.log"),
            "fsize": fsize,
        }
        return self.zygote.start(request), report

    def _run_to_end(self, step: str, which: str, log_name: str) -> tuple[int, float, float, dict[str, Any]]:
        """Run ``step`` to its end: (exit code, wall s, CPU s, the child's report)."""
        if self.zygote is None:
            self.zygote = Zygote(self._env())  # its start-up (the imports) is not the step's time
        started = time.perf_counter()
        _, report = self._start(step, which, log_name)
        rc, cpu = self.zygote.wait()
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
        """The uninterrupted run of ``step`` (from the previous step's reference output); returns its CPU time."""
        state = self.work / "after" / f"{step}.json"
        saved = _read_json(state)
        if saved and self._snapshot(step).is_dir():
            self.reference_s[step], self.reference_wall[step] = saved[f"{CLOCK[step]}_s"], saved["wall_s"]
            self._load_reference_outputs(step)
            if self.reference_out[step]:  # (an upload's reference lives in the S3 server's data: it may be gone)
                return self.reference_s[step]
        self._restore_inputs(step)
        if step == "upload":
            self._clear_prefix("faults/ref")
        rc, wall, cpu, _ = self._run_to_end(step, "ref", f"{step}-reference")
        if rc != 0:
            raise RuntimeError(
                f"the reference run of {step} failed (rc {rc}); see {self.logs / f'{step}-reference.log'}"
            )
        snapshot = self._snapshot(step)
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(self.run, snapshot, copy_function=shutil.copy2, symlinks=True)
        for again in range(1, _WALL_RUNS if CLOCK[step] == "wall" else 1):  # the same run, from the same state
            self._restore_inputs(step)
            if step == "upload":
                self._clear_prefix("faults/ref")
            rc, other, _, _ = self._run_to_end(step, "ref", f"{step}-reference-{again}")
            if rc != 0:
                raise RuntimeError(f"a reference run of {step} failed (rc {rc})")
            wall = min(wall, other)
        state.write_text(json.dumps({"cpu_s": cpu, "wall_s": wall}))
        self.reference_s[step], self.reference_wall[step] = (cpu if CLOCK[step] == "cpu" else wall), wall
        self._load_reference_outputs(step)
        print(f"[faults] {step}: reference run {cpu:.1f} CPU s ({wall:.1f} s wall)", flush=True)
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
        self,
        step: str,
        trial: int,
        fraction: float | None = None,
        progress: tuple[str, Callable] | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Kill ``step`` at ``fraction`` of its reference duration, or once ``progress`` (an entry of :data:`PROGRESS`)
        is seen (waiting at most ``timeout`` s), rerun it, compare; returns (and writes) the record."""
        s, ctx = STEP_DEFS[step], self.ctx()
        ref_s, ref = self.reference_s[step], self.reference_out[step]
        self._restore_inputs(step)
        name = f"{step}-{trial:02d}"
        if self.zygote is None:
            self.zygote = Zygote(self._env())  # its start-up (the imports) is not the step's time
        started = time.perf_counter()
        pid, _ = self._start(step, "trial", f"{name}-killed")
        if progress is not None:
            running = _seen_until(pid, lambda: progress[1](ctx), progress[0], timeout)
            used = _cpu_seconds(pid) if CLOCK[step] == "cpu" else time.perf_counter() - started
            kill_after = used if used is not None else ref_s  # the moment the progress was seen, on the step's clock
            fraction = kill_after / ref_s
        elif CLOCK[step] == "cpu":
            kill_after = fraction * ref_s
            running = _cpu_until(pid, kill_after) is not None
        else:
            kill_after = fraction * ref_s
            running = _wall_until(pid, started + kill_after)
        killed_at = time.perf_counter() - started
        if running:
            _kill_group(pid)
        rc_killed, _ = self.zygote.wait()
        exited = None if running else rc_killed
        record: dict[str, Any] = {
            "step": step,
            "seed": self.seed,
            "trial": trial,
            "fraction": round(fraction, 4),
            **({"kill_on": progress[0]} if progress is not None else {}),
            "clock": CLOCK[step],
            "kill_after_s": round(kill_after, 2),
            "reference_s": round(ref_s, 2),
            "killed_at_wall_s": round(killed_at, 1),
            "reference_wall_s": round(self.reference_wall[step], 1),
            "killed": exited is None,
            "exit_before_kill": exited,
            "load_average": round(os.getloadavg()[0], 1),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": self.command,
        }
        units = s.units(ctx)
        record["phase"] = s.phase(ctx, units) if exited is None else "finished before the kill"
        record["units_at_kill"] = len(units)
        record["done_after_kill"] = s.done(ctx)
        false_done = _false_done(step, ctx, ref)
        rc, rerun_wall, rerun_cpu, report = self._run_to_end(step, "trial", f"{name}-rerun")
        rerun_s = rerun_cpu if CLOCK[step] == "cpu" else rerun_wall
        after = s.units(ctx)
        differences = s.compare(ref, s.outputs(ctx)) if rc == 0 else [f"rerun failed (rc {rc})"]
        redone = s.redone(units, after, report) if rc == 0 else []
        litter = _litter(self.run)
        record.update(
            rerun_rc=rc,
            rerun_s=round(rerun_s, 2),
            redone=redone,
            differences=differences,
            false_done=false_done,
            litter=litter,
        )
        if exited is not None:
            outcome = "not interrupted"
        elif false_done:
            outcome = "false done"
        elif redone or differences:
            outcome = "lost"
        else:
            outcome = "survived"
        record["outcome"] = outcome
        path = self.record_path(step, trial)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
        print(
            f"[faults] {step} trial {trial}: kill at {kill_after:.2f} {CLOCK[step]} s ({fraction:.2f} of {ref_s:.2f}), "
            f"{record['phase']}: {outcome}"
            + (f" {redone + differences + false_done}" if outcome != "survived" else ""),
            flush=True,
        )
        return record

    def run_steps(self, steps: list[str], redo: bool = False, deadline: float | None = None) -> list[dict[str, Any]]:
        """References for every step up to the last of ``steps``, then the trials, round robin over the steps.

        Each step gets ``trials`` killed runs: a trial whose run ended before its kill does not count, and another one
        (from a further seeded set of moments) takes its place, up to twice ``trials`` in all.
        """
        needed = STEPS[: max(STEPS.index(s) for s in steps) + 1]
        for step in needed:
            self.reference(step)
        records: list[dict[str, Any]] = []
        next_trial = dict.fromkeys(steps, 0)
        killed = dict.fromkeys(steps, 0)
        while True:
            pending = [s for s in steps if killed[s] < self.trials and next_trial[s] < 2 * self.trials]
            if not pending:
                return records
            for step in pending:
                if deadline is not None and time.time() > deadline:
                    print("[faults] time is up: stopping; the records so far are kept", flush=True)
                    return records
                trial = next_trial[step]
                next_trial[step] += 1
                path = self.record_path(step, trial)
                if path.is_file() and not redo:
                    killed[step] += bool(json.loads(path.read_text())["killed"])
                    continue
                fraction = fractions(self.seed, step, self.trials, trial // self.trials)[trial % self.trials]
                record = self.trial(step, trial, fraction)
                records.append(record)
                killed[step] += record["killed"]


# --------------------------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------------------------


def load_records(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every trial record under ``results``, by step (in pipeline order), seed and trial."""
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*/seed*.json"))]
    return sorted(records, key=lambda r: (STEPS.index(r["step"]), r["seed"], r["trial"]))


def _thirds(records: list[dict[str, Any]]) -> list[int]:
    counts = [0, 0, 0]
    for r in records:
        counts[min(2, int(r["fraction"] * 3))] += 1
    return counts


def render_report(records: list[dict[str, Any]], env_records: list[dict[str, Any]] = ()) -> str:
    """FAULTS.md from the trial records: definitions, a summary per step, every trial; then the environment's faults."""
    lines = [
        "# Fault injection: each long step killed with SIGKILL, rerun, compared",
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
        "An uninterrupted reference run gives the step's duration D; each trial restores the step's inputs in the "
        "same run directory, starts the step in a child process, SIGKILLs its process group once it has run for "
        "f x D (f: one seeded uniform draw in each tenth of [0, 0.95)), records what the kill left, reruns the step "
        "to the end and compares with the reference. D is the child's CPU time for the compute-bound steps (on this "
        "shared 2-core box the wall time of one run varies several-fold with the load, its CPU time little) and "
        "wall time for upload and download, which mostly wait on the S3 server (a local SeaweedFS). The children "
        "are forked from a process that has imported the libraries once, so D is the step's own work. A run that "
        "ended before its kill is listed as not interrupted and replaced by another trial. The phase column says "
        "what the run was doing when it was killed.",
        "",
        "## What counts as lost (fixed before measuring)",
        "",
    ]
    lines += [f"- **{step}**: {LOSS[step]}" for step in STEPS]
    lines += [
        "",
        "A **false done** is a completion marker the killed run left (or a rerun that finished) vouching for output "
        "that is partial or differs from the reference. **Litter**: hidden temporary files a killed writer left that "
        "the rerun did not remove (not outputs; listed, not counted as lost).",
        "",
        "## Summary",
        "",
        "| step | reference run | trials (killed) | kills in 1st / 2nd / 3rd third | survived | lost | false done "
        "| not interrupted | litter | phases hit |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    by_step = {step: [r for r in records if r["step"] == step] for step in STEPS}
    for step, rs in by_step.items():
        if not rs:
            lines.append(f"| {step} | | 0 | | | | | | | |")
            continue
        killed = [r for r in rs if r["killed"]]
        thirds = _thirds(killed)
        count = {o: sum(r["outcome"] == o for r in rs) for o in ("survived", "lost", "false done", "not interrupted")}
        phases = sorted({r["phase"].split(" (")[0] for r in killed})
        lines.append(
            f"| {step} | {rs[0]['reference_s']:.2f} {rs[0]['clock']} s | {len(killed)} | {' / '.join(map(str, thirds))} | "
            f"{count['survived']} | {count['lost']} | {count['false done']} | {count['not interrupted']} | "
            f"{sum(bool(r['litter']) for r in rs)} | {'; '.join(phases)} |"
        )
    total = [r for r in records if r["killed"]]
    lines += [
        "",
        f"Total: {len(total)} killed runs, {sum(r['outcome'] == 'survived' for r in total)} survived, "
        f"{sum(r['outcome'] == 'lost' for r in total)} lost, {sum(r['outcome'] == 'false done' for r in total)} "
        "false done.",
        "",
        "## Trials",
    ]
    for step, rs in by_step.items():
        if not rs:
            continue
        lines += [
            "",
            f"### {step}",
            "",
            "| seed | trial | kill at | fraction | phase at the kill | units at the kill | marker said done "
            "| rerun | outcome | details |",
            "|---:|---:|---:|---:|---|---:|---|---:|---|---|",
        ]
        for r in rs:
            details = "; ".join(
                r["redone"] + r["differences"] + r["false_done"] + [f"litter: {x}" for x in r["litter"]]
            )
            lines.append(
                f"| {r['seed']} | {r['trial']} | {r['kill_after_s']:.2f} {r['clock']} s | {r['fraction']:.2f} | {r['phase']} | "
                f"{r['units_at_kill']} | {'yes' if r['done_after_kill'] else 'no'} | {r['rerun_s']:.2f} {r['clock']} s | "
                f"{r['outcome']} | {details.replace('|', '/')} |"
            )
    if env_records:
        lines += render_env(list(env_records))
    return "\n".join(lines) + "\n"


ENV_CASES = ("disk-full", "s3-restart", "model-server-kill")  # faults_env.CASES, in report order


def load_env_records(results: Path = RESULTS / "env") -> list[dict[str, Any]]:
    """The records of benchmarks/faults_env.py (the disk full, the S3 server or the model server killed)."""
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*/seed*.json"))]
    return sorted(records, key=lambda r: (ENV_CASES.index(r["case"]), r["seed"], r["trial"]))


_ENV_TEXT = {
    "disk-full": (
        "**The disk full during a write** (`RLIMIT_FSIZE`, as `ulimit -f` sets it: every write past the limit fails "
        "with EFBIG, as a full disk fails with ENOSPC). The limit is f x the largest file the step writes (f seeded, "
        "one draw in each slice of [0, 0.95)). A run that finishes under the limit must have written the whole "
        "reference output; a run that fails must leave no marker vouching for partial output, and the rerun without "
        "the limit must give the reference's output without redoing finished units (the same definitions as above)."
    ),
    "s3-restart": (
        "**The S3 server killed mid-transfer and restarted**: SeaweedFS SIGKILLed at f x the transfer's reference "
        "wall time and started again at once on the same data and ports. The transfer finishes (botocore's retries) "
        "or fails with an error, in both cases within 120 s (else: a hang); no false done; the rerun is compared as "
        "above."
    ),
    "model-server-kill": (
        "**The model server killed mid-request**: the caikit runtime serving the offline export is SIGKILLed at f x "
        "the duration of a 60-token generation (measured on the same warm server just before); the HTTP and the gRPC "
        "client alternate. Survived: the client raises a typed `ModelServerError` within 120 s; not an answer, not "
        "another exception, not a hang."
    ),
}


def render_env(records: list[dict[str, Any]]) -> list[str]:
    """FAULTS.md's section on the faults of the environment."""
    lines = ["", "## Faults of the environment", "", "Made by `benchmarks/faults_env.py` (in `make faults`). "]
    lines[-1] += "Records in `benchmarks/results/faults/env/`; commands: " + ", ".join(
        f"`{c}`" for c in sorted({r["command"] for r in records})
    )
    for case in ENV_CASES:
        rs = [r for r in records if r["case"] == case]
        if not rs:
            continue
        lines += ["", _ENV_TEXT[case], ""]
        outcomes = sorted({r["outcome"] for r in rs})
        lines.append(f"{len(rs)} trials: " + ", ".join(f"{sum(r['outcome'] == o for r in rs)} {o}" for o in outcomes))
        lines.append("")
        if case == "disk-full":
            lines += [
                "| trial | step | limit | of the largest file | exit | error (short) | names the cause | marker said done "
                "| rerun | outcome | details |",
                "|---:|---|---:|---|---:|---|---|---|---:|---|---|",
            ]
            for r in rs:
                error = (r["error"] or "").split(". Fix")[0][:90]
                details = "; ".join(r["redone"] + r["differences"] + r["false_done"])
                lines.append(
                    f"| {r['trial']} | {r['step']} | {r['limit_bytes']} B | {r['fraction']:.2f} of {r['largest_written']} "
                    f"({r['largest_bytes']} B) | {r['rc']} | {error.replace('|', '/')} | "
                    f"{'yes' if r['error_names_the_cause'] else 'no'} | {'yes' if r['done_after_failure'] else 'no'} | "
                    f"{r['rerun_wall_s']:.1f} s | {r['outcome']} | {details.replace('|', '/')} |"
                )
        elif case == "s3-restart":
            lines += [
                "| trial | step | server killed at | of | restart | exit | error (short) | rerun | outcome | details |",
                "|---:|---|---:|---:|---:|---:|---|---:|---|---|",
            ]
            for r in rs:
                error = (r["error"] or "finished").split(". Fix")[0][:90]
                details = "; ".join(r["redone"] + r["differences"] + r["false_done"])
                restart = "" if r["restart_s"] is None else f"{r['restart_s']:.1f} s"
                lines.append(
                    f"| {r['trial']} | {r['step']} | {r['killed_at_wall_s']:.2f} s | {r['reference_wall_s']:.2f} s | "
                    f"{restart} | {r['rc']} | {error.replace('|', '/')} | {r['rerun_wall_s']:.1f} s | {r['outcome']} | "
                    f"{details.replace('|', '/')} |"
                )
        else:
            lines += [
                "| trial | client | request | killed at | error after | error | outcome |",
                "|---:|---|---:|---:|---:|---|---|",
            ]
            for r in rs:
                after = "" if r["seconds_to_outcome"] is None else f"{r['seconds_to_outcome']:.2f} s"
                lines.append(
                    f"| {r['trial']} | {r['client']} | {r['request_s']:.2f} s | {r['killed_at_s']:.2f} s | {after} | "
                    f"{(r['error'] or '')[:90].replace('|', '/')} | {r['outcome']} |"
                )
    return lines


def write_report(results: Path = RESULTS, report: Path = REPORT) -> Path:
    """Regenerate FAULTS.md from the records (the kills, and the faults of the environment)."""
    report.write_text(render_report(load_records(results), load_env_records(results / "env")))
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
    sub.add_parser("zygote", help="import once, fork a child per request (used by the harness)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--trials", type=int, default=10, help="trials per step (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch directory (default: benchmarks/results/faults-work)")
    parser.add_argument("--redo", action="store_true", help="run trials whose record exists again")
    parser.add_argument("--minutes", type=float, default=None, help="stop starting trials after this long")
    parser.add_argument("--report", action="store_true", help="only regenerate FAULTS.md from the records")
    args = parser.parse_args(argv)
    command = " ".join([".venv/bin/python", "benchmarks/faults.py", *(sys.argv[1:] if argv is None else argv)])
    if args.command == "child":
        return child(args.step, args.recipe, args.report, args.ref_prefix)
    if args.command == "zygote":
        return zygote()
    if not args.report:
        work = Path(args.work) if args.work else ROOT / "benchmarks" / "results" / "faults-work"
        deadline = time.time() + args.minutes * 60 if args.minutes else None
        with contextlib.ExitStack() as stack:
            s3 = None
            if {"upload", "download"} & set(args.steps):
                from detox_sft_dev.s3 import LocalS3

                s3 = stack.enter_context(LocalS3(bucket="detox-sft", data_dir=work / "s3"))
            # SIGTERM stops like Ctrl-C: the zygote and the S3 server are stopped on the way out
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            harness = Harness(work, seed=args.seed, trials=args.trials, s3=s3, command=command)
            stack.enter_context(contextlib.closing(harness))
            harness.run_steps(args.steps, args.redo, deadline)
    print(f"[faults] report: {write_report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
