"""Faults of the environment, seen through the `detox-sft` command: the disk full, the S3 server gone, the model
server gone, the Hugging Face hub unreachable or asked for an id it does not have.

Every trial runs the command a user runs (``.venv/bin/detox-sft <step> --recipe ...``, stderr captured), so a
traceback would show, and checks what a script or a Kubernetes Job sees: the exit status of the failure's class
(``detox-sft --help``: 3 no room, 4 S3 unreachable, 5 model server unreachable, 6 hub unreachable or no such id), no
"Traceback", a message that names the fix ("Fix:"), and nothing half-written reported done. The steps' inputs are
the kill harness's reference outputs (:mod:`faults`: the same shrunk offline recipe, the same comparisons):

- **disk-full** (rephrase, train, evaluate, export, download): the run directory is a tmpfs of the inputs' size plus
  ``f`` times what the step writes (``f`` seeded, one draw in each 1/n slice of [0, 0.95)): a real ENOSPC. Where no
  tmpfs can be mounted (not root), the command runs under ``RLIMIT_FSIZE`` of ``f`` times the largest file it writes
  (EFBIG) instead; the record's ``method`` says which. Then the tmpfs is grown ("free disk space") and the step rerun
  to its end through the harness's child (its report says what it redid), and compared with the reference.
- **s3-gone** (upload, download): the local SeaweedFS is killed before the command starts, or once the transfer has
  stored its first object (upload) or file (download), through a delay proxy so that the transfer takes seconds; it is
  started again only after the command has exited, then the step is rerun and compared.
- **model-server-gone** (query, HTTP and gRPC): the caikit runtime serving the offline export is killed before the
  command, or during its request: the command talks to it through a delay proxy (:data:`PROXY_DELAY_S` each way), and
  the runtime dies ``f`` times the round trip after the command's connection reached the proxy.
- **hub-unreachable** / **no-such-hub-id**: ``HF_HUB_OFFLINE=1`` and an empty HF cache, one recipe field at a time
  set to a hub id (every loader of every step: models, tokenizers, datasets, scorers) or to an id that does not exist.

Records: ``benchmarks/results/faults/env/<case>/seed<seed>-<step>-<nn>.json`` with the provenance of the run
(benchmarks/provenance.py); FAULTS.md's "Faults of the environment" section is rendered from them
(:func:`render_env`, called by :func:`faults.write_report`). Run: ``make faults`` or
``.venv/bin/python benchmarks/faults_env.py --trials 2 --seed 0`` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults as F  # noqa: E402 - the sibling script, importable once its directory is on the path
import provenance  # noqa: E402

ENV_RESULTS = F.RESULTS / "env"
CASES = ("disk-full", "s3-gone", "model-server-gone", "hub-unreachable", "no-such-hub-id")
ENV_CASES = CASES  # in report order
DISK_STEPS = ("rephrase", "train", "evaluate", "export", "download")
HANG_S = 180.0  # longer than any bounded retry plus the command's start-up: past it, a run hangs
DETOX_SFT = str(Path(sys.executable).with_name("detox-sft"))  # the venv's console script
BIG = "8g"  # a tmpfs "with free space" again: it only takes the memory its files use
# the recipe field of each loader, the hub id it is set to, and its "no such id" trial (one per step)
HUB_LOADERS: dict[str, list[tuple[str, str, str]]] = {
    "rephrase": [
        ("TMaRCo base model", "rephrase.base_model", "facebook/bart-large"),
        ("TMaRCo expert", "rephrase.expert", "trustyai/gplus"),
        ("TMaRCo anti-expert", "rephrase.anti_expert", "trustyai/gminus"),
        ("gate scorer", "rephrase.scorer", "facebook/roberta-hate-speech-dynabench-r4-target"),
        ("training dataset", "data.train_dataset", "allenai/real-toxicity-prompts"),
    ],
    "train": [("base model and tokenizer", "training.base_model", "facebook/opt-350m")],
    "evaluate": [
        ("base model", "training.base_model", "facebook/opt-350m"),
        ("scorer", "evaluation.scorers", "[facebook/roberta-hate-speech-dynabench-r4-target]"),
        ("eval dataset", "data.eval_dataset", "OxAISH-AL-LLM/wiki_toxic"),
        ("perplexity model", "evaluation.perplexity_model", "openai-community/gpt2-large"),
    ],
    "export": [("base model", "training.base_model", "facebook/opt-350m")],
}
NO_SUCH_ID = "no-such-org/no-such-model"
PROXY_DELAY_S = 0.5  # the model server's delay proxy, each way


def expected_status() -> dict[str, tuple[str, int]]:
    """Each case's typed error class and exit status, read from the command's own table (detox_sft.cli)."""
    from detox_sft.cli import EXIT_STATUS

    classes = {c.__name__: code for _, group, code in EXIT_STATUS[:4] for c in group}
    names = {"disk-full": "NoRoomError", "s3-gone": "S3UnavailableError", "model-server-gone": "ServerUnavailable"}
    names |= {"hub-unreachable": "HubUnavailable", "no-such-hub-id": "HubUnavailable"}
    return {case: (name, classes[name]) for case, name in names.items()}


# -- running the command ------------------------------------------------------------------------------------------


def run_command(
    argv: list[str], env: dict[str, str], fsize: int | None = None, kill: Any = None
) -> tuple[dict[str, Any], subprocess.Popen]:
    """Run ``detox-sft`` to its end (at most :data:`HANG_S`): command line, exit status, traceback, message, wall s.

    ``fsize``: a file-size limit (bytes) for its writes; ``kill(proc)``: called while it runs, e.g. to kill a server.
    """
    import resource

    def limit() -> None:
        if fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: nobody reads stderr while ``kill`` waits
        proc = subprocess.Popen(
            argv, env=env, cwd=F.ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True,
            start_new_session=True, preexec_fn=limit,
        )  # fmt: skip
        if kill is not None:
            kill(proc)
        hang = False
        try:
            proc.wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            hang = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err.seek(0)
        stderr = err.read()
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    # the command's own message (a progress bar cut short may precede it on its line)
    ours = [found.group(0) for line in lines if (found := re.search(r"detox-sft [a-z]+: .*", line))]
    return {
        "command": shlex.join([".venv/bin/detox-sft", *argv[1:]]),
        "rc": proc.returncode,
        "hang": hang,
        "traceback": "Traceback" in stderr,
        "message": ours[-1] if ours else next((line for line in reversed(lines) if line), ""),
        "wall_s": round(time.perf_counter() - started, 2),
        "stderr_tail": stderr[-1500:] if "Traceback" in stderr else "",  # what to fix, when it is a traceback
    }, proc


def _step_argv(h: F.Harness, step: str, *fields: str) -> list[list[str]]:
    """The command line(s) of ``step`` on the trial recipe, with ``--FIELD VALUE`` overrides."""
    recipe = ["--recipe", str(h.recipes["trial"])]
    if step == "download":
        return [
            [DETOX_SFT, "download", f"{h.ctx().ref_prefix}/{kind}", str(h.run / "download" / kind), "--no-progress"]
            for kind in F._KINDS
        ]
    if step == "upload":
        return [[DETOX_SFT, "upload", *recipe, "--create-bucket", "--no-progress"]]
    quiet = {"rephrase": ["--no-progress"], "evaluate": ["--quiet"]}.get(step, [])
    return [[DETOX_SFT, step, *recipe, *quiet, *fields]]


def run_step(h: F.Harness, step: str, env: dict[str, str], *fields: str, **options: Any) -> dict[str, Any]:
    """The step's command(s), in order until one fails (download: one command per kind)."""
    result: dict[str, Any] = {}
    for argv in _step_argv(h, step, *fields):
        one, _ = run_command(argv, env, **options)
        result = one | {"command": " && ".join(filter(None, [result.get("command"), one["command"]]))}
        if one["rc"] != 0:
            break
    return result


