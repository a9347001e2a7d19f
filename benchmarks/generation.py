"""Benchmark: sampling k continuations per prompt for the evaluation, like for like.

Three paths, same model, same prompts (in the training template, as the evaluation gives them), same sampling
settings (k, top_p, temperature, max_new_tokens and the batch size, read from a recipe; the tutorial's by default):

* ``detox_sft.evaluation.generate_continuations``: left-padded batches of prompts, each repeated k times, every
  continuation sampled from its own random stream (seed, prompt, sample), so a rerun, another batch size or another
  process gives the same texts;
* the baseline a user would write: ``model.generate(num_return_sequences=k, do_sample=True, top_p=..., temperature=...)``
  on the same left-padded batches (the same prompts in the same batches);
* the 2024 original's loop, one prompt at a time without padding, here with ``num_return_sequences=k`` so that it
  produces as many continuations.

Timing: every path runs once untimed first (warm-up: the two batched paths a full pass, the loop its first prompt),
then the three run alternately (ours, generate, loop, ours, ...) ``--repeats`` times; medians are reported. Tokens/s
counts the tokens each path actually generated (up to and including a sequence's EOS), read from its output ids.
Sampled texts differ between paths (other random numbers); greedy parity is checked apart: on the first
``--parity-prompts`` prompts ``generate_continuations(greedy=True)`` must give the loop's greedy texts (asserted in
float32).

The model has facebook/opt-350m's exact shape (:data:`detox_sft_dev.zoo.rehearsal.OPT_350M`) with random weights
(init_std 0.01, see below); speed does not depend on the weights. The tokenizer is a byte-level BPE trained on the
bundled synthetic corpus, its vocabulary filled up to opt-350m's 50272 ids with placeholder tokens so that every id the
random model emits decodes to its own text.

Run: ``.venv/bin/python benchmarks/generation.py [--recipe tutorial] [--num-prompts 32] [--num-samples K]
[--batch-size B] [--max-new-tokens N] [--repeats 3] [--device cpu|cuda]``.
Writes benchmarks/results/generation.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import provenance

__all__ = ["opt_350m_config", "build_tokenizer", "original_loop", "generate_baseline", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"


def opt_350m_config():
    """facebook/opt-350m's config (the rehearsal models' one: the hub is unreachable here)."""
    from transformers import OPTConfig

    from detox_sft_dev.zoo.rehearsal import OPT_350M

    return OPTConfig(**OPT_350M)


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


class TokenCount:
    """Counts the tokens ``model.generate`` produces while active: each sequence's up to and including its EOS."""

    def __init__(self, model, eos_token_id: int):
        self.model, self.eos, self.tokens = model, eos_token_id, 0

    def __enter__(self):
        inner = self.model.generate

        def counting(*args, **kwargs):
            out = inner(*args, **kwargs)
            width = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
            new = out[:, width:]
            is_eos = new == self.eos
            ends = is_eos.int().argmax(dim=1) + 1
            self.tokens += int(ends.where(is_eos.any(dim=1), new.shape[1]).sum())
            return out

        self.model.generate = counting  # an instance attribute over the class's method, removed on exit
        return self

    def __exit__(self, *exc):
        del self.model.generate


