"""Benchmark: detoxification on a Ray Data actor pool vs the single-process engine, same input, same models.

Measures on this machine, with the offline zoo's models and RealToxicityPrompts-length samples (prompt and
continuation joined, as the detox arm's training set is rephrased; the corpus's own mix of toxic and clean samples,
so the gate lets through its usual share):

* single process: :func:`detox_sft.rephrase.rephrase_dataset` with the scorer and engine loaded once beforehand, with
  torch's default threads and with one thread (what each Ray actor gets: Ray sets ``OMP_NUM_THREADS`` to its CPUs);
* Ray with 1 and 2 actors: the pipeline of ``rephrase.executor: ray`` (:func:`detox_sft.scale.map_blocks` with the
  rephrase step's own block functions), end to end: the pool starts, each actor loads the models, the blocks run,
  the records come back;
* Ray's own cost: a job of one no-op block (the pool's start) and of ``--noop-blocks`` no-op blocks (the overhead per
  block is the difference over the extra blocks).

Wall time is reported, end to end and, for Ray, from the first block's start to the last block's end in the actors
(the pool's steady throughput, without its start and the models' load); and CPU time of the worker: this process's
(all its threads) for the single process, the actors' own on their blocks (``time.process_time`` around each block).
CPU seconds say how much work a sample is, not how fast the pool gets through it, so the projection rests on wall
throughput only: hours to detoxify 1M samples with the 1 and 2 actors measured = 1M / (their measured samples per
wall-second in the blocks) + the measured pool start and model load. More workers are not projected: 2 actors on
this machine's cores are the only measurement of scaling, and the benchmark reports their throughput against one
actor's as it is. Rows with bart-large (the tutorial's TMaRCo models) on GPU are marked not measured: there is no GPU
and no hub access here.

After one warm-up pass of each, the runs alternate (single, Ray 1, Ray 2, single, ...) ``--repeats`` times; medians
are reported. Every Ray run's records are checked equal to the single process's. Ray nices its workers by default
(``worker_niceness``), which on a busy machine alone would slow the actors against the single process: the benchmark
runs them at the driver's niceness (``RAY_worker_niceness=0``).

Run: ``.venv/bin/python benchmarks/scale.py [--samples 192] [--block-size 24] [--repeats 3]``.
Writes benchmarks/results/scale.json and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import provenance

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
PROJECTED_SAMPLES = 1_000_000


def machine() -> dict:
    """CPU model, cores, load at start, Python and Ray versions."""
    import ray

    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "gpu": None,
        "python": platform.python_version(),
        "ray": ray.__version__,
    }


def samples(n: int) -> list[dict]:
    """The first ``n`` rows of the zoo's RealToxicityPrompts-like corpus as records ``{"id", "text"}`` (joined)."""
    from detox_sft_dev.zoo import ensure_zoo

    with open(ensure_zoo().rtp, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()][:n]
    return [{"id": i, "text": f"{r['prompt']['text']} {r['continuation']['text']}".strip()} for i, r in enumerate(rows)]


def _noop_setup() -> None:
    return None


def _noop_block(state: None, payload: int) -> int:
    return payload


