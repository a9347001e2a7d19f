"""Benchmark: the batched TMaRCo engine vs TrustyAI's own TMaRCo, same models, same sentences, one run.

Measures samples/s of each engine (score + mask + rephrase, everything after gating) and their ratio, and checks
that both produce the same texts. Model sets:

* ``zoo``: the offline zoo's BART base / expert / anti-expert (small, trained), recipe settings (mask threshold 1.2).
* ``bart-base-random``: bart-base-sized models (d_model 768, 6+6 layers, vocab 50265) with random weights, because
  the Hugging Face hub is unreachable here. Random experts disagree almost uniformly, so a threshold of 1.2 would
  mask nothing; the mask threshold is set to the score quantile that masks 18% of the tokens (what the zoo's
  trained experts mask at 1.2), or to ``--random-threshold``; the share is printed.

GPU: when CUDA is available both engines also run on it (batched in float16, reference in float32); ``--devices``
picks where to run (``--devices cuda`` for the GPU rows alone).

Timing: after one warm-up pass each (all sentences, or the first ``--warmup`` of them), the two engines run
alternately (batched, reference, batched, ...) up to ``--repeats`` times or until ``--budget-s`` seconds have been
spent measuring, at least once; medians are reported.
Each engine times its own steps within the same passes (``engine.timings``): scoring (every token masked in turn,
read by both experts) and rephrasing (mask + fill).

The bound: what any engine that computes TMaRCo's scores exactly, with dense float32 arithmetic, must at least do is
counted from the models' shapes and the sentences (:func:`arithmetic`), and the CPU's float32 matrix-multiply rate is
measured on the models' own layer shapes in the same run (:func:`gemm_rate`). Scoring cannot run faster than that
work at that rate, so the reference's time divided by it bounds the speedup of any exact engine, even one whose
rephrasing step took no time at all.

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

import provenance

__all__ = ["machine", "sentences", "build_bart_base_random", "arithmetic", "gemm_rate", "bench", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "rephrase.json"
# facebook/bart-base's shape (its vocabulary of 50265 apart): the hub is unreachable here
BART_BASE_SHAPE = {
    "d_model": 768,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 12,
    "decoder_attention_heads": 12,
    "encoder_ffn_dim": 3072,
    "decoder_ffn_dim": 3072,
    "max_position_embeddings": 1024,
}


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
    from detox_sft_dev.zoo import ensure_zoo

    zoo = ensure_zoo()
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

    from detox_sft_dev.zoo import ensure_zoo

    tok = AutoTokenizer.from_pretrained(ensure_zoo().bart_tokenizer)
    tok.add_tokens([f"tok{i}" for i in range(50265 - len(tok))])
    config = BartConfig(
        vocab_size=len(tok),
        **BART_BASE_SHAPE,
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


def arithmetic(tmarco, texts: list[str]) -> dict:
    """Multiply-accumulates (both experts) of TMaRCo's scoring: the reference's and the least any exact engine needs.

    Counts the linear layers and the LM head (attention's own products and the norms are left out, which only
    lowers both counts). Reference: every masked variant of a sentence, padded to the sentence's longest, runs the
    whole encoder, the whole decoder and the LM head at every position (what ``model.forward`` does). Least work:
    each variant's own length through the encoder; the decoder's cross-attention keys and values over all of it; the
    decoder only up to the mask (it is causal) and the LM head only there (the full vocabulary: the score is a
    divergence between whole distributions). Even the first layers' query/key/value projections are left out,
    since an engine could share them between variants (they see the same token at the same position).
    """
    tokenizer, config = tmarco.tokenizer, tmarco.experts[0].config
    d, vocab = config.d_model, config.vocab_size
    enc_layer = 4 * d * d + 2 * d * config.encoder_ffn_dim
    dec_layer = 6 * d * d + 2 * d * config.decoder_ffn_dim  # self q,k,v,o + cross q,o + FFN
    cross_kv = 2 * d * d  # per encoder position, per decoder layer
    n_enc, n_dec = config.encoder_layers, config.decoder_layers
    reference = least = 0
    variants = 0
    for text in texts:
        # the masked variants exactly as TrustyAI builds them, and their token ids as its scoring sees them
        variants_ids = [
            tokenizer(v)["input_ids"] for v in tmarco.mask_tokens(text, tokenizer.pad_token + tokenizer.mask_token)
        ]
        shapes = [(len(ids), ids.index(tokenizer.mask_token_id)) for ids in variants_ids]
        if not shapes:
            continue
        width = max(length for length, _ in shapes)
        for length, pos in shapes:
            variants += 1
            reference += width * (n_enc * enc_layer + n_dec * (cross_kv + dec_layer) + d * vocab)
            least += (
                length * (n_enc * enc_layer + n_dec * cross_kv - 3 * d * d)  # first encoder layer's q,k,v shared
                + (pos + 1) * (n_dec * dec_layer - 3 * d * d)  # first decoder layer's q,k,v shared
                + d * vocab
            )
    return {"variants": variants, "reference_gmac": 2 * reference / 1e9, "least_gmac": 2 * least / 1e9}


def gemm_rate(config, rows: int = 2048, repeats: int = 5) -> float:
    """The best float32 GFLOP/s of this CPU on the model's own layer shapes (rows x d_model @ d_model x out)."""
    import torch

    best = 0.0
    d = config.d_model
    for out in (d, config.encoder_ffn_dim, 3 * d):
        a, w = torch.randn(rows, d), torch.randn(out, d)
        torch.nn.functional.linear(a, w)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(a, w)
        best = max(best, 2 * rows * d * out * repeats / (time.perf_counter() - start) / 1e9)
    return best