def _judge(record: dict[str, Any]) -> str:
    """A trial's outcome: survived when the exit status is the expected class's, with no traceback, a message
    naming the fix, no false done and (after a failure on a full disk) the reference's output from the rerun."""
    if record["hang"]:
        return "hang"
    if record.get("false_done"):
        return "false done"
    if record["rc"] == 0:
        return "not interrupted"
    if record["traceback"]:
        return "traceback"
    if record["rc"] != record["expected_status"]:
        return "wrong exit status"
    if not record["names_fix"]:
        return "no fix named"
    if record.get("redone") or record.get("differences"):
        return "lost"
    return "survived"


class EnvTrials:
    """The trials of one harness run: the kill harness ``h`` (references, comparisons), where records go."""

    def __init__(self, h: F.Harness, results: Path, prov: dict[str, Any]) -> None:
        self.h, self.results, self.prov = h, results, prov
        self.expected = expected_status()
        self.counts: dict[str, int] = {}

    def record(self, case: str, step: str, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
        trial = self.counts[case, step] = self.counts.get((case, step), -1) + 1
        name, status = self.expected[case]
        record = {"case": case, "step": step, "seed": self.h.seed, "trial": trial, **extra, **result}
        record |= {"expected_class": name, "expected_status": status, "names_fix": "Fix" in result["message"]}
        record |= {
            "load_average": round(os.getloadavg()[0], 1),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        record["outcome"] = _judge(record)
        record["provenance"] = self.prov
        provenance.write(self.results / case / f"seed{self.h.seed}-{step}-{trial:02d}.json", record)
        print(
            f"[faults-env] {case} {step} {trial}: rc {result['rc']}, {result['message'][:100]} -> {record['outcome']}"
        )
        return record

    def rerun(self, step: str, name: str, units: dict[str, Any]) -> dict[str, Any]:
        """Rerun ``step`` to its end through the harness's child; what it redid, how its output differs."""
        s, h = F.STEP_DEFS[step], self.h
        rc, wall, _, report = h._run_to_end(step, "trial", f"{name}-rerun")
        ctx = h.ctx()
        return {
            "rerun_rc": rc,
            "rerun_wall_s": round(wall, 2),
            "redone": s.redone(units, s.units(ctx), report) if rc == 0 else [],
            "differences": s.compare(h.reference_out[step], s.outputs(ctx)) if rc == 0 else [f"rerun failed ({rc})"],
            "litter": F._litter(h.run),
        }

    # -- disk full ----------------------------------------------------------------------------------------------------

    def _written(self, step: str) -> dict[str, int]:
        """Sizes of the files the step's reference run wrote (new or changed against its inputs)."""
        h = self.h
        after = F._files(h._snapshot(step))
        before_step = F.STEPS[F.STEPS.index(step) - 1] if F.STEPS.index(step) else None
        before = F._files(h._snapshot(before_step)) if before_step else {}
        changed = {rel for rel, p in after.items() if rel not in before or F._sha(before[rel]) != F._sha(p)}
        return {rel: after[rel].stat().st_size for rel in changed}

    def disk_full(self, step: str, fraction: float, method: str) -> dict[str, Any]:
        h, s = self.h, F.STEP_DEFS[step]
        written = self._written(step)
        out_bytes, largest = sum(written.values()), max(written, key=written.get)
        fsize = None
        shutil.rmtree(h.run, ignore_errors=True)
        if method == "tmpfs":  # the inputs, then room for f x the output: the tmpfs's size in pages
            before = F.STEPS[F.STEPS.index(step) - 1] if F.STEPS.index(step) else None
            inputs = (
                sum(-(-p.stat().st_size // 4096) * 4096 for p in F._files(h._snapshot(before)).values())
                if before
                else 0
            )
            h.run.mkdir(parents=True)
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={inputs + int(fraction * out_bytes)}",
                    "tmpfs",
                    str(h.run),
                ],
                check=True,
            )
            if before:
                shutil.copytree(h._snapshot(before), h.run, symlinks=True, dirs_exist_ok=True)
            stat = os.statvfs(h.run)
            room = stat.f_bavail * stat.f_frsize
        else:
            h._restore_inputs(step)
            room = fsize = max(1024, int(fraction * written[largest]))
        try:
            result = run_step(h, step, h._env(), fsize=fsize)
            ctx = h.ctx()
            units = s.units(ctx)
            extra = {"method": method, "fraction": round(fraction, 4), "room_bytes": room, "output_bytes": out_bytes}
            extra |= {"largest_written": largest, "units_at_failure": len(units), "marker_done": s.done(ctx)}
            if result["rc"] == 0:  # finished in the room it had: what it wrote must be the whole output
                extra["false_done"] = [f"finished but {d}" for d in s.compare(h.reference_out[step], s.outputs(ctx))]
            else:
                extra["false_done"] = F._false_done(step, ctx, h.reference_out[step])
                if method == "tmpfs":
                    subprocess.run(["mount", "-o", f"remount,size={BIG}", str(h.run)], check=True)
                extra |= self.rerun(step, f"disk-{step}-{self.counts.get(('disk-full', step), -1) + 1:02d}", units)
        finally:
            if method == "tmpfs":
                subprocess.run(["umount", "--lazy", str(h.run)], check=False)
        return self.record("disk-full", step, result, **extra)

    # -- S3 gone ------------------------------------------------------------------------------------------------------

    def s3_gone(self, step: str, when: str, proxy_url: str) -> dict[str, Any]:
        h, s = self.h, F.STEP_DEFS[step]
        h._restore_inputs(step)
        env = h._env() | {"AWS_S3_ENDPOINT": proxy_url}  # through the delay proxy: the transfer takes seconds
        seen: dict[str, Any] = {}

        def stored() -> bool:
            if step == "upload":
                listed = h.s3.client().list_objects_v2(Bucket=h.s3.bucket, Prefix=h.ctx().prefix + "/")
                return listed.get("KeyCount", 0) > 0
            return any(p.is_file() for p in (h.run / "download").rglob("*")) if (h.run / "download").is_dir() else False

        def kill(proc: subprocess.Popen | None) -> None:
            t0 = time.perf_counter()
            while proc is not None and proc.poll() is None and not stored():
                time.sleep(0.02)
            seen["server_killed_after_s"] = round(time.perf_counter() - t0, 2)
            seen["command_running"] = proc is None or proc.poll() is None
            h.s3._process.kill()  # SIGKILL: no drain, no goodbye to the clients
            h.s3._process.wait()

        if when == "before":
            kill(None)
        result: dict[str, Any] = {}
        for argv in _step_argv(h, step):
            one, _ = run_command(argv, env, kill=None if seen else kill)
            result = one | {"command": " && ".join(filter(None, [result.get("command"), one["command"]]))}
            if one["rc"] != 0:
                break
        h.s3.restart()
        ctx = h.ctx()
        units = s.units(ctx)
        extra = {"when": when, **seen, "false_done": F._false_done(step, ctx, h.reference_out[step])}
        if result["rc"] == 0 and step == "download":
            extra["false_done"] += [f"finished but {d}" for d in s.compare(h.reference_out[step], s.outputs(ctx))]
        extra |= self.rerun(step, f"s3-{step}-{when}", units)
        return self.record("s3-gone", step, result, **extra)

    # -- the model server gone ----------------------------------------------------------------------------------------

    def model_server_gone(self, client: str, when: str, fraction: float) -> dict[str, Any]:
        from s3 import DelayProxy  # benchmarks/s3.py

        from detox_sft_dev.model_server import LocalModelServer, model_ids

        class CountingProxy(DelayProxy):
            """The delay proxy, counting the connections it accepted: the command's request is in flight."""

            connections = 0

            async def _serve(self, client_reader, client_writer) -> None:
                self.connections += 1
                try:
                    await super()._serve(client_reader, client_writer)
                except OSError:  # the server is gone: close, as its own port would refuse (not a silent hold)
                    client_writer.close()

        models_dir = self.h._snapshot("export") / "export" / "caikit"
        model_id = model_ids(models_dir)[0]
        with LocalModelServer(models_dir) as server:
            port = int((server.http_url if client == "http" else server.grpc_target).rsplit(":", 1)[1])
            # every chunk 0.5 s late, each way: the zoo model answers in milliseconds, the request is in flight 1 s+
            proxy = CountingProxy(port, PROXY_DELAY_S)
            proxy.loop.set_exception_handler(lambda loop, context: None)  # the killed server's refusals: expected
            address = proxy.url if client == "http" else f"grpc://{proxy.url.removeprefix('http://')}"
            where = ["--url", address] if client == "http" else ["--grpc", address]
            argv = [DETOX_SFT, "query", "the host said", "--model-id", model_id, "--max-new-tokens", "20", *where]
            timing: dict[str, Any] = {"when": when, "client": client}

            def kill(proc: subprocess.Popen | None) -> None:
                while proc is not None and proc.poll() is None and not proxy.connections:
                    time.sleep(0.01)
                if proc is not None:  # f x the round trip after its request reached the proxy
                    time.sleep(fraction * 2 * PROXY_DELAY_S)
                    timing["kill_at_s_after_connect"] = round(fraction * 2 * PROXY_DELAY_S, 2)
                timing["command_running"] = proc is None or proc.poll() is None
                os.killpg(server.process.pid, signal.SIGKILL)

            if when == "before":
                kill(None)
            result, _ = run_command(argv, self.h._env(), kill=kill if when == "mid" else None)
            proxy.loop.call_soon_threadsafe(proxy.server.close)
        return self.record("model-server-gone", "query", result, **timing, false_done=[])

    # -- the hub ------------------------------------------------------------------------------------------------------

    def hub(self, case: str, step: str, loader: str, field: str, value: str, hf_home: Path) -> dict[str, Any]:
        h = self.h
        h._restore_inputs(step)
        env = h._env() | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "ds")}
        result = run_step(h, step, env, f"--{field}", value)
        ctx = h.ctx()
        false_done = F._false_done(step, ctx, h.reference_out[step]) if result["rc"] != 0 else []
        return self.record(case, step, result, loader=loader, field=field, value=value, false_done=false_done)


