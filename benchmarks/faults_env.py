"""Faults of the environment: the disk full during a write, the S3 server killed mid-transfer, the model server killed
mid-request.

The companion of :mod:`faults` (which SIGKILLs the steps themselves), on the same shrunk offline recipe, the same
reference runs and the same definitions of "lost" and "false done" (:data:`faults.LOSS`):

- **disk-full** (rephrase, train, evaluate, export, download): the step runs with a file-size limit (``RLIMIT_FSIZE``,
  as ``ulimit -f`` sets it: a write past it fails with EFBIG, as a full disk fails with ENOSPC) of ``f`` times the
  largest file the step writes (``f`` seeded, one draw in each 1/n slice of [0, 0.95)). A run that still finishes
  must have written exactly the reference's output (else: false done); a run that fails must leave no completion
  marker vouching for partial output, and a rerun without the limit must give the reference's output without redoing
  finished units.
- **s3-restart** (upload, download): the local SeaweedFS is SIGKILLed once the transfer has run for ``f`` times its
  reference duration and started again at once on the same data and ports. The transfer either finishes (retries) or
  fails with an error; either way within :data:`HANG_S` (else: hang), with no false done; then it is rerun and
  compared.
- **model-server-kill** (HTTP and gRPC alternately): a caikit runtime serves the offline export; a long generation
  request is sent and the runtime's process group SIGKILLed at ``f`` times that request's duration (measured just
  before, on the same warm server). The client must raise a typed :class:`detox_sft.clients.ModelServerError` within
  :data:`HANG_S` (not a hang, not another exception, not an answer after the kill).

Records: ``benchmarks/results/faults/env/<case>/seed<seed>-<nn>.json``; FAULTS.md's "Faults of the environment"
section is generated from them (:func:`faults.write_report`). Run: ``make faults`` (both scripts) or
``.venv/bin/python benchmarks/faults_env.py --trials 4 --seed 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults as F  # noqa: E402 - the sibling script, importable once its directory is on the path

ENV_RESULTS = F.RESULTS / "env"
CASES = ("disk-full", "s3-restart", "model-server-kill")
DISK_STEPS = ("rephrase", "train", "evaluate", "export", "download")
S3_STEPS = ("upload", "download")
HANG_S = 120.0  # longer than any bounded retry of the S3 client or the model clients: past it, a run hangs
MIN_LIMIT = 1024  # below this even the child's short error report could not be written
COMMAND = F.ENV_COMMAND
# what a message that names the cause says: the errno's text, or the package's own disk-full message
_NAMES_CAUSE = re.compile(r"File too large|file-size limit|No space left|disk is full|No room|Errno 27|Errno 28", re.I)


def _write_record(case: str, seed: int, trial: int, record: dict[str, Any], results: Path) -> dict[str, Any]:
    path = results / case / f"seed{seed}-{trial:02d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return record


def _base(case: str, seed: int, trial: int, fraction: float, command: str) -> dict[str, Any]:
    return {
        "case": case,
        "seed": seed,
        "trial": trial,
        "fraction": round(fraction, 4),
        "load_average": round(os.getloadavg()[0], 1),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
    }


def _rerun_and_compare(h: F.Harness, step: str, name: str, units: dict[str, Any]) -> dict[str, Any]:
    """Rerun ``step`` to its end without any fault; what it redid and how its output differs from the reference."""
    s, ctx = F.STEP_DEFS[step], h.ctx()
    rc, wall, _, report = h._run_to_end(step, "trial", f"{name}-rerun")
    return {
        "rerun_rc": rc,
        "rerun_wall_s": round(wall, 2),
        "redone": s.redone(units, s.units(ctx), report) if rc == 0 else [],
        "differences": s.compare(h.reference_out[step], s.outputs(ctx)) if rc == 0 else [f"rerun failed (rc {rc})"],
        "litter": F._litter(h.run),
    }


def _outcome(record: dict[str, Any]) -> str:
    if record.get("hang"):
        return "hang"
    if record["false_done"]:
        return "false done"
    if record["redone"] or record["differences"]:
        return "lost"
    return "survived"


def _wait_bounded(h: F.Harness, pid: int) -> tuple[int, bool]:
    """Wait for the child ``pid`` at most :data:`HANG_S`; (its exit code, whether it had to be killed as hung)."""
    hung = F._wall_until(pid, time.perf_counter() + HANG_S, poll=0.05)
    if hung:
        F._kill_group(pid)
    rc, _ = h.zygote.wait()
    return rc, hung


# -- disk full --------------------------------------------------------------------------------------------------------


def _written_sizes(h: F.Harness, step: str) -> dict[str, int]:
    """Sizes of the files ``step``'s reference run wrote (new or changed against its inputs)."""
    after = F._files(h._snapshot(step))
    before_step = F.STEPS[F.STEPS.index(step) - 1] if F.STEPS.index(step) else None
    before = F._files(h._snapshot(before_step)) if before_step else {}
    return {
        rel: path.stat().st_size
        for rel, path in after.items()
        if rel not in before or F._sha(before[rel]) != F._sha(path)
    }


