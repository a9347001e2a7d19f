"""Where the training-set rephrase step's time goes: each phase timed on its own, the engine's speed beside the engine
benchmark's.

The GPU run of an earlier session took 36 s for the offline training set's rephrase step while the engine benchmark
ran at 434 samples/s on the same GPU (about 2.5 s of engine work for 1087 gated samples); this splits the step into
what it does, in its order, on a fresh cache: import and start-up (recipe, data), loading the gate scorer, scoring the
gate, loading TMaRCo's three models, the engine on the gated samples (batch by batch, as the step runs it), the cache
writes, and the scorer on the rewrites. The engine phase's samples/s is compared with ``benchmarks/results/
rephrase.json``'s batched row for the same model and device when that file holds one.

Run: ``.venv/bin/python benchmarks/rephrase_phases.py --device cuda`` (``benchmarks/gpu.sh`` step
``rephrase-phases``); ``--device cpu`` runs it here (slowly). Writes ``benchmarks/results/rephrase_phases.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTED = time.perf_counter()  # before the heavy imports: start-up is a phase of its own


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="offline")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=None, help="training samples (default: the recipe's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rephrase_phases.json"))
    args = parser.parse_args(argv)

    from detox_sft.config import load_recipe
    from detox_sft.data import load_train_dataset
    from detox_sft.prompts import format_sample  # noqa: F401 - the step's own imports, counted in start-up
    from detox_sft.rephrase.cache import Cache, key
    from detox_sft.rephrase.engines import load_engine
    from detox_sft.toxicity import load_scorer

    phases: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        _sync(args.device)
        now = time.perf_counter()
        phases[name] = round(now - since, 3)
        return now

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, run_dir=tmp)
        cfg = recipe.rephrase
        if args.samples:
            recipe.data.num_train_samples = args.samples
        train = load_train_dataset(recipe.data, recipe.seed)["train"]
        samples = [f"{r['prompt'].strip()} {r['continuation'].strip()}" for r in train]
        t = mark("start-up: imports, recipe, data", STARTED)

        scorer = load_scorer(cfg.scorer, device=args.device, batch_size=cfg.batch_size, revision=cfg.scorer_revision)
        t = mark("load the gate scorer", t)
        tox = scorer(samples)
        t = mark("gate: score every sample", t)
        gated = [s for s, v in zip(samples, tox, strict=True) if v >= cfg.gate_threshold]

        engine = load_engine(cfg, "batched", args.device)
        t = mark("load TMaRCo's models (base, expert, anti-expert)", t)

        cache = Cache(Path(tmp) / "cache")
        engine_s = cache_s = 0.0
        rewrites = []
        for i in range(0, len(gated), cfg.batch_size):
            part = gated[i : i + cfg.batch_size]
            t0 = time.perf_counter()
            outs = engine.rephrase(part)
            _sync(args.device)
            t1 = time.perf_counter()
            cache.put_many(
                "out", {key(["bench", s]): {"rephrased": o.rephrased} for s, o in zip(part, outs, strict=True)}
            )
            cache_s += time.perf_counter() - t1
            engine_s += t1 - t0
            rewrites += [o.rephrased for o in outs if o.changed]
        cache.conn.close()
        phases["engine: TMaRCo on the gated samples"] = round(engine_s, 3)
        phases["cache writes"] = round(cache_s, 3)
        t = time.perf_counter()
        scorer(rewrites)
        t = mark("scorer on the rewrites", t)

    total = round(time.perf_counter() - STARTED, 3)
    engine_rate = len(gated) / engine_s if engine_s else None
    bench_rate = None
    bench = ROOT / "benchmarks" / "results" / "rephrase.json"
    if bench.is_file():
        for row in json.loads(bench.read_text()).get("results", []):
            if row.get("models") == "zoo" and row.get("device") == args.device:
                bench_rate = row.get("batched_samples_per_s")
    record = {
        "recipe": args.recipe,
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "samples": len(samples),
        "gated": len(gated),
        "batch_size": cfg.batch_size,
        "phases_s": phases,
        "total_s": total,
        "engine_samples_per_s": None if engine_rate is None else round(engine_rate, 1),
        "benchmark_samples_per_s": bench_rate,
        "engine_vs_benchmark": None if not (engine_rate and bench_rate) else round(engine_rate / bench_rate, 3),
        "command": " ".join([".venv/bin/python", "benchmarks/rephrase_phases.py", *(argv or sys.argv[1:])]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    width = max(map(len, phases))
    for name, seconds in phases.items():
        print(f"{name:<{width}}  {seconds:8.2f} s")
    print(f"{'total':<{width}}  {total:8.2f} s; engine {record['engine_samples_per_s']} samples/s", end="")
    print(f" vs the benchmark's {bench_rate}" if bench_rate else " (no benchmark row for this device)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