def bench(
    label: str,
    paths: dict[str, str],
    texts: list[str],
    threshold: float,
    device: str,
    repeats: int = 3,
    budget_s: float = 400.0,
    warmup: int | None = None,
    batched_dtype: str | None = None,
) -> dict:
    """Run both engines on ``texts``; returns timings (medians), samples/s, ratio, parity, mask share, bound.

    ``batched_dtype`` (``float16`` / ``float32``) overrides the batched engine's default (float16 on CUDA, float32
    on CPU); TrustyAI's TMaRCo always runs in float32, as it loads, so ``float32`` compares like with like on a GPU.
    """
    import statistics

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
    dtype = getattr(torch, batched_dtype) if batched_dtype else None
    batched = (
        BatchedEngine.from_tmarco(tmarco, cfg, device=device, dtype=dtype)
        if device == "cpu" and dtype in (None, torch.float32)
        else BatchedEngine(tmarco.tokenizer, *_copies(tmarco), cfg, device=device, dtype=dtype)
    )
    # warm-up: one pass each (all texts unless ``warmup`` says fewer), so that each engine has met the shapes it is
    # timed on (allocator, kernels); on a GPU a few sentences load the kernels and cuBLAS, and save device time
    batched.rephrase(texts[:warmup])
    reference.rephrase(texts[:warmup])

    def timed(engine):
        """One full pass: (outputs, total seconds, scoring seconds); the engine times its own steps."""
        if device == "cuda":
            torch.cuda.synchronize()
        before = engine.timings["score"]
        start = time.perf_counter()
        out = engine.rephrase(texts)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, engine.timings["score"] - before

    runs: dict[str, list[float]] = {"batched": [], "reference": [], "batched_score": [], "reference_score": []}
    measuring = time.perf_counter()
    while not runs["batched"] or (len(runs["batched"]) < repeats and time.perf_counter() - measuring < budget_s):
        out_b, t, ts = timed(batched)
        runs["batched"].append(t)
        runs["batched_score"].append(ts)
        out_r, t, ts = timed(reference)
        runs["reference"].append(t)
        runs["reference_score"].append(ts)
    # medians of the totals and of the scoring steps (with an odd count, each is one real run's figure)
    t_b, t_r, ts_b, ts_r = (
        statistics.median(runs[k]) for k in ("batched", "reference", "batched_score", "reference_score")
    )
    ok = [i for i, o in enumerate(out_r) if o.error is None]
    if len(ok) < len(texts):  # a ratio against a reference that failed is no figure (it fails fast)
        first = next(o.error for o in out_r if o.error is not None)
        raise RuntimeError(f"{label} on {device}: the reference failed on {len(texts) - len(ok)} sentences: {first}")
    same = sum((out_r[i].masked, out_r[i].rephrased) == (out_b[i].masked, out_b[i].rephrased) for i in ok)
    tokens = sum(len(tmarco.tokenizer.tokenize(t)) for t in texts)
    masked = sum(o.masked.count(tmarco.tokenizer.mask_token) for o in out_b)
    result = {
        "models": label,
        "device": device,
        "batched_dtype": str(batched.dtype).replace("torch.", ""),
        "reference_dtype": str(next(tmarco.base.parameters()).dtype).replace("torch.", ""),
        "sentences": len(texts),
        "mask_threshold": threshold,
        "masked_token_share": round(masked / max(tokens, 1), 3),
        "rephrased": sum(o.changed for o in out_b),
        "timed_runs": len(runs["batched"]),
        "warmup_sentences": len(texts[:warmup]),
        "runs_s": {k: [round(v, 3) for v in vals] for k, vals in runs.items()},
        "reference_s": round(t_r, 2),
        "batched_s": round(t_b, 2),
        "reference_samples_per_s": round(len(texts) / t_r, 2),
        "batched_samples_per_s": round(len(texts) / t_b, 2),
        "speedup": round(t_r / t_b, 1),
        "reference_score_s": round(ts_r, 2),
        "batched_score_s": round(ts_b, 2),
        "score_speedup": round(ts_r / ts_b, 1),
        "rest_speedup": round(
            statistics.median(r - sc for r, sc in zip(runs["reference"], runs["reference_score"], strict=True))
            / max(
                statistics.median(b - sc for b, sc in zip(runs["batched"], runs["batched_score"], strict=True)), 1e-9
            ),
            1,
        ),
        "identical_texts": f"{same}/{len(ok)}",
        "reference_errors": len(texts) - len(ok),
    }
    if device == "cpu":
        work = arithmetic(tmarco, texts)
        rate = gemm_rate(tmarco.experts[0].config)
        least_s = 2 * work["least_gmac"] / rate  # GMAC -> GFLOP
        result.update(
            {
                **work,
                "gemm_gflops": round(rate, 1),
                "reference_score_gflops": round(2 * work["reference_gmac"] / ts_r, 1),
                "batched_score_gflops_on_least_work": round(2 * work["least_gmac"] / ts_b, 1),
                "least_score_s": round(least_s, 3),
                "exact_score_speedup_bound": round(ts_r / least_s, 1),
                "exact_speedup_bound": round(t_r / least_s, 1),
            }
        )
    return result


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
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine, alternating (median shown)")
    parser.add_argument(
        "--budget-s", type=float, default=400.0, help="no new repeat starts after this many seconds of measuring"
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=["cpu", "cuda"],
        default=None,
        help="where to run both engines (default: cpu, and cuda when available)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="sentences in each warm-up pass (default: all)")
    parser.add_argument(
        "--batched-dtype",
        choices=["float16", "float32"],
        default=None,
        help="the batched engine's dtype (default: float16 on CUDA, float32 on CPU; the reference is float32)",
    )
    args = provenance.parse_args(parser, None)
    prov = provenance.start(parser, args, RESULTS, __file__)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine()
    texts = sentences(args.sentences)
    rows = []
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: CUDA is not available on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models:
            if label == "zoo":
                from detox_sft_dev.zoo import ensure_zoo

                zoo = ensure_zoo()
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
                rows.append(
                    bench(
                        label,
                        paths,
                        texts,
                        threshold,
                        device,
                        args.repeats,
                        args.budget_s,
                        args.warmup,
                        args.batched_dtype,
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    provenance.write(RESULTS, {"provenance": prov, "machine": info, "results": rows})
    print(
        f"\nMachine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, "
        f"load average at start {info['load_average_at_start'][0]:.1f}; GPU: {info['gpu']}\n"
    )
    print(
        "| models | device | dtypes (batched / reference) | sentences | mask thr | masked share | reference samples/s "
        "| batched samples/s | speedup | identical texts |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['models']} | {r['device']} | {r['batched_dtype']} / {r['reference_dtype']} | {r['sentences']} | "
            f"{r['mask_threshold']} | "
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
    print(
        "\n| models | scoring GMAC: reference | least exact | GEMM GFLOP/s | reference GFLOP/s | batched GFLOP/s "
        "(least work) | bound: score | bound: total |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "exact_speedup_bound" in r:
            print(
                f"| {r['models']} | {r['reference_gmac']:.0f} | {r['least_gmac']:.0f} | {r['gemm_gflops']} | "
                f"{r['reference_score_gflops']} | {r['batched_score_gflops_on_least_work']} | "
                f"{r['exact_score_speedup_bound']}x | {r['exact_speedup_bound']}x |"
            )


if __name__ == "__main__":
    main()