def disk_full_trial(h: F.Harness, step: str, trial: int, fraction: float, results: Path, command: str) -> dict:
    s, ctx = F.STEP_DEFS[step], h.ctx()
    sizes = _written_sizes(h, step)
    largest = max(sizes, key=sizes.get)
    limit = max(MIN_LIMIT, int(fraction * sizes[largest]))
    h._restore_inputs(step)
    name = f"disk-{step}-{trial:02d}"
    pid, report_path = h._start(step, "trial", f"{name}-full", fsize=limit)
    rc, hung = _wait_bounded(h, pid)
    error = (F._read_json(report_path) or {}).get("error") if rc != 0 else None
    record = _base("disk-full", h.seed, trial, fraction, command) | {
        "step": step,
        "limit_bytes": limit,
        "largest_written": largest,
        "largest_bytes": sizes[largest],
        "rc": rc,
        "hang": hung,
        "error": error,
        "error_names_the_cause": bool(error and _NAMES_CAUSE.search(error)),
        "done_after_failure": s.done(ctx),
    }
    units = s.units(ctx)
    record["units_at_failure"] = len(units)
    if rc == 0:  # it finished under the limit: what it wrote must be the whole output
        diffs = s.compare(h.reference_out[step], s.outputs(ctx))
        record.update(false_done=[f"finished under the limit but {d}" for d in diffs])
    else:
        record.update(false_done=F._false_done(step, ctx, h.reference_out[step]))
    record.update(_rerun_and_compare(h, step, name, units))
    record["outcome"] = "limit not reached" if rc == 0 and not record["false_done"] else _outcome(record)
    _log(record, f"limit {limit} B ({fraction:.2f} of {largest}, {sizes[largest]} B): rc {rc}, {error}")
    return _write_record("disk-full", h.seed, trial, record, results)


# -- the S3 server killed mid-transfer ----------------------------------------------------------------------------------


def s3_restart_trial(h: F.Harness, step: str, trial: int, fraction: float, results: Path, command: str) -> dict:
    s, ctx = F.STEP_DEFS[step], h.ctx()
    h._restore_inputs(step)
    name = f"s3-{step}-{trial:02d}"
    started = time.perf_counter()
    pid, report_path = h._start(step, "trial", f"{name}-restart")
    running = F._wall_until(pid, started + fraction * h.reference_wall[step])
    killed_at = time.perf_counter() - started
    restart_s = None
    if running:
        process = h.s3._process
        process.kill()  # SIGKILL: no drain, no goodbye to the clients
        process.wait()
        t0 = time.perf_counter()
        h.s3.restart()  # same data, ports and credentials
        restart_s = time.perf_counter() - t0
    rc, hung = _wait_bounded(h, pid)
    error = (F._read_json(report_path) or {}).get("error") if rc != 0 else None
    units = s.units(ctx)
    record = _base("s3-restart", h.seed, trial, fraction, command) | {
        "step": step,
        "killed_at_wall_s": round(killed_at, 2),
        "reference_wall_s": round(h.reference_wall[step], 2),
        "server_killed": running,
        "restart_s": None if restart_s is None else round(restart_s, 1),
        "rc": rc,
        "hang": hung,
        "error": error,
        "units_at_end": len(units),
        "done_after": s.done(ctx),
        "false_done": F._false_done(step, ctx, h.reference_out[step]),
    }
    if rc == 0 and step == "download":  # finished: every file must be the reference's
        record["false_done"] += [f"finished but {d}" for d in s.compare(h.reference_out[step], s.outputs(ctx))]
    record.update(_rerun_and_compare(h, step, name, units))
    record["outcome"] = "not interrupted" if not running else _outcome(record)
    _log(record, f"server killed at {killed_at:.2f} s: {'finished' if rc == 0 else error}")
    return _write_record("s3-restart", h.seed, trial, record, results)


# -- the model server killed mid-request --------------------------------------------------------------------------------

LONG_TOKENS = 60  # the zoo OPT's context is 128 positions: a long answer that fits