def _tmpfs_works(where: Path) -> bool:
    """Whether this process can mount a tmpfs (root; a non-root machine falls back to RLIMIT_FSIZE)."""
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode:
        return False
    subprocess.run(["umount", str(where)], check=True)
    return True


def run_cases(
    cases: list[str], work: Path, seed: int, trials: int, results: Path, command: str, steps: tuple[str, ...] = ()
) -> list[dict]:
    """The trials of ``cases`` in ``steps`` (default: all); the records of those cases and steps for ``seed`` are
    replaced."""
    steps = steps or (*F.STEPS, "query")
    from s3 import DelayProxy  # benchmarks/s3.py

    from detox_sft_dev.s3 import LocalS3

    prov = provenance.capture(__file__)
    for case in cases:
        for old in [p for step in steps for p in (results / case).glob(f"seed{seed}-{step}-*.json")]:
            old.unlink()
    done: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(LocalS3(bucket="detox-sft", data_dir=work / "s3"))
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        h = F.Harness(work, seed=seed, trials=trials, s3=s3, command=command, provenance=prov)
        stack.enter_context(contextlib.closing(h))
        for step in F.STEPS:
            h.reference(step)
        t = EnvTrials(h, results, prov)
        if "disk-full" in cases:
            method = "tmpfs" if _tmpfs_works(work / "mount-probe") else "rlimit-fsize"
            for step in [s for s in DISK_STEPS if s in steps]:
                done += [t.disk_full(step, f, method) for f in F.fractions(seed, f"disk-{step}", trials)]
        if "s3-gone" in cases:
            proxy = DelayProxy(s3.ports["s3"], F.TRANSFER["delay_s"])
            proxy.loop.set_exception_handler(lambda loop, context: None)  # a dead server's refusals: expected here
            for step in [s for s in ("upload", "download") if s in steps]:
                done += [t.s3_gone(step, when, proxy.url) for when in ("before", "mid")]
        for case in ("hub-unreachable", "no-such-hub-id"):
            if case in cases:
                hf_home = work / "empty-hf-home"
                shutil.rmtree(hf_home, ignore_errors=True)
                for step, loaders in [(s, v) for s, v in HUB_LOADERS.items() if s in steps]:
                    chosen = loaders if case == "hub-unreachable" else loaders[:1]
                    for loader, field, value in chosen:
                        value = value if case == "hub-unreachable" else value.replace(value.strip("[]"), NO_SUCH_ID)
                        done.append(t.hub(case, step, loader, field, value, hf_home))
        if "model-server-gone" in cases and "query" in steps:
            h.close()  # the zygote's memory is not needed while the runtime runs
            fractions = iter(F.fractions(seed, "model-server", 2))
            for client in ("http", "grpc"):
                done += [t.model_server_gone(client, when, next(fractions, 0.5)) for when in ("before", "mid")]
    return done