def original_loop(model, tokenizer, prompts, max_new_tokens: int, device, sampling: dict | None = None) -> list:
    """The original's loop: one prompt at a time, no padding, the prompt removed by token position.

    ``sampling`` (``num_return_sequences``, ``top_p``, ``temperature``) samples k continuations per call; without
    it, one greedy continuation. Returns each prompt's continuations.
    """
    import torch

    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        options = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=1, **options)
        out.append(tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def generate_baseline(model, tokenizer, encoded, batches, cfg, device) -> list:
    """``model.generate(num_return_sequences=k, do_sample=True, top_p, temperature)`` on left-padded batches.

    ``encoded`` and ``batches`` are the prompts' token ids and the batches ``generate_continuations`` runs
    (:func:`detox_sft.evaluation.generation.generation_batches`), so both batched paths see the same inputs.
    """
    import torch

    out = [None] * len(encoded)
    for batch in batches:
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), 1, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                top_p=cfg.top_p,
                temperature=cfg.temperature,
                num_return_sequences=cfg.num_samples,
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=1,
            )
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for row, i in enumerate(batch):
            out[i] = texts[row * cfg.num_samples : (row + 1) * cfg.num_samples]
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


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> int:
    """Time the three paths alternately, check greedy parity, write and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tutorial", help="whose evaluation settings to use (default: tutorial)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=None, help="k (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: the recipe's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="(default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path, alternating (median shown)")
    parser.add_argument("--parity-prompts", type=int, default=4, help="prompts of the greedy parity check")
    parser.add_argument("--device", default="cpu")
    args = provenance.parse_args(parser, None)
    prov = provenance.start(parser, args, RESULTS, __file__)

    import dataclasses

    import torch
    import transformers
    from transformers import OPTForCausalLM

    from detox_sft.config import load_recipe
    from detox_sft.evaluation import generate_continuations
    from detox_sft.evaluation.generation import _context_limit, generation_batches
    from detox_sft.prompts import generation_prompt
    from detox_sft_dev.zoo.corpus import make_pretraining_texts, make_wiki_toxic_records

    load_at_start = _load_average()
    recipe = load_recipe(args.recipe)
    overrides = {"num_samples": args.num_samples, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    cfg = dataclasses.replace(recipe.evaluation, **{k: v for k, v in overrides.items() if v is not None})
    # eval-style prompts: the first 8 words of toxic comments, as the offline recipe builds them, in the template
    rows = [r for r in make_wiki_toxic_records({"test": 400})["test"] if r["label"] == 1]
    prompts = [generation_prompt(" ".join(r["comment_text"].split()[:8])) for r in rows][: args.num_prompts]
    tokenizer = build_tokenizer(make_pretraining_texts(2000))
    torch.manual_seed(0)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    config = opt_350m_config()
    # with the default init_std 0.02 the random 24-layer post-LN stack maps every prompt to the same token, which
    # would make the greedy parity check vacuous; 0.01 keeps the outputs prompt-dependent
    config.init_std = 0.01
    model = OPTForCausalLM(config).to(dtype=dtype, device=args.device).eval()
    params = sum(p.numel() for p in model.parameters())
    encoded, batches = generation_batches(
        tokenizer, prompts, _context_limit(model, None, cfg.max_new_tokens), cfg.batch_size
    )
    sampling = {"num_return_sequences": cfg.num_samples, "top_p": cfg.top_p, "temperature": cfg.temperature}

    def ours(ps):
        return generate_continuations(model, tokenizer, ps, cfg, seed=0, progress=False)

    def baseline(ps):
        assert ps is prompts  # the batches were cut for all prompts
        return generate_baseline(model, tokenizer, encoded, batches, cfg, args.device)

    def loop(ps):
        return original_loop(model, tokenizer, ps, cfg.max_new_tokens, args.device, sampling)

    paths = {
        "detox_sft generate_continuations (batched)": ours,
        "model.generate(num_return_sequences=k) (batched)": baseline,
        "one prompt at a time, num_return_sequences=k (2024 original's loop)": loop,
    }

    def timed(name, ps):
        torch.manual_seed(1)  # generate()'s sampling: the same draws in every pass
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        with TokenCount(model, tokenizer.eos_token_id) as count:
            start = time.perf_counter()
            texts = paths[name](ps)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        assert all(len(row) == cfg.num_samples for row in texts)
        return seconds, count.tokens

    # warm-up on every timed path (allocator, kernels, the batches' shapes): the batched paths a full pass, the
    # loop its first prompt (each prompt is a shape of its own there)
    for name in paths:
        timed(name, prompts if "batched" in name else prompts[:1])
    runs: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, list[int]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name in paths:
            seconds, count = timed(name, prompts)
            runs[name].append(seconds)
            tokens[name].append(count)
            print(f"{name}: {seconds:.2f} s, {count} tokens", flush=True)

    # greedy parity (untimed): batched + left padding must give the unpadded loop's texts
    few = prompts[: args.parity_prompts]
    looped = [row[0] for row in original_loop(model, tokenizer, few, cfg.max_new_tokens, args.device)]
    batched = [
        row[0] for row in generate_continuations(model, tokenizer, few, cfg, seed=0, greedy=True, progress=False)
    ]
    mismatches = [i for i, (a, b) in enumerate(zip(looped, batched, strict=True)) if a != b]
    near_ties = {}
    if mismatches:
        # float32 on CPU: the two paths must agree exactly. Half precision on a GPU rounds padded and unpadded
        # inputs differently, so a greedy step whose top two logits lie within rounding can go either way
        assert dtype != torch.float32, f"batched greedy outputs differ from the loop's at prompts {mismatches}"
        near_ties = {
            i: round(min(top2_gaps(model, tokenizer, few[i], cfg.max_new_tokens, args.device)), 5) for i in mismatches
        }

    baseline_name = "model.generate(num_return_sequences=k) (batched)"
    median = {name: statistics.median(v) for name, v in runs.items()}
    result_paths = {
        name: {
            "runs_s": [round(t, 2) for t in runs[name]],
            "median_s": round(median[name], 2),
            "tokens_generated": tokens[name][0] if len(set(tokens[name])) == 1 else tokens[name],
            "tokens_per_s": round(statistics.median(n / t for n, t in zip(tokens[name], runs[name], strict=True)), 1),
            "speedup_vs_generate": round(median[baseline_name] / median[name], 2),
        }
        for name in paths
    }
    result = {
        "provenance": prov,
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": _load_average(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "when_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "model": f"opt-350m shape, random weights (init_std 0.01), {params / 1e6:.0f}M parameters, {dtype}".replace(
            "torch.", ""
        ),
        "recipe": args.recipe,
        "num_prompts": len(prompts),
        "num_samples": cfg.num_samples,
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "top_p": cfg.top_p,
        "temperature": cfg.temperature,
        "repeats": args.repeats,
        "paths": result_paths,
        "greedy_parity": f"{len(few) - len(mismatches)}/{len(few)} identical",
        "greedy_differing_min_top2_logit_gap": near_ties,
    }
    provenance.write(RESULTS, result)
    m = result["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, device {args.device}, "
        f"load average {load_at_start} -> {m['load_average_at_end']}; {result['model']}"
    )
    print(
        f"{len(prompts)} prompts x k={cfg.num_samples}, {cfg.max_new_tokens} new tokens, top_p {cfg.top_p}, "
        f"temperature {cfg.temperature}, batch {cfg.batch_size} prompts; {args.repeats} alternating passes, medians; "
        f"greedy parity {result['greedy_parity']}\n"
    )
    print("| path | median s | runs (s) | tokens generated | tokens/s | speedup vs generate |")
    print("|---|---:|---|---:|---:|---:|")
    for name, r in result_paths.items():
        print(
            f"| {name} | {r['median_s']} | {', '.join(map(str, r['runs_s']))} | {r['tokens_generated']} | "
            f"{r['tokens_per_s']} | {r['speedup_vs_generate']}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