def _timed_block(state, payload):
    """The rephrase step's block function, with the CPU and wall seconds it took in the actor and its start and end
    (wall clock, comparable across the actors of one machine)."""
    from detox_sft.rephrase.dataset import _ray_block

    cpu, wall, start = time.process_time(), time.perf_counter(), time.time()
    result = _ray_block(state, payload)
    out = {"result": result, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    return out | {"start": start, "end": time.time()}


def _timed(fn) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, all threads), result."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=24)
    parser.add_argument("--noop-blocks", type=int, default=64)
    args = provenance.parse_args(parser, None)
    prov = provenance.start(parser, args, RESULTS, __file__)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # read by the raylet this script starts: actors at the driver's priority (Ray's own spelling of the name)
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112
    from detox_sft.config import load_recipe
    from detox_sft.rephrase import load_engine, rephrase_dataset
    from detox_sft.rephrase.dataset import _ray_setup
    from detox_sft.scale import map_blocks, start_local_ray
    from detox_sft.toxicity import load_scorer

    info = machine()
    records = samples(args.samples)
    cfg = load_recipe("offline").rephrase
    load_s, _, (scorer, engine) = _timed(
        lambda: (load_scorer(cfg.scorer, device="cpu", batch_size=cfg.batch_size), load_engine(cfg, None, "cpu"))
    )
    start_local_ray(num_cpus=os.cpu_count(), attempts=20)  # a busy shared machine can need many tries
    blocks = [records[i : i + args.block_size] for i in range(0, len(records), args.block_size)]
    local_cfg = dataclasses.replace(cfg, executor="local")

    import torch

    threads = torch.get_num_threads()

    def single(num_threads):
        def run():
            torch.set_num_threads(num_threads)  # this script's own process; restored below
            try:
                wall, cpu, result = _timed(
                    lambda: rephrase_dataset(records, cfg, progress=False, engine=engine, scorer=scorer)
                )
            finally:
                torch.set_num_threads(threads)
            return {"wall_s": wall, "cpu_s": cpu, "steady_wall_s": wall}, result.records  # models loaded before

        return run

    def on_ray(actors):
        def run():
            setup_args = (local_cfg, cfg.engine, "cpu", "text")
            wall, _, results = _timed(
                lambda: map_blocks(blocks, _ray_setup, _timed_block, setup_args, actors=actors, progress=False)
            )
            numbers = {
                "wall_s": wall,
                "cpu_s": sum(b["cpu_s"] for b in results),  # in the actors, on their blocks
                "actor_block_wall_s": sum(b["wall_s"] for b in results),
                # the pool at work: first block's start to last block's end, every actor started and loaded
                "steady_wall_s": max(b["end"] for b in results) - min(b["start"] for b in results),
            }
            return numbers, [r for b in results for r in b["result"]["records"]]

        return run

    runs = {
        f"single process ({threads} threads)": single(threads),
        "single process (1 thread, as an actor)": single(1),
        "ray, 1 actor": on_ray(1),
        "ray, 2 actors": on_ray(2),
    }
    measured: dict[str, list[dict]] = {name: [] for name in runs}
    reference = None
    for name, fn in runs.items():  # warm-up of each, and the records every run must give
        got = fn()[1]
        reference = reference or got
        assert got == reference, f"{name}: records differ from the single process's"
    for _ in range(args.repeats):
        for name, fn in runs.items():
            numbers, got = fn()
            assert got == reference, f"{name}: records differ from the single process's"
            measured[name].append(numbers)

    # Ray's own cost: a job of one no-op block (pool start) and of many (+ per block)
    one_block = [
        _timed(lambda: map_blocks([0], _noop_setup, _noop_block, progress=False))[0] for _ in range(args.repeats)
    ]
    many = list(range(args.noop_blocks))
    many_blocks = [
        _timed(lambda: map_blocks(many, _noop_setup, _noop_block, progress=False))[0] for _ in range(args.repeats)
    ]
    pool_start = statistics.median(one_block)
    per_block = (statistics.median(many_blocks) - pool_start) / (args.noop_blocks - 1)
    gated = sum(r["rephrase_status"] in ("rephrased", "unchanged", "error") for r in reference)

    rows = []
    for name in runs:
        wall = statistics.median(m["wall_s"] for m in measured[name])
        cpu = statistics.median(m["cpu_s"] for m in measured[name])
        steady = statistics.median(m["steady_wall_s"] for m in measured[name])
        rows.append(
            {
                "run": name,
                "median_wall_s": round(wall, 2),
                "all_wall_s": [round(m["wall_s"], 2) for m in measured[name]],
                "samples_per_s": round(args.samples / wall, 2),
                "median_cpu_s": round(cpu, 2),
                "samples_per_cpu_s": round(args.samples / cpu, 2),
                "median_steady_wall_s": round(steady, 2),
                "steady_samples_per_s": round(args.samples / steady, 2),
            }
        )
    by_name = {r["run"]: r for r in rows}
    rate = {1: by_name["ray, 1 actor"]["steady_samples_per_s"], 2: by_name["ray, 2 actors"]["steady_samples_per_s"]}
    cores = info["cores"]
    # what the data say about scaling, as measured: the 2-actor pool's wall throughput over the 1-actor pool's
    scaling = {
        "cores": cores,
        "steady_2_vs_1_actor": round(rate[2] / rate[1], 2),
        "end_to_end_2_vs_1_actor": round(
            by_name["ray, 1 actor"]["median_wall_s"] / by_name["ray, 2 actors"]["median_wall_s"], 2
        ),
    }
    fixed = pool_start + load_s
    projection = []
    for workers in (1, 2):
        hours = (PROJECTED_SAMPLES / rate[workers] + fixed) / 3600
        projection.append(
            {
                "models": "zoo (offline), CPU",
                "workers": workers,
                "hours_for_1M": round(hours, 2),
                "rests_on": f"ray, {workers} actor{'s' * (workers > 1)} on this machine's {cores} cores: {rate[workers]} samples per "
                f"wall-second in the blocks (measured); + {fixed:.0f} s pool start and model load (measured)",
            }
        )
    for workers in (8, 32):
        projection.append(
            {
                "models": "zoo (offline), CPU",
                "workers": workers,
                "hours_for_1M": None,
                "rests_on": f"not projected: no run had {workers} workers, and the only scaling measured (2 actors on "
                f"{cores} cores: {scaling['steady_2_vs_1_actor']}x one actor's wall throughput) supports no "
                "extrapolation",
            }
        )
    for workers in (1, 8, 32):
        projection.append(
            {
                "models": "bart-large (tutorial), GPU",
                "workers": workers,
                "hours_for_1M": None,
                "rests_on": "not measured",
            }
        )
    out = {
        "machine": info,
        "settings": {
            "samples": args.samples,
            "gated": gated,
            "block_size": args.block_size,
            "blocks": len(blocks),
            "repeats": args.repeats,
            "engine": cfg.engine,
            "batch_size": cfg.batch_size,
            "noop_blocks": args.noop_blocks,
        },
        "models_load_s": round(load_s, 2),
        "ray_pool_start_s": round(pool_start, 2),
        "ray_overhead_per_block_s": round(per_block, 4),
        "results": rows,
        "scaling": scaling,
        "projection": projection,
    }
    provenance.write(RESULTS, {"provenance": prov, **out})

    print(f"\n{info['cpu']}, {info['cores']} cores, load {info['load_average_at_start'][0]:.1f} at start")
    print(
        f"{args.samples} samples ({gated} gated), {len(blocks)} blocks of {args.block_size}, median of {args.repeats}\n"
    )
    print(
        "| run | wall s | samples/s | steady wall s | steady samples/s | CPU s (worker) | samples per CPU-s |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['run']} | {r['median_wall_s']} | {r['samples_per_s']} | {r['median_steady_wall_s']} | "
            f"{r['steady_samples_per_s']} | {r['median_cpu_s']} | {r['samples_per_cpu_s']} |"
        )
    print(
        f"\n2 actors vs 1 on {cores} cores: {scaling['steady_2_vs_1_actor']}x the wall throughput in the blocks, "
        f"{scaling['end_to_end_2_vs_1_actor']}x end to end (above 1: faster; 2.0 would be linear)"
    )
    print(
        f"\nRay: pool start (one no-op block) {pool_start:.1f} s, overhead per block {per_block * 1000:.0f} ms; "
        f"models load {load_s:.1f} s\n"
    )
    print("| models | workers | hours for 1M samples | rests on |\n|---|---:|---:|---|")
    for p in projection:
        hours = p["hours_for_1M"] or ("not measured" if p["rests_on"] == "not measured" else "not projected")
        print(f"| {p['models']} | {p['workers']} | {hours} | {p['rests_on']} |")


if __name__ == "__main__":
    main()