# -- the report ---------------------------------------------------------------------------------------------------


def load_env_records(results: Path = ENV_RESULTS) -> list[dict[str, Any]]:
    """The records of this script, by case, seed and trial (records of retired cases are skipped)."""
    records = [json.loads(p.read_text()) for case in ENV_CASES for p in sorted((results / case).glob("seed*.json"))]
    order = (*F.STEPS, "query")
    return sorted(records, key=lambda r: (ENV_CASES.index(r["case"]), r["seed"], order.index(r["step"]), r["trial"]))


_ENV_TEXT = {
    "disk-full": (
        "**The disk full**: the run directory is a tmpfs of the inputs' size plus f x what the step writes (f seeded, "
        "one draw in each slice of [0, 0.95)): a real ENOSPC (`method` rlimit-fsize: a file-size limit of f x the "
        "largest file, EFBIG, where no tmpfs could be mounted). After a failure the tmpfs is grown and the step rerun "
        "to its end: it must give the reference's output without redoing finished units."
    ),
    "s3-gone": (
        "**The S3 server gone**: SeaweedFS SIGKILLed before the command, or once the transfer (through a delay proxy) "
        "has stored its first object or file; started again only after the command exited, then the step is rerun "
        "and compared."
    ),
    "model-server-gone": (
        "**The model server gone**: the caikit runtime serving the offline export SIGKILLed before `detox-sft query`, "
        f"or during its request (through a delay proxy of {PROXY_DELAY_S} s each way: f x the round trip after the "
        "command's connection reached it)."
    ),
    "hub-unreachable": (
        "**The hub unreachable**: `HF_HUB_OFFLINE=1` and an empty HF cache, each loader of each step given a hub id "
        "in turn (a recipe flag)."
    ),
    "no-such-hub-id": f"**A hub id that does not exist** (`{NO_SUCH_ID}`), one loader per step, as above.",
}


