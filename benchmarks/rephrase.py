"""Benchmark: the batched TMaRCo engine vs TrustyAI's own TMaRCo, same models, same sentences, one run.

Measures samples/s of each engine (score + mask + rephrase, everything after gating) and their ratio, and checks
that both produce the same texts. Model sets:

* ``zoo``: the offline zoo's BART base / expert / anti-expert (small, trained), recipe settings (mask threshold 1.2).
* ``bart-base-random``: bart-base-sized models (d_model 768, 6+6 layers, vocab 50265) with random weights, because
  the Hugging Face hub is unreachable here. Random experts disagree almost uniformly, so a threshold of 1.2 would
  mask nothing; the mask threshold is set to the score quantile that masks 18% of the tokens (what the zoo's
  trained experts mask at 1.2), or to ``--random-threshold``; the share is printed.

GPU: when CUDA is available both engines also run on it (batched in float16, reference in float32).

Run: ``.venv/bin/python benchmarks/rephrase.py [--sentences 120] [--models zoo bart-base-random] [--threads N]``.
Writes benchmarks/results/rephrase.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

__all__ = ["machine", "sentences", "build_bart_base_random", "bench", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "rephrase.json"


def machine() -> dict:
    """CPU model, cores, load, torch threads, GPU name."""
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def sentences(n: int) -> list[str]:
    """``n`` texts from the zoo's RealToxicityPrompts-like corpus, toxic ones first (what the gate lets through)."""
    from detox_sft import offline

    zoo = offline.ensure_zoo()
    texts = []
    with open(zoo.rtp, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    for row in rows:
        for part in ("prompt", "continuation"):
            value = row.get(part) or {}
            if value.get("text", "").strip():
                texts.append((-(value.get("toxicity") or 0.0), value["text"]))
    texts.sort(key=lambda x: x[0])
    return list(dict.fromkeys(t for _, t in texts))[:n]


def build_bart_base_random(root: Path) -> dict[str, str]:
    """bart-base-sized random BARTs with the zoo's BART tokenizer, its vocabulary padded to bart-base's 50265."""
    import torch
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    from detox_sft import offline

    tok = AutoTokenizer.from_pretrained(offline.ensure_zoo().bart_tokenizer)
    tok.add_tokens([f"tok{i}" for i in range(50265 - len(tok))])
    config = BartConfig(
        vocab_size=len(tok),
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_bos_token_id=tok.bos_token_id,
    )
    paths = {}
    for seed, name in enumerate(("bart_base", "expert", "anti_expert")):
        torch.manual_seed(seed)
        path = root / name
        BartForConditionalGeneration(config).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = str(path)
    return paths


def bench(label: str, paths: dict[str, str], texts: list[str], threshold: float, device: str) -> dict:
    """Run both engines on ``texts``; returns timings, samples/s, ratio, parity and mask share."""
    import torch

    from detox_sft.compat import load_tmarco
    from detox_sft.config import RephraseConfig
    from detox_sft.rephrase import BatchedEngine, ReferenceEngine

    cfg = RephraseConfig(
        base_model=paths["bart_base"],
        expert=paths["expert"],
        anti_expert=paths["anti_expert"],
        mask_threshold=threshold,
        device=device,
    )
    tmarco = load_tmarco(
        cfg.base_model, cfg.expert, cfg.anti_expert, device=device, expert_weights=list(cfg.expert_weights)
    )
    reference = ReferenceEngine(tmarco, cfg)
    batched = (
        BatchedEngine.from_tmarco(tmarco, cfg, device=device)
        if device == "cpu"
        else BatchedEngine(tmarco.tokenizer, *_copies(tmarco), cfg, device=device)
    )
    # warm-up: one full pass each, so that each engine has met the shapes it is timed on (allocator, kernels)
    batched.rephrase(texts)
    reference.rephrase(texts)

    def timed(run):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run(texts)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    out_b, t_b = timed(batched.rephrase)
    out_r, t_r = timed(reference.rephrase)
    # where the time goes: the scoring step alone (every token masked in turn, both experts), same texts
    _, ts_b = timed(batched.score)
    _, ts_r = timed(tmarco.score)
    ok = [i for i, o in enumerate(out_r) if o.error is None]
    same = sum((out_r[i].masked, out_r[i].rephrased) == (out_b[i].masked, out_b[i].rephrased) for i in ok)
    tokens = sum(len(tmarco.tokenizer.tokenize(t)) for t in texts)
    masked = sum(o.masked.count(tmarco.tokenizer.mask_token) for o in out_b)
    return {
        "models": label,
        "device": device,
        "sentences": len(texts),
        "mask_threshold": threshold,
        "masked_token_share": round(masked / max(tokens, 1), 3),
        "rephrased": sum(o.changed for o in out_b),
        "reference_s": round(t_r, 2),
        "batched_s": round(t_b, 2),
        "reference_samples_per_s": round(len(texts) / t_r, 2),
        "batched_samples_per_s": round(len(texts) / t_b, 2),
        "speedup": round(t_r / t_b, 1),
        "reference_score_s": round(ts_r, 2),
        "batched_score_s": round(ts_b, 2),
        "score_speedup": round(ts_r / ts_b, 1),
        "rest_speedup": round((t_r - ts_r) / max(t_b - ts_b, 1e-9), 1),
        "identical_texts": f"{same}/{len(ok)}",
        "reference_errors": len(texts) - len(ok),
    }


def _threshold_for_share(paths: dict[str, str], texts: list[str], share: float) -> float:
    """A mask threshold that masks ``share`` of the tokens (random experts' scores cluster tightly around 1)."""
    import numpy as np

    from detox_sft.compat import load_tmarco
    from detox_sft.config import RephraseConfig
    from detox_sft.rephrase import BatchedEngine

    cfg = RephraseConfig(base_model=paths["bart_base"], expert=paths["expert"], anti_expert=paths["anti_expert"])
    tmarco = load_tmarco(cfg.base_model, cfg.expert, cfg.anti_expert, device="cpu")
    scores, _ = BatchedEngine.from_tmarco(tmarco, cfg).score(texts)
    return round(float(np.quantile(np.concatenate([np.asarray(s) for s in scores if len(s)]), 1.0 - share)), 4)


def _copies(tmarco):
    import copy

    return copy.deepcopy(tmarco.base), [copy.deepcopy(m) for m in tmarco.experts]


def main() -> None:
    """Run the benchmark and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--models", nargs="+", default=["zoo", "bart-base-random"])
    parser.add_argument(
        "--random-threshold",
        type=float,
        default=None,
        help="mask threshold for the random models (default: the one that masks 18%% of tokens)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine()
    texts = sentences(args.sentences)
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models:
            if label == "zoo":
                from detox_sft import offline

                zoo = offline.ensure_zoo()
                paths = {
                    "bart_base": str(zoo.bart_base),
                    "expert": str(zoo.expert),
                    "anti_expert": str(zoo.anti_expert),
                }
                threshold = 1.2
            else:
                paths = build_bart_base_random(Path(tmp))
                threshold = args.random_threshold or _threshold_for_share(paths, texts, 0.18)
            for device in devices:
                rows.append(bench(label, paths, texts, threshold, device))
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": info, "results": rows}, indent=2))
    print(
        f"\nMachine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, "
        f"load average at start {info['load_average_at_start'][0]:.1f}; GPU: {info['gpu']}\n"
    )
    print(
        "| models | device | sentences | mask thr | masked share | reference samples/s | batched samples/s "
        "| speedup | identical texts |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['models']} | {r['device']} | {r['sentences']} | {r['mask_threshold']} | "
            f"{r['masked_token_share']} | {r['reference_samples_per_s']} | {r['batched_samples_per_s']} | "
            f"{r['speedup']}x | {r['identical_texts']} |"
        )
    print("\n| models | device | score: reference s | batched s | speedup | mask + rephrase: speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['models']} | {r['device']} | {r['reference_score_s']} | {r['batched_score_s']} | "
            f"{r['score_speedup']}x | {r['rest_speedup']}x |"
        )


if __name__ == "__main__":
    main()
