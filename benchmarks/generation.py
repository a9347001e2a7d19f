"""Benchmark: batched generation (detox_sft.evaluation) vs the 2024 original's one-prompt-at-a-time loop.

Same prompts, same model, greedy decoding on both sides; the outputs must be identical (asserted), and both are
timed in the same run. The model has facebook/opt-350m's exact shape (its OPTConfig written out by hand: the hub is
unreachable here) with random weights (init_std 0.01, see below); speed does not depend on the weights. The tokenizer is a byte-level BPE trained
on the bundled synthetic corpus, its vocabulary filled up to opt-350m's 50272 ids with placeholder tokens so that every
id the random model emits decodes to its own text.

Run: ``.venv/bin/python benchmarks/generation.py [--num-prompts 32] [--batch-size 32] [--device cpu|cuda]``
Writes benchmarks/results/generation.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

__all__ = ["opt_350m_config", "build_tokenizer", "original_loop", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"


def opt_350m_config():
    """facebook/opt-350m's config.json, written out (hub unreachable)."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=50272,
        hidden_size=1024,
        num_hidden_layers=24,
        ffn_dim=4096,
        num_attention_heads=16,
        max_position_embeddings=2048,
        word_embed_proj_dim=512,
        do_layer_norm_before=False,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        layerdrop=0.0,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        init_std=0.02,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=True,
    )


def build_tokenizer(texts, vocab_size: int = 50272):
    """A byte-level BPE with OPT's special tokens (``</s>`` prepended as bos), padded to ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=4000,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):  # never produced by the merges; each decodes to distinct text
        vocab[f"<x{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def original_loop(model, tokenizer, prompts, max_new_tokens: int, device) -> list[str]:
    """The original's loop: one prompt at a time, no padding (with the prompt removed by token position)."""
    import torch

    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=1)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def top2_gaps(model, tokenizer, prompt: str, max_new_tokens: int, device) -> list[float]:
    """The gap between the two highest logits at each step of the loop's greedy path for ``prompt``."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return [float(t[0] - t[1]) for t in (step[0].float().topk(2).values for step in out.logits)]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    """Run both paths on the same prompts, assert identical outputs, write and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import OPTForCausalLM

    from detox_sft.config import EvaluationConfig
    from detox_sft.corpus import make_pretraining_texts, make_wiki_toxic_records
    from detox_sft.evaluation import generate_continuations

    # eval-style prompts: the first 8 words of toxic comments, as the offline recipe builds them
    rows = [r for r in make_wiki_toxic_records({"test": 400})["test"] if r["label"] == 1]
    prompts = [" ".join(r["comment_text"].split()[:8]) for r in rows][: args.num_prompts]
    tokenizer = build_tokenizer(make_pretraining_texts(2000))
    torch.manual_seed(0)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    config = opt_350m_config()
    # with the default init_std 0.02 the random 24-layer post-LN stack maps every prompt to the same token, which
    # would make the equality check vacuous; 0.01 keeps the outputs prompt-dependent (counted below)
    config.init_std = 0.01
    model = OPTForCausalLM(config).to(dtype=dtype, device=args.device).eval()
    params = sum(p.numel() for p in model.parameters())
    cfg = EvaluationConfig(
        scorers=["profanity-check"], num_samples=1, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )

    # warm-up of both paths (allocator, kernels, the batch's shapes; a GPU meets its kernels on first use): 2 tokens
    original_loop(model, tokenizer, prompts[:1], 2, args.device)
    warm = dataclasses.replace(cfg, max_new_tokens=2)
    generate_continuations(model, tokenizer, prompts, warm, seed=0, greedy=True, progress=False)
    t0 = time.perf_counter()
    looped = original_loop(model, tokenizer, prompts, args.max_new_tokens, args.device)
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = [
        row[0] for row in generate_continuations(model, tokenizer, prompts, cfg, seed=0, greedy=True, progress=False)
    ]
    t_batched = time.perf_counter() - t0
    mismatches = [i for i, (a, b) in enumerate(zip(looped, batched, strict=True)) if a != b]
    near_ties = {}
    if mismatches:
        # float32 on CPU: the two paths must agree exactly. Half precision on a GPU rounds padded and unpadded
        # inputs differently (other kernels, other reduction orders), so a greedy step whose top two logits lie
        # within rounding can go either way: report the smallest top-2 gap on each differing prompt's path
        assert dtype != torch.float32, f"batched greedy outputs differ from the loop's at prompts {mismatches}"
        gaps = [min(top2_gaps(model, tokenizer, p, args.max_new_tokens, args.device)) for p in prompts]
        near_ties = {i: round(gaps[i], 5) for i in mismatches}
        near_ties["smallest on the identical prompts"] = round(
            min((g for i, g in enumerate(gaps) if i not in mismatches), default=float("nan")), 5
        )

    new_tokens = len(prompts) * args.max_new_tokens
    result = {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "model": f"opt-350m shape, random weights (init_std 0.01), {params / 1e6:.0f}M parameters, {dtype}".replace(
            "torch.", ""
        ),
        "num_prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "identical_outputs": f"{len(prompts) - len(mismatches)}/{len(prompts)}",
        "differing_prompts_min_top2_logit_gap": near_ties,
        "distinct_outputs": len(set(batched)),
        "loop_s": round(t_loop, 2),
        "batched_s": round(t_batched, 2),
        "loop_tokens_per_s": round(new_tokens / t_loop, 1),
        "batched_tokens_per_s": round(new_tokens / t_batched, 1),
        "speedup": round(t_loop / t_batched, 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch threads "
        f"{result['machine']['torch_threads']}, device {args.device}; {result['model']}"
    )
    print(
        f"{len(prompts)} prompts, {args.max_new_tokens} new tokens each, greedy; outputs identical: "
        f"{result['identical_outputs']} ({result['distinct_outputs']} distinct)"
        + (f"; differing prompts' smallest top-2 logit gap on the loop's path: {near_ties}" if near_ties else "")
        + "\n"
    )
    print("| path | time (s) | new tokens/s | speedup |")
    print("|---|---|---|---|")
    print(f"| one prompt at a time (2024 original) | {result['loop_s']} | {result['loop_tokens_per_s']} | 1.0x |")
    print(
        f"| batched, left padding (batch {args.batch_size}) | {result['batched_s']} | "
        f"{result['batched_tokens_per_s']} | {result['speedup']}x |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
