"""Honest toxicity evaluation of the base model and the two arms (``raw``, ``detox``) on the same toxic prompts.

The protocol is RealToxicityPrompts / DExperts (../shared/DESIGN.md §7): ``k`` sampled continuations per prompt,
only the generated tokens scored, Expected Maximum Toxicity, Toxicity Probability and mean toxicity with 95%
bootstrap intervals over prompts, paired comparisons on the same prompts, conditional perplexity of the continuations
under the base model, distinct-1/2/3.

Generation is batched with left padding. Sampling is reproducible and independent of batch composition: the random
numbers of continuation ``j`` of prompt ``i`` come from their own stream seeded by ``(seed, i, j)`` and drive an
inverse-CDF draw from the top-p distribution, so a rerun, another batch size or another prompt order gives the same
texts (up to floating-point ties), and the three models see the same random numbers on the same prompt.

Outputs go to ``<run_dir>/eval/`` (results.json, generations.csv, summary.md, cached generations per model) and
``<run_dir>/figures/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detox_sft import metrics
from detox_sft.config import EvaluationConfig, Recipe, load_recipe, resolve_ref

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "MODELS",
    "ARMS",
    "COMPARISONS",
    "EvaluationError",
    "EvalResults",
    "generate_continuations",
    "continuation_nll",
    "load_base_model",
    "load_arm_model",
    "adapter_dir",
    "evaluate_models",
    "load_results",
    "results_table",
    "differences_table",
    "summary_markdown",
    "describe_result",
    "plot_toxicity_distributions",
    "plot_metric_bars",
    "add_arguments",
    "main",
]

logger = logging.getLogger(__name__)

MODELS = ("base", "raw", "detox")
ARMS = ("raw", "detox")
# (a, b): the difference a - b is reported, paired by prompt
COMPARISONS = (("detox", "raw"), ("raw", "base"), ("detox", "base"))
_COLORS = {"base": "#7f7f7f", "raw": "#d95f02", "detox": "#1b9e77"}  # the same in every figure
_METRIC_LABELS = {"mean_toxicity": "mean toxicity", "expected_max_toxicity": "EMT", "toxicity_probability": "TP"}


class EvaluationError(RuntimeError):
    """The evaluation cannot run; the message says what to do."""


# --------------------------------------------------------------------------------------------------------------
# generation


def _resolve_device(device: str | None) -> str:
    from detox_sft.devices import resolve_device

    return resolve_device(device, "evaluation.device", EvaluationError)


def _model_device(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        import torch

        return torch.device("cpu")


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate from: give at least one prompt")
    empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if empty:
        raise ValueError(f"{len(empty)} empty prompt(s) at position(s) {empty[:10]}: remove them or give text")
    return prompts


def _encode(tokenizer: Any, prompts: list[str], limit: int) -> list[list[int]]:
    """Token ids per prompt; prompts longer than ``limit`` tokens lose their beginning (the BOS token stays)."""
    encoded, truncated = [], 0
    bos = tokenizer.bos_token_id
    for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]:
        if len(ids) > limit:
            truncated += 1
            keep_bos = bos is not None and ids[0] == bos
            ids = ([bos] + ids[len(ids) - limit + 1 :]) if keep_bos else ids[len(ids) - limit :]
        encoded.append(list(ids))
    if truncated:
        warnings.warn(
            f"{truncated} prompt(s) longer than {limit} tokens (the context minus max_new_tokens) were truncated "
            "from the left",
            UserWarning,
            stacklevel=3,
        )
    return encoded


def _context_limit(model: Any, max_context: int | None, max_new_tokens: int) -> int:
    context = max_context or getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    limit = int(context) - max_new_tokens
    if limit < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {context}")
    return limit


def _uniforms(seed: int, prompt_ids: Sequence[int], num_samples: int, steps: int) -> np.ndarray:
    # one independent stream per (seed, prompt, sample): the draw does not depend on the batch it lands in
    return np.stack([np.random.default_rng([seed, i, j]).random(steps) for i in prompt_ids for j in range(num_samples)])


def _sampler(uniforms: Any, prompt_len: int, temperature: float, top_p: float) -> Any:
    """A logits processor that samples from the top-p distribution with given uniform numbers (inverse CDF).

    It returns scores that are -inf everywhere except on the sampled token, so greedy decoding picks it.
    """
    import torch
    from transformers import LogitsProcessor
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    class _InverseCdfSampler(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            scores = scores.float()
            for warp in warpers:
                scores = warp(input_ids, scores)
            probs = scores.softmax(-1)
            cdf = probs.cumsum(-1)
            u = uniforms[:, input_ids.shape[1] - prompt_len].unsqueeze(-1) * cdf[:, -1:]
            # right side: the first token whose cumulative mass exceeds u, never a zero-probability token
            token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
            out = torch.full_like(scores, -math.inf)
            return out.scatter_(1, token, 0.0)

    return _InverseCdfSampler()


def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: EvaluationConfig,
    seed: int,
    device: Any = None,
    max_context: int | None = None,
    greedy: bool = False,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[str]]:
    """Batched generation of continuations: ``k`` sampled (or one greedy) per prompt, the prompt cut off by position.

    Args:
        model: a causal LM (a PeftModel works too).
        tokenizer: its tokenizer.
        prompts: non-empty prompt texts.
        cfg: ``num_samples`` (k), ``max_new_tokens``, ``top_p``, ``temperature``, ``batch_size`` (prompts per batch).
        seed: the sampling seed; continuation ``j`` of prompt ``i`` uses the stream ``(seed, i, j)``.
        device: where the inputs go; default the model's device.
        max_context: the model's context length; default ``model.config.max_position_embeddings``. Prompts longer
            than the context minus ``max_new_tokens`` are truncated from the left, with a warning.
        greedy: one greedy continuation per prompt instead of ``k`` sampled ones.
        progress: show a tqdm bar.
        desc: label of the progress bar.

    Returns:
        ``continuations[i][j]``: the text of continuation ``j`` of prompt ``i`` (generated tokens only).

    Raises:
        ValueError: no prompts, or an empty prompt.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    prompts = _check_prompts(prompts)
    device = device if device is not None else _model_device(model)
    limit = _context_limit(model, max_context, cfg.max_new_tokens)
    encoded = _encode(tokenizer, prompts, limit)
    k = 1 if greedy else cfg.num_samples
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_config = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,  # sampling happens in our processor, with per-sequence random streams
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # longest first: similar lengths share a batch (less padding), and an out-of-memory shows up at once
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[list[str]] = [[] for _ in prompts]
    model.eval()
    batches = [order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        width = max(len(encoded[i]) for i in batch)
        rows = [i for i in batch for _ in range(k)]
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids = encoded[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention[r, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        processors = None
        if not greedy:
            from transformers import LogitsProcessorList

            u = torch.as_tensor(_uniforms(seed, batch, k, cfg.max_new_tokens), dtype=torch.float32, device=device)
            processors = LogitsProcessorList([_sampler(u, width, cfg.temperature, cfg.top_p)])
        with torch.inference_mode():
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention, generation_config=gen_config, logits_processor=processors
            )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for r, i in enumerate(rows):
            out[i].append(texts[r])
    return out


def continuation_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    batch_size: int = 32,
    device: Any = None,
    max_context: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each continuation given its prompt; only the continuation's tokens count.

    Args:
        model: the scoring causal LM (the base model for conditional perplexity).
        tokenizer: its tokenizer.
        prompts: the prompts.
        continuations: ``continuations[i]`` are prompt ``i``'s ``k`` texts.
        batch_size: sequences per forward pass.
        device: where the inputs go; default the model's device.
        max_context: context length; default ``model.config.max_position_embeddings``.
        progress: show a tqdm bar.

    Returns:
        ``(nll_sums, token_counts)``, both ``(num_prompts, k)``; an empty continuation has 0 tokens and 0 NLL.
    """
    import torch
    from tqdm.auto import tqdm

    prompts = _check_prompts(prompts)
    device = device if device is not None else _model_device(model)
    k = max(len(c) for c in continuations)
    context = max_context or getattr(model.config, "max_position_embeddings", None) or 2048
    cont_ids = [tokenizer(list(c), add_special_tokens=False)["input_ids"] if c else [] for c in continuations]
    longest = max((len(ids) for row in cont_ids for ids in row), default=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation was already reported at generation time
        prompt_ids = _encode(tokenizer, prompts, max(2, int(context) - longest))
    items = [(i, j) for i in range(len(prompts)) for j in range(len(cont_ids[i])) if cont_ids[i][j]]
    items.sort(key=lambda ij: -(len(prompt_ids[ij[0]]) + len(cont_ids[ij[0]][ij[1]])))
    nll = np.zeros((len(prompts), k))
    counts = np.zeros((len(prompts), k), dtype=np.int64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    batches = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        seqs = [prompt_ids[i] + cont_ids[i][j] for i, j in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        target = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions of continuation tokens
        for r, ((i, _), seq) in enumerate(zip(batch, seqs, strict=True)):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            target[r, len(prompt_ids[i]) : len(seq)] = True
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        tgt = target[:, 1:].to(logp.device)
        token_nll = (-logp * tgt).sum(-1).cpu().numpy()
        token_n = tgt.sum(-1).cpu().numpy()
        for r, (i, j) in enumerate(batch):
            nll[i, j], counts[i, j] = token_nll[r], token_n[r]
    return nll, counts


# --------------------------------------------------------------------------------------------------------------
# models


def adapter_dir(run_dir: str | Path, arm: str) -> Path:
    """Where the training step writes an arm's adapter: ``<run_dir>/adapters/<arm>``."""
    return Path(run_dir) / "adapters" / arm


def _check_adapter(run_dir: Path, arm: str) -> Path:
    path = adapter_dir(run_dir, arm)
    if not (path / "adapter_config.json").is_file():
        raise EvaluationError(
            f"No adapter in {path} — run notebooks/1-sft.ipynb first (or `detox-sft train`) to train the {arm!r} arm."
        )
    return path


def load_base_model(ref: str, device: str = "auto") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a hub id, a local path or ``zoo:<name>``.

    float16 on a GPU, float32 on CPU (half precision is slow or unsupported there).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _resolve_device(device)
    path = resolve_ref(ref)
    # the training module loads arms the same way: bf16 where the GPU has it, else fp16; fp32 on CPU
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise EvaluationError(f"cannot load the model {ref!r} ({path}): {exc}") from exc
    return model.to(device).eval(), tokenizer


def load_arm_model(recipe: Recipe, run_dir: str | Path, arm: str, device: str = "auto") -> tuple[Any, Any]:
    """Load the base model with an arm's LoRA adapter (merged for speed) and the tokenizer.

    Uses ``detox_sft.training.load_adapter_model`` when the training module provides it, so training and evaluation
    load adapters the same way; otherwise loads the adapter with PEFT on a fresh base model.

    Raises:
        EvaluationError: the adapter is missing (train first).
    """
    device = _resolve_device(device)
    path = _check_adapter(Path(run_dir), arm)
    try:
        from detox_sft.training import load_adapter_model
    except ImportError:
        load_adapter_model = None
    if load_adapter_model is not None:
        loaded = load_adapter_model(run_dir, arm, device)
        model, tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_ref(recipe.training.base_model))
        # merged LoRA weights generate faster than the adapter's extra matmuls, with the same outputs
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        return model.eval(), tokenizer
    from peft import PeftModel

    base, tokenizer = load_base_model(recipe.training.base_model, device)
    model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return model.to(device).eval(), tokenizer


def _model_signature(recipe: Recipe, run_dir: Path, name: str) -> dict[str, Any]:
    # weights files by size and mtime: a retrained adapter or a rebuilt zoo model invalidates the cached generations
    base = resolve_ref(recipe.training.base_model)
    sig: dict[str, Any] = {"base_model": recipe.training.base_model, "base_path": base}
    files = sorted(Path(base).glob("*.safetensors")) if Path(base).is_dir() else []
    if name in ARMS:
        files += sorted(adapter_dir(run_dir, name).glob("adapter_model.*"))
    for f in files:
        stat = f.stat()
        sig[str(f)] = [stat.st_size, stat.st_mtime_ns]
    return sig


# --------------------------------------------------------------------------------------------------------------
# results


@dataclass
class EvalResults:
    """Everything one evaluation produced.

    Attributes:
        prompts (`list[str]`): the eval prompts (prompt id = position).
        models (`list[str]`): evaluated models, in order (``base``, ``raw``, ``detox``).
        scorers (`list[str]`): scorer names; the first is the headline one.
        generations (`dict[str, list[list[str]]]`): continuations per model, ``[prompt][sample]``.
        scores (`dict[str, dict[str, np.ndarray]]`): ``scores[model][scorer]``, ``(num_prompts, k)`` tables.
        nll (`dict[str, np.ndarray]`): summed NLL of each continuation under the perplexity model.
        token_counts (`dict[str, np.ndarray]`): scored tokens of each continuation.
        summary (`dict`): the metrics, as written to results.json.
        run_dir (`Path` or `None`): where the outputs were written.
    """

    prompts: list[str]
    models: list[str]
    scorers: list[str]
    generations: dict[str, list[list[str]]]
    scores: dict[str, dict[str, np.ndarray]]
    nll: dict[str, np.ndarray] = field(default_factory=dict)
    token_counts: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def headline_scorer(self) -> str:
        """The first scorer of the recipe."""
        return self.scorers[0]

    @property
    def threshold(self) -> float:
        """Toxicity at or above which a continuation counts as toxic."""
        return float(self.summary.get("config", {}).get("toxic_threshold", 0.5))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def _summarize(
    results: EvalResults, cfg: EvaluationConfig, seed: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    n_boot = cfg.bootstrap_samples
    per_model: dict[str, Any] = {}
    for m in results.models:
        tox = {
            s: {
                k: v.to_dict()
                for k, v in metrics.toxicity_metrics(results.scores[m][s], cfg.toxic_threshold, n_boot, seed).items()
            }
            for s in results.scorers
        }
        gens = results.generations[m]
        entry: dict[str, Any] = {
            "toxicity": tox,
            "distinct_1": metrics.distinct_n(gens, 1),
            "distinct_2": metrics.distinct_n(gens, 2),
            "distinct_3": metrics.distinct_n(gens, 3),
            "empty_continuations": int(sum(not t.strip() for row in gens for t in row)),
        }
        if m in results.nll:
            entry["perplexity"] = metrics.perplexity_estimate(
                results.nll[m], results.token_counts[m], n_boot, seed
            ).to_dict()
        per_model[m] = entry
    comparisons: dict[str, Any] = {}
    for a, b in COMPARISONS:
        if a in results.models and b in results.models:
            comparisons[f"{a}_vs_{b}"] = {
                s: {
                    k: v.to_dict()
                    for k, v in metrics.paired_differences(
                        results.scores[a][s], results.scores[b][s], cfg.toxic_threshold, n_boot, seed
                    ).items()
                }
                for s in results.scorers
            }
    k = len(results.generations[results.models[0]][0])
    return _jsonable(
        {
            "num_prompts": len(results.prompts),
            "num_samples": k,
            "models": results.models,
            "scorers": results.scorers,
            "headline_scorer": results.scorers[0],
            "seed": seed,
            "config": {
                "num_samples": cfg.num_samples,
                "max_new_tokens": cfg.max_new_tokens,
                "top_p": cfg.top_p,
                "temperature": cfg.temperature,
                "bootstrap_samples": cfg.bootstrap_samples,
                "toxic_threshold": cfg.toxic_threshold,
                "confidence": 0.95,
            },
            "metrics": per_model,
            "comparisons": comparisons,
            **(extra or {}),
        }
    )


def _fmt(est: dict[str, Any] | None, digits: int = 3) -> str:
    if not est or est.get("value") is None:
        return "n/a"
    if est.get("low") is None:
        return f"{est['value']:.{digits}f}"
    return f"{est['value']:.{digits}f} [{est['low']:.{digits}f}, {est['high']:.{digits}f}]"


def results_table(results: EvalResults | dict[str, Any]) -> pd.DataFrame:
    """One row per (model, scorer): the toxicity metrics with their interval ends, perplexity and distinct-n.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
    """
    import pandas as pd

    summary = results.summary if isinstance(results, EvalResults) else results
    rows = []
    for model, entry in summary["metrics"].items():
        for scorer, tox in entry["toxicity"].items():
            row: dict[str, Any] = {"model": model, "scorer": scorer}
            for name, est in tox.items():
                row[name], row[f"{name}_low"], row[f"{name}_high"] = est["value"], est["low"], est["high"]
            ppl = entry.get("perplexity") or {}
            row["perplexity"], row["perplexity_low"], row["perplexity_high"] = (
                ppl.get("value"),
                ppl.get("low"),
                ppl.get("high"),
            )
            for n in (1, 2, 3):
                row[f"distinct_{n}"] = entry[f"distinct_{n}"]
            rows.append(row)
    return pd.DataFrame(rows)


def differences_table(results: EvalResults | dict[str, Any]) -> pd.DataFrame:
    """One row per (comparison, scorer, metric): the paired difference ``a - b``, its interval, whether it excludes 0.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
    """
    import pandas as pd

    summary = results.summary if isinstance(results, EvalResults) else results
    rows = []
    for key, by_scorer in summary["comparisons"].items():
        for scorer, diffs in by_scorer.items():
            for metric, d in diffs.items():
                rows.append(
                    {
                        "comparison": key.replace("_vs_", " - "),
                        "scorer": scorer,
                        "metric": metric,
                        "difference": d["value"],
                        "low": d["low"],
                        "high": d["high"],
                        "excludes_zero": d["excludes_zero"],
                    }
                )
    return pd.DataFrame(rows)


def describe_result(results: EvalResults | dict[str, Any], scorer: str | None = None) -> str:
    """A paragraph that reads the result from the numbers, saying whether the intervals exclude zero.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
        scorer: which scorer to read (default: the headline one).
    """
    s = results.summary if isinstance(results, EvalResults) else results
    scorer = scorer or s["headline_scorer"]
    m = s["metrics"]
    parts = [
        f"On {s['num_prompts']} toxic prompts with {s['num_samples']} sampled continuations each, scored by "
        f"{scorer} (95% bootstrap intervals over prompts):"
    ]
    for model in s["models"]:
        tox = m[model]["toxicity"][scorer]
        ppl = m[model].get("perplexity")
        parts.append(
            f"{model}: EMT {_fmt(tox['expected_max_toxicity'])}, TP {_fmt(tox['toxicity_probability'])}, "
            f"mean toxicity {_fmt(tox['mean_toxicity'])}"
            + (f", perplexity {_fmt(ppl, 1)}" if ppl and ppl.get("value") is not None else "")
            + "."
        )
    for key, by_scorer in s["comparisons"].items():
        a, b = key.split("_vs_")
        d = by_scorer[scorer]["expected_max_toxicity"]
        tp = by_scorer[scorer]["toxicity_probability"]
        if d["excludes_zero"]:
            verdict = (
                f"the interval excludes zero, so {a} is {'less' if d['value'] < 0 else 'more'} toxic than {b} "
                "on these prompts"
            )
        else:
            verdict = f"the interval includes zero, so this run cannot tell {a} and {b} apart on EMT"
        parts.append(
            f"{a} minus {b} (paired by prompt): EMT {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]; {verdict}; "
            f"TP {tp['value']:+.3f} [{tp['low']:+.3f}, {tp['high']:+.3f}]"
            f"{' (excludes zero)' if tp['excludes_zero'] else ' (includes zero)'}."
        )
    if s["num_prompts"] < 100:
        parts.append(f"With only {s['num_prompts']} prompts the intervals are wide; more prompts narrow them.")
    return " ".join(parts)


def summary_markdown(results: EvalResults | dict[str, Any]) -> str:
    """The short markdown report written to eval/summary.md: a table per scorer, the paired differences, a reading."""
    s = results.summary if isinstance(results, EvalResults) else results
    lines = [
        "# Toxicity evaluation",
        "",
        f"{s['num_prompts']} prompts x {s['num_samples']} continuations (top_p {s['config']['top_p']}, "
        f"{s['config']['max_new_tokens']} new tokens, seed {s['seed']}); value [95% bootstrap interval].",
        "",
    ]
    for scorer in s["scorers"]:
        lines += [
            f"## Scorer: {scorer}",
            "",
            "| model | EMT | TP | mean toxicity | perplexity | distinct-2 |",
            "|---|---|---|---|---|---|",
        ]
        for model in s["models"]:
            e = s["metrics"][model]
            t = e["toxicity"][scorer]
            d2 = e["distinct_2"]
            lines.append(
                f"| {model} | {_fmt(t['expected_max_toxicity'])} | {_fmt(t['toxicity_probability'])} | "
                f"{_fmt(t['mean_toxicity'])} | {_fmt(e.get('perplexity'), 1)} | "
                f"{'n/a' if d2 is None else f'{d2:.3f}'} |"
            )
        if s["comparisons"]:
            lines += ["", "| paired difference | EMT | TP | mean toxicity |", "|---|---|---|---|"]
            for key, by_scorer in s["comparisons"].items():
                cells = []
                for metric in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
                    d = by_scorer[scorer][metric]
                    star = " *" if d["excludes_zero"] else ""
                    cells.append(f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}")
                lines.append(f"| {key.replace('_vs_', ' - ')} | " + " | ".join(cells) + " |")
            lines += ["", "\\* the interval excludes zero."]
        lines.append("")
    lines += ["## Reading", "", describe_result(s), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# figures


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_toxicity_distributions(
    results: EvalResults, scorer: str | None = None, path: str | Path | None = None
) -> Figure:
    """Histograms per model of every continuation's toxicity and of each prompt's maximum (what EMT averages).

    Args:
        results: the evaluation results.
        scorer: which scorer (default: the headline one).
        path: save the PNG here as well.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    scorer = scorer or results.headline_scorer
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2, sharey=False)
    bins = np.linspace(0, 1, 21)
    for model in results.models:
        table = results.scores[model][scorer]
        style = {"histtype": "step", "linewidth": 2, "label": model, "density": True, "color": _COLORS.get(model)}
        axes[0].hist(table.ravel(), bins=bins, **style)
        axes[1].hist(table.max(axis=1), bins=bins, **style)
    for ax, title in zip(axes, ("every continuation", "maximum per prompt"), strict=True):
        ax.axvline(results.threshold, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(f"toxicity ({scorer})")
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        ax.set_ylabel("density")
    fig.suptitle("Toxicity of the generated continuations")
    return _save(fig, path)


def plot_metric_bars(results: EvalResults, scorer: str | None = None, path: str | Path | None = None) -> Figure:
    """Bars of EMT, TP and mean toxicity per model with their 95% bootstrap intervals as error bars.

    Args:
        results: the evaluation results.
        scorer: which scorer (default: the headline one).
        path: save the PNG here as well.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    scorer = scorer or results.headline_scorer
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    for ax, name in zip(axes, ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"), strict=True):
        ests = [results.summary["metrics"][m]["toxicity"][scorer][name] for m in results.models]
        values = np.array([e["value"] for e in ests])
        err = np.array([[e["value"] - e["low"] for e in ests], [e["high"] - e["value"] for e in ests]])
        ax.bar(results.models, values, yerr=err, capsize=6, color=[_COLORS.get(m, "#444444") for m in results.models])
        ax.set_ylim(0, 1)
        ax.set_title(_METRIC_LABELS[name])
    fig.suptitle(f"Toxicity with 95% bootstrap intervals ({scorer})")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# the whole evaluation


def _cache_key(prompts: list[str], cfg: EvaluationConfig, seed: int, signature: dict[str, Any]) -> str:
    payload = json.dumps(
        {
            "prompts": hashlib.sha256("\x1e".join(prompts).encode()).hexdigest(),
            "num_samples": cfg.num_samples,
            "max_new_tokens": cfg.max_new_tokens,
            "top_p": cfg.top_p,
            "temperature": cfg.temperature,
            "seed": seed,
            "model": signature,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _eval_prompts(recipe: Recipe, prompts: Sequence[str] | None) -> list[str]:
    if prompts is None:
        from detox_sft.data import load_eval_prompts

        prompts = load_eval_prompts(recipe.data, recipe.seed)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    kept = [p for p in prompts if isinstance(p, str) and p.strip()]
    if len(kept) < len(prompts):
        warnings.warn(f"{len(prompts) - len(kept)} empty eval prompt(s) left out", UserWarning, stacklevel=3)
    if not kept:
        raise EvaluationError(
            f"no eval prompts: data.eval_dataset={recipe.data.eval_dataset!r} (split {recipe.data.eval_split!r}, "
            f"label {recipe.data.eval_label!r}) gave none. Fix: check the dataset, the split and the label filter."
        )
    return kept


def _model_inputs(recipe: Recipe, prompts: Sequence[str]) -> list[str]:
    """What the models are given: the prompts in the training template (the arms were tuned on it), or as they are."""
    if not recipe.evaluation.prompt_template:
        return list(prompts)
    from detox_sft.training import generation_prompt

    return [generation_prompt(p) for p in prompts]


def evaluate_models(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    models: Sequence[str] = MODELS,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
) -> EvalResults:
    """Generate with each model on the same eval prompts, score, compute the metrics, write the outputs.

    Generations are cached per model in ``<run_dir>/eval/generations_<model>.json`` (keyed by prompts, settings,
    seed and adapter files), so a rerun only scores and re-plots.

    Args:
        recipe: the run recipe (``training.base_model``, ``evaluation``, ``data``, ``seed``).
        run_dir: the run directory (default ``recipe.run_path``); adapters are read from ``<run_dir>/adapters``.
        models: any of ``base``, ``raw``, ``detox``.
        prompts: eval prompts to use instead of ``detox_sft.data.load_eval_prompts(recipe.data, recipe.seed)``.
        progress: show progress bars.

    Returns:
        The :class:`EvalResults`; also written to ``<run_dir>/eval/`` and ``<run_dir>/figures/``.

    Raises:
        EvaluationError: unknown model name, missing adapter, no prompts.
        detox_sft.toxicity.ScorerError: a scorer cannot be loaded.
    """
    import pandas as pd

    from detox_sft.toxicity import load_scorers

    started = time.perf_counter()
    cfg = recipe.evaluation
    run_dir = Path(run_dir) if run_dir is not None else recipe.run_path
    requested = [models] if isinstance(models, str) else list(models)
    models = [m for m in MODELS if m in requested]
    if not models or set(requested) - set(MODELS):
        raise EvaluationError(f"models must be some of {', '.join(MODELS)}; got {requested}")
    for arm in models:  # fail before any expensive work
        if arm in ARMS:
            _check_adapter(run_dir, arm)
    device = _resolve_device(cfg.device)
    scorers = load_scorers(cfg.scorers, device=device, batch_size=max(cfg.batch_size, 32))
    prompts = _eval_prompts(recipe, prompts)
    model_inputs = _model_inputs(recipe, prompts)
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)

    generations: dict[str, list[list[str]]] = {}
    timings: dict[str, float] = {}
    base: tuple[Any, Any] | None = None
    for name in models:
        key = _cache_key(model_inputs, cfg, recipe.seed, _model_signature(recipe, run_dir, name))
        cache = eval_dir / f"generations_{name}.json"
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                logger.info("reusing cached generations of %s from %s", name, cache)
                generations[name] = cached["generations"]
                continue
        t0 = time.perf_counter()
        if name == "base":
            base = base or load_base_model(recipe.training.base_model, device)
            model, tokenizer = base
        else:
            model, tokenizer = load_arm_model(recipe, run_dir, name, device)
        generations[name] = generate_continuations(
            model, tokenizer, model_inputs, cfg, recipe.seed, progress=progress, desc=f"generate ({name})"
        )
        timings[f"generate_{name}_s"] = round(time.perf_counter() - t0, 2)
        cache.write_text(json.dumps({"key": key, "model": name, "generations": generations[name]}))
        if name != "base":
            del model  # free the arm before loading the next one

    scores = {
        m: {
            s: scorer([t for row in generations[m] for t in row]).reshape(len(prompts), -1)
            for s, scorer in scorers.items()
        }
        for m in models
    }
    results = EvalResults(
        prompts=prompts,
        models=models,
        scorers=list(cfg.scorers),
        generations=generations,
        scores=scores,
        run_dir=run_dir,
    )

    # fluency: continuations of every model under the base (or the configured) model, given the prompt
    t0 = time.perf_counter()
    if cfg.perplexity_model:
        ppl_model, ppl_tok = load_base_model(cfg.perplexity_model, device)
    else:
        ppl_model, ppl_tok = base or load_base_model(recipe.training.base_model, device)
    for m in models:
        results.nll[m], results.token_counts[m] = continuation_nll(
            ppl_model, ppl_tok, model_inputs, generations[m], batch_size=cfg.batch_size, progress=progress
        )
    timings["perplexity_s"] = round(time.perf_counter() - t0, 2)

    results.summary = _summarize(
        results,
        cfg,
        recipe.seed,
        {
            "recipe": recipe.name,
            "profile": recipe.profile,
            "base_model": recipe.training.base_model,
            "perplexity_model": cfg.perplexity_model or recipe.training.base_model,
            "timing": {**timings, "total_s": round(time.perf_counter() - started, 2)},
        },
    )
    (eval_dir / "results.json").write_text(json.dumps(results.summary, indent=2))
    rows = []
    for m in models:
        for i, row in enumerate(generations[m]):
            for j, text in enumerate(row):
                rec = {"model": m, "prompt_id": i, "sample_idx": j, "prompt": prompts[i], "continuation": text}
                rec.update({f"toxicity:{s}": float(scores[m][s][i, j]) for s in results.scorers})
                rec["nll"], rec["num_tokens"] = float(results.nll[m][i, j]), int(results.token_counts[m][i, j])
                rows.append(rec)
    pd.DataFrame(rows).to_csv(eval_dir / "generations.csv", index=False)
    (eval_dir / "summary.md").write_text(summary_markdown(results))
    figures = run_dir / "figures"
    plot_toxicity_distributions(results, path=figures / "eval_toxicity_distributions.png")
    plot_metric_bars(results, path=figures / "eval_metric_bars.png")
    return results


def load_results(run_dir: str | Path) -> EvalResults:
    """Read an evaluation back from ``<run_dir>/eval`` (results.json and generations.csv), for plots and tables.

    Raises:
        EvaluationError: no evaluation in that run directory yet.
    """
    import pandas as pd

    eval_dir = Path(run_dir) / "eval"
    if not (eval_dir / "results.json").is_file():
        raise EvaluationError(
            f"No evaluation in {eval_dir} — run notebooks/2-eval.ipynb first (or `detox-sft evaluate`)."
        )
    summary = json.loads((eval_dir / "results.json").read_text())
    df = pd.read_csv(eval_dir / "generations.csv", keep_default_na=False)
    models, scorers = summary["models"], summary["scorers"]
    n, k = summary["num_prompts"], summary["num_samples"]
    first = df[df.model == models[0]].sort_values(["prompt_id", "sample_idx"])
    prompts = first.drop_duplicates("prompt_id")["prompt"].astype(str).tolist()
    gens, scores, nll, counts = {}, {}, {}, {}
    for m in models:
        part = df[df.model == m].sort_values(["prompt_id", "sample_idx"])
        gens[m] = part["continuation"].astype(str).to_numpy().reshape(n, k).tolist()
        scores[m] = {s: part[f"toxicity:{s}"].to_numpy(dtype=float).reshape(n, k) for s in scorers}
        nll[m] = part["nll"].to_numpy(dtype=float).reshape(n, k)
        counts[m] = part["num_tokens"].to_numpy(dtype=int).reshape(n, k)
    return EvalResults(prompts, models, scorers, gens, scores, nll, counts, summary, Path(run_dir))


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `detox-sft evaluate`."""
    parser.add_argument("--recipe", default="offline", help="recipe name (offline, tutorial) or YAML path")
    parser.add_argument("--run-dir", default=None, help="run directory (default: the recipe's runs/<name>)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: base,raw,detox")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Run `detox-sft evaluate`: print the summary table; exit 1 with the reason on bad input."""
    from detox_sft.toxicity import ScorerError

    try:
        recipe = load_recipe(args.recipe, run_dir=args.run_dir)
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        results = evaluate_models(recipe, recipe.run_path, models=models, progress=not args.quiet)
    except (EvaluationError, ScorerError, ValueError) as exc:
        print(f"detox-sft evaluate: {exc}", file=sys.stderr)
        return 1
    print(summary_markdown(results))
    print(f"\nwritten: {recipe.run_path / 'eval'} and {recipe.run_path / 'figures'}")
    return 0