def render_env(records: list[dict[str, Any]]) -> list[str]:
    """FAULTS.md's section on the faults of the environment: per step and case, the command's exit status against the
    expected class's, whether a traceback showed, and its message."""
    lines = ["", "## Faults of the environment", "", "Made by `benchmarks/faults_env.py` (in `make faults`). "]
    lines[-1] += (
        "Each trial runs the `detox-sft` command and reads its exit status and stderr: survived = the exit status of "
        "the expected typed error (`detox-sft --help`: 3 no room on the disk, 4 S3 unreachable, 5 model server "
        "unreachable, 6 hub unreachable or no such id), no traceback, a message naming the fix, no false done, and "
        "(disk full) the rerun gives the reference's output. Records in `benchmarks/results/faults/env/`; commits: "
        + ", ".join(sorted({f"`{r['provenance']['commit'][:7]}`" for r in records if r.get("provenance")}))
    )
    for case in ENV_CASES:
        rs = [r for r in records if r["case"] == case]
        if not rs:
            continue
        outcomes = sorted({r["outcome"] for r in rs})
        tally = ", ".join(f"{sum(r['outcome'] == o for r in rs)} {o}" for o in outcomes)
        lines += ["", _ENV_TEXT[case], "", f"{len(rs)} trials: {tally}", ""]
        lines += [
            "| trial | step | fault | exit | expected | traceback | message (its start and its fix) | rerun | outcome |",
            "|---:|---|---|---:|---|---|---|---|---|",
        ]
        for r in rs:
            if case == "disk-full":
                fault = (
                    f"{r['method']}: room {r['room_bytes']} B of {r['output_bytes']} B written ({r['fraction']:.2f})"
                )
            elif case == "s3-gone":
                fault = f"killed {r['when']}" + (f" ({r['server_killed_after_s']} s)" if r["when"] == "mid" else "")
            elif case == "model-server-gone":
                after = f" ({r['kill_at_s_after_connect']} s after its request)" if r["when"] == "mid" else ""
                fault = f"{r['client']}, killed {r['when']}{after}"
            else:
                fault = f"{r['loader']}: `--{r['field']} {r['value']}`"
            details = "; ".join(r.get("redone", []) + r.get("differences", []) + r.get("false_done", []))
            rerun = "" if "rerun_rc" not in r else (details or "same as the reference")
            message = r["message"]
            if len(message) > 200:  # its start and its fix
                head, fix = message.split("Fix:", 1) if "Fix:" in message else (message, "")
                message = head[:100] + " … " + (f"Fix:{fix}"[:100] if fix else "")
            message = message.replace("|", "/")
            lines.append(
                f"| {r['trial']} | {r['step']} | {fault} | {r['rc']} | {r['expected_class']} ({r['expected_status']}) "
                f"| {'yes' if r['traceback'] else 'no'} | {message} | {rerun.replace('|', '/')} | {r['outcome']} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--trials", type=int, default=2, help="disk-full trials per step (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", nargs="+", choices=(*F.STEPS, "query"), default=(), help="default: all")
    parser.add_argument("--work", default=None, help="scratch directory (default: benchmarks/results/faults-work)")
    parser.add_argument("--results", default=str(ENV_RESULTS), help="where the records go")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate FAULTS.md")
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/faults_env.py", *(sys.argv[1:] if argv is None else argv)])
    work = Path(args.work) if args.work else F.ROOT / "benchmarks" / "results" / "faults-work"
    run_cases(args.cases, work, args.seed, args.trials, Path(args.results), command, tuple(args.steps))
    if not args.no_report:
        print(f"[faults-env] report: {F.write_report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
