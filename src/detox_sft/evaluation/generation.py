"""Batched, reproducible sampling of continuations (here or on Ray), their NLL and scores, and the models to load."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.compat import drop_log_messages, library_progress_bars_off
from detox_sft.config import ARMS, EvaluationConfig, Recipe, RunPaths
from detox_sft.devices import compute_dtype, resolve_device
from detox_sft.refs import resolve_ref, revision_kwargs
from detox_sft.training import load_adapter_model


class EvaluationError(RuntimeError):
    """The evaluation cannot run; the message says what to do."""


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not (prompts := list(prompts)):
        raise ValueError("no prompts to generate from: give at least one prompt")
    if empty := [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]:
        raise ValueError(f"{len(empty)} empty prompt(s) at position(s) {empty[:10]}: remove them or give text")
    return prompts


def _encode(tokenizer: Any, prompts: list[str], limit: int, warn: bool = True) -> list[list[int]]:
    """Token ids per prompt; prompts longer than ``limit`` tokens lose their beginning (the BOS token stays)."""
    encoded, truncated, bos = [], 0, tokenizer.bos_token_id
    for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]:
        if len(ids) > limit:
            truncated += 1
            ids = ([bos] + ids[len(ids) - limit + 1 :]) if bos is not None and ids[0] == bos else ids[-limit:]
        encoded.append(list(ids))
    if truncated and warn:
        msg = f"{truncated} prompt(s) longer than {limit} tokens (the context minus max_new_tokens) were truncated"
        warnings.warn(msg + " from the left", UserWarning, stacklevel=3)
    return encoded


def _context_limit(model: Any, max_context: int | None, max_new_tokens: int) -> int:
    context = max_context or getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    limit = int(context) - max_new_tokens
    if limit < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {context}")
    return limit


def _sampler(uniforms: Any, prompt_len: int, temperature: float, top_p: float) -> Any:
    """Top-p sampling by inverse CDF from ``uniforms``, as a logits processor: -inf but on the sampled token."""
    import torch
    from transformers import LogitsProcessor
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []

    class _InverseCdfSampler(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            scores = scores.float()
            for warp in warpers:
                scores = warp(input_ids, scores)
            cdf = scores.softmax(-1).cumsum(-1)
            u = uniforms[:, input_ids.shape[1] - prompt_len].unsqueeze(-1) * cdf[:, -1:]
            # right side: the first token whose cumulative mass exceeds u, never a zero-probability token
            token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
            return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)

    return _InverseCdfSampler()


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)``: ``seqs`` padded with ``pad_id`` to the longest, on the left or the right."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    pad = {"batch_first": True, "padding_side": "left" if left else "right"}
    ids = pad_sequence([torch.tensor(seq, dtype=torch.long) for seq in seqs], padding_value=pad_id, **pad)
    return ids, pad_sequence([torch.ones(len(seq), dtype=torch.long) for seq in seqs], **pad)


def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: EvaluationConfig,
    seed: int,
    greedy: bool = False,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """``continuations[i][j]``: continuation ``j`` of prompt ``i`` (random stream ``(seed, i, j)``), ``cfg.num_samples``
    sampled (or one ``greedy``) per prompt; too long a prompt loses its beginning. ``on_batch(done, total)``: a hook."""
    from tqdm.auto import tqdm

    prompts = _check_prompts(prompts)
    limit = _context_limit(model, None, cfg.max_new_tokens)
    encoded, batches = generation_batches(tokenizer, prompts, limit, cfg.batch_size)
    texts = []
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        texts.append(generate_batch(model.eval(), tokenizer, [encoded[i] for i in batch], batch, cfg, seed, greedy))
        if on_batch is not None:
            on_batch(len(texts), len(batches))
    return by_prompt(batches, texts, len(prompts))


def by_prompt(batches: Sequence[Sequence[Any]], results: Sequence[Sequence[Any]], num_prompts: int) -> list[Any]:
    """Each batch's results put back at their prompts' positions."""
    placed = dict(zip(itertools.chain(*batches), itertools.chain(*results), strict=True))
    return [placed[i] for i in range(num_prompts)]


def generation_batches(
    tokenizer: Any, prompts: Sequence[str], limit: int, batch_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt's token ids, and batches of prompt positions longest first (less padding; an OOM shows at once)."""
    encoded = _encode(tokenizer, list(prompts), limit)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    return encoded, [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def generate_batch(
    model: Any,
    tokenizer: Any,
    encoded: Sequence[Sequence[int]],
    prompt_ids: Sequence[int],
    cfg: EvaluationConfig,
    seed: int,
    greedy: bool = False,
) -> list[list[str]]:
    """One batch of :func:`generate_continuations`; ``prompt_ids`` (positions in the whole list) pick the streams."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    k = 1 if greedy else cfg.num_samples
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    special = {"pad_token_id": pad_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    # greedy: the sampling happens in our processor, with per-sequence random streams
    gen_config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1, **special)
    # left padding: every prompt ends where generation starts
    input_ids, attention = _pad([ids for ids in encoded for _ in range(k)], pad_id, left=True)
    width, processors = input_ids.shape[1], None
    if not greedy:
        # one independent stream per (seed, prompt, sample): the draw does not depend on the batch it lands in
        u = np.stack(
            [np.random.default_rng([seed, i, j]).random(cfg.max_new_tokens) for i in prompt_ids for j in range(k)]
        )
        u = torch.as_tensor(u, dtype=torch.float32, device=model.device)
        processors = LogitsProcessorList([_sampler(u, width, cfg.temperature, cfg.top_p)])
    # A model whose generation_config.json asks for top-p sampling (the offline zoo's OPT) gets its top_p merged into
    # this greedy config (we sample in our own processor); transformers then warns that top_p is unused, once.
    unused_top_p = r"generation flags are not valid and may be ignored: \['top_p'\]"
    with torch.inference_mode(), drop_log_messages("transformers.generation.configuration_utils", unused_top_p):
        generated = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            generation_config=gen_config,
            logits_processor=processors,
        )
    texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [texts[r * k : (r + 1) * k] for r in range(len(encoded))]


def continuation_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    batch_size: int = 32,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(nll_sums, token_counts)``, ``(num_prompts, k)``: each continuation's NLL given its prompt."""
    import torch

    prompts = _check_prompts(prompts)
    cont_ids = [tokenizer(list(c), add_special_tokens=False)["input_ids"] if c else [] for c in continuations]
    longest = max((len(ids) for row in cont_ids for ids in row), default=0)
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    prompt_ids = _encode(tokenizer, prompts, max(2, context - longest), warn=False)  # reported when generating
    # longest first, right-padded; empty continuations are left out (0 tokens, 0 NLL)
    items = [(i, j) for i in range(len(prompts)) for j in range(len(cont_ids[i])) if cont_ids[i][j]]
    items.sort(key=lambda ij: -(len(prompt_ids[ij[0]]) + len(cont_ids[ij[0]][ij[1]])))
    batches = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
    k = max(len(c) for c in continuations)
    nll, counts = np.zeros((len(prompts), k)), np.zeros((len(prompts), k), dtype=np.int64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    for done, batch in enumerate(batches, start=1):
        ids, mask = _pad([prompt_ids[i] + cont_ids[i][j] for i, j in batch], pad_id, left=False)
        starts = torch.tensor([len(prompt_ids[i]) for i, _ in batch])[:, None]
        target = mask.bool() & (torch.arange(ids.shape[1]) >= starts)  # positions of continuation tokens
        ids, mask = ids.to(model.device), mask.to(model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        tgt = target[:, 1:].to(logp.device)
        values, ns = (-logp * tgt).sum(-1).cpu().numpy(), tgt.sum(-1).cpu().numpy()
        for r, (i, j) in enumerate(batch):
            nll[i, j], counts[i, j] = values[r], ns[r]
        if on_batch is not None:
            on_batch(done, len(batches))
    return nll, counts


def score_continuations(
    scorers: dict[str, Any],
    ppl: tuple[Any, Any],
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``(scores[scorer], nll_sums, token_counts)`` of one model's continuations, the NLL under ``ppl``."""
    texts = [t for row in continuations for t in row]
    scores = {s: scorer(texts).reshape(len(prompts), -1) for s, scorer in scorers.items()}
    return scores, *continuation_nll(*ppl, prompts, continuations, batch_size, on_batch)


def load_base_model(ref: str, device: str = "auto", revision: str | None = None) -> tuple[Any, Any]:
    """A causal LM (in the device's compute dtype) and its tokenizer from a hub id, a path or ``zoo:<name>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device, "evaluation.device")
    path, pinned = resolve_ref(ref), revision_kwargs(ref, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **pinned)
        with library_progress_bars_off():  # transformers' 'Loading weights' bar, on every model load
            model = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype(device), **pinned)
    except OSError as exc:
        raise EvaluationError(f"cannot load the model {ref!r} ({path}): {exc}") from exc
    return model.to(device).eval(), tokenizer


def load_arm_model(recipe: Recipe, run_dir: str | Path, arm: str, device: str = "auto") -> tuple[Any, Any]:
    """The base model with an arm's LoRA adapter merged (faster, the same outputs), and the tokenizer."""
    model, tokenizer = load_adapter_model(run_dir, arm, resolve_device(device, "evaluation.device"))
    return model.merge_and_unload().eval(), tokenizer


def load_perplexity_model(recipe: Recipe, device: str) -> tuple[Any, Any]:
    """The model that measures fluency: ``evaluation.perplexity_model`` when the recipe names one, else the base."""
    cfg, training = recipe.evaluation, recipe.training
    if cfg.perplexity_model:
        return load_base_model(cfg.perplexity_model, device, cfg.perplexity_model_revision)
    return load_base_model(training.base_model, device, training.base_model_revision)


def _model_signature(recipe: Recipe, run_dir: Path, name: str) -> dict[str, Any]:
    # weights files by size and mtime: a retrained adapter or a rebuilt zoo model invalidates the cached generations
    base = resolve_ref(recipe.training.base_model)
    sig: dict[str, Any] = {"base_model": recipe.training.base_model, "base_path": base}
    if recipe.training.base_model_revision:  # (only when pinned: the keys of unpinned runs stay as they were)
        sig["base_model_revision"] = recipe.training.base_model_revision
    files = sorted(Path(base).glob("*.safetensors")) if Path(base).is_dir() else []
    if name in ARMS:
        files += sorted(RunPaths(run_dir).adapter(name).glob("adapter_model.*"))
    for f in files:
        sig[str(f)] = [f.stat().st_size, f.stat().st_mtime_ns]
    return sig