def model_server_trial(models_dir: Path, trial: int, fraction: float, seed: int, results: Path, command: str) -> dict:
    from detox_sft.clients import CaikitGrpcClient, CaikitHttpClient, ModelServerError
    from detox_sft_dev.model_server import LocalModelServer, model_ids

    kind = ("http", "grpc")[trial % 2]
    model_id = model_ids(models_dir)[0]
    server = LocalModelServer(models_dir).start()
    try:
        if kind == "http":
            client = CaikitHttpClient(server.http_url, timeout=HANG_S / 2, retries=1, backoff=0.1)
        else:
            client = CaikitGrpcClient(server.grpc_target, plaintext=True, timeout=HANG_S / 2, retries=1, backoff=0.1)
        ask = {"max_new_tokens": LONG_TOKENS, "min_new_tokens": LONG_TOKENS}
        client.generate_text(model_id, "hello", max_new_tokens=2)  # warm: connection, message types
        t0 = time.perf_counter()
        client.generate_text(model_id, "the host said", **ask)
        duration = time.perf_counter() - t0
        result: dict[str, Any] = {}

        def request() -> None:
            start = time.perf_counter()
            try:
                result["text"] = client.generate_text(model_id, "the host said", **ask)
            except Exception as exc:  # classified below: a typed error or not
                result["error"] = exc
            result["seconds"] = time.perf_counter() - start

        thread = threading.Thread(target=request, daemon=True)
        sent = time.perf_counter()
        thread.start()
        time.sleep(max(0.0, sent + fraction * duration - time.perf_counter()))
        killed_at = time.perf_counter() - sent
        answered_before = "seconds" in result
        os.killpg(server.process.pid, signal.SIGKILL)
        thread.join(HANG_S)
    finally:
        server.stop()
    exc = result.get("error")
    record = _base("model-server-kill", seed, trial, fraction, command) | {
        "client": kind,
        "request_s": round(duration, 3),
        "killed_at_s": round(killed_at, 3),
        "seconds_to_outcome": None if "seconds" not in result else round(result["seconds"], 3),
        "error": None if exc is None else f"{type(exc).__name__}: {exc}"[:300],
        "typed": isinstance(exc, ModelServerError),
        "status": getattr(exc, "status", None),
    }
    if thread.is_alive():
        outcome = "hang"
    elif answered_before:
        outcome = "not interrupted"
    elif "text" in result:
        outcome = "answered after the kill"
    else:
        outcome = "typed error" if record["typed"] else "untyped error"
    record["outcome"] = outcome
    _log(record, f"{kind} request of {duration:.2f} s, server killed at {killed_at:.2f} s: {record['error']}")
    return _write_record("model-server-kill", seed, trial, record, results)


# -- running -----------------------------------------------------------------------------------------------------------


def _log(record: dict[str, Any], what: str) -> None:
    where = record.get("step") or record.get("client")
    print(f"[faults-env] {record['case']} {where} trial {record['trial']}: {what} -> {record['outcome']}", flush=True)


def run_cases(
    cases: list[str], work: Path, seed: int, trials: int, results: Path, command: str, redo: bool = False
) -> list[dict[str, Any]]:
    """The trials of ``cases``; records already written for the same seed and trial are kept unless ``redo``."""
    from detox_sft_dev.s3 import LocalS3

    done: list[dict[str, Any]] = []

    def existing(case: str, trial: int) -> dict[str, Any] | None:
        path = results / case / f"seed{seed}-{trial:02d}.json"
        return json.loads(path.read_text()) if path.is_file() and not redo else None

    def until(
        case: str, key: str, wanted: int, hit: Callable[[dict[str, Any]], bool], run: Callable, trial: int
    ) -> int:
        """Trials of one step from ``trial`` on until ``wanted`` of them hit (a run that ended before its fault does
        not count: another moment, from a further seeded block, takes its place), at most twice ``wanted``."""
        hits = 0
        for block in range(2):
            for fraction in F.fractions(seed, key, wanted, block):
                if hits >= wanted:
                    return trial
                record = existing(case, trial) or run(trial, fraction)
                done.append(record)
                hits += hit(record)
                trial += 1
        return trial

    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(LocalS3(bucket="detox-sft", data_dir=work / "s3"))
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        h = F.Harness(work, seed=seed, trials=trials, s3=s3, command=command)
        stack.enter_context(contextlib.closing(h))
        for step in F.STEPS:
            h.reference(step)
        if "disk-full" in cases:
            trial = 0
            for step in DISK_STEPS:

                def disk(t: int, f: float, step: str = step) -> dict[str, Any]:
                    return disk_full_trial(h, step, t, f, results, command)

                trial = until("disk-full", f"disk-{step}", trials, lambda r: r["rc"] != 0, disk, trial)
        if "s3-restart" in cases:
            trial = 0
            for step in S3_STEPS:

                def restart(t: int, f: float, step: str = step) -> dict[str, Any]:
                    return s3_restart_trial(h, step, t, f, results, command)

                trial = until("s3-restart", f"s3-{step}", trials, lambda r: r["server_killed"], restart, trial)
        if "model-server-kill" in cases:
            h.close()  # the zygote's memory is not needed while the runtime runs
            models_dir = h._snapshot("export") / "export" / "caikit"

            def serve(t: int, f: float) -> dict[str, Any]:
                return model_server_trial(models_dir, t, f, seed, results, command)

            hit = lambda r: r["outcome"] != "not interrupted"  # noqa: E731 - one line, read where it is used
            until("model-server-kill", "model-server", 2 * trials, hit, serve, 0)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--trials", type=int, default=4, help="trials per step (model server: twice this)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch directory (default: benchmarks/results/faults-work)")
    parser.add_argument("--redo", action="store_true", help="run trials whose record exists again")
    args = parser.parse_args(argv)
    command = " ".join([".venv/bin/python", "benchmarks/faults_env.py", *(sys.argv[1:] if argv is None else argv)])
    work = Path(args.work) if args.work else F.ROOT / "benchmarks" / "results" / "faults-work"
    run_cases(args.cases, work, args.seed, args.trials, ENV_RESULTS, command, args.redo)
    print(f"[faults-env] report: {F.write_report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
