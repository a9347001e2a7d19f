"""Batched, reproducible sampling of continuations, their conditional NLL, and the models to sample from.

Each is planned (:func:`generation_batches`, :func:`nll_batches`), then run a batch at a time (:func:`generate_batch`,
:func:`nll_batch`); :mod:`~detox_sft.evaluation.on_ray` runs these same batches, so every number is as here.
"""

from __future__ import annotations

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

_GENERATION_CONFIG_LOGGER = "transformers.generation.configuration_utils"
_UNUSED_FLAGS = r"generation flags are not valid and may be ignored: \['top_p'\]"


class EvaluationError(RuntimeError):
    """The evaluation cannot run; the message says what to do."""


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
    encoded, truncated, bos = [], 0, tokenizer.bos_token_id
    for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]:
        if len(ids) > limit:
            truncated += 1
            ids = ([bos] + ids[len(ids) - limit + 1 :]) if bos is not None and ids[0] == bos else ids[-limit:]
        encoded.append(list(ids))
    if truncated:
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
    """A logits processor that samples from the top-p distribution with given uniform numbers (inverse CDF): -inf
    everywhere but on the sampled token, so greedy decoding picks it."""
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
    """``continuations[i][j]``: the generated text (only) of continuation ``j`` of prompt ``i``, batched.

    Args:
        model: a causal LM (a PeftModel works too), and ``tokenizer`` its tokenizer.
        prompts: non-empty texts; those longer than the context minus ``max_new_tokens`` lose their beginning.
        cfg: ``num_samples`` (k), ``max_new_tokens``, ``top_p``, ``temperature``, ``batch_size`` (prompts per batch).
        seed: continuation ``j`` of prompt ``i`` samples from the random stream ``(seed, i, j)``.
        greedy: one greedy continuation per prompt instead of ``k`` sampled ones.
        progress: show a tqdm bar; ``on_batch(done, total)`` is called after each batch, for a caller's own bar.
    """
    from tqdm.auto import tqdm

    prompts = _check_prompts(prompts)
    encoded, batches = generation_batches(
        tokenizer, prompts, _context_limit(model, None, cfg.max_new_tokens), cfg.batch_size
    )
    texts = []
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        texts.append(generate_batch(model.eval(), tokenizer, [encoded[i] for i in batch], batch, cfg, seed, greedy))
        if on_batch is not None:
            on_batch(len(texts), len(batches))
    return by_prompt(batches, texts, len(prompts))


def by_prompt(batches: Sequence[Sequence[Any]], results: Sequence[Sequence[Any]], num_prompts: int) -> list[Any]:
    """Each batch's results put back at their prompts' positions."""
    out: list[Any] = [[] for _ in range(num_prompts)]
    for batch, rows in zip(batches, results, strict=True):
        for i, row in zip(batch, rows, strict=True):
            out[i] = row
    return out


def generation_batches(
    tokenizer: Any, prompts: Sequence[str], limit: int, batch_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    """The token ids of each prompt and the batches :func:`generate_continuations` runs, as prompt positions; longest
    first: similar lengths share a batch (less padding), and an out-of-memory shows up at once."""
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
    """One batch of :func:`generate_continuations`: the continuations of the ``encoded`` prompts, whose positions in
    the whole list are ``prompt_ids`` (their random streams), whichever batch or process it runs in."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

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
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded) * k, width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded) * k, width), dtype=torch.long)
    for row in range(len(encoded) * k):  # left padding: every prompt ends where generation starts
        ids = encoded[row // k]
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    processors = None
    if not greedy:
        # one independent stream per (seed, prompt, sample): the draw does not depend on the batch it lands in
        u = np.stack(
            [np.random.default_rng([seed, i, j]).random(cfg.max_new_tokens) for i in prompt_ids for j in range(k)]
        )
        u = torch.as_tensor(u, dtype=torch.float32, device=model.device)
        processors = LogitsProcessorList([_sampler(u, width, cfg.temperature, cfg.top_p)])
    # A model whose generation_config.json asks for top-p sampling (the offline zoo's OPT) gets its top_p merged into
    # this greedy config (we sample in our own processor); transformers then warns that top_p is unused, once.
    with torch.inference_mode(), drop_log_messages(_GENERATION_CONFIG_LOGGER, _UNUSED_FLAGS):
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
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(nll_sums, token_counts)``, ``(num_prompts, k)``: the NLL of each continuation's tokens given its prompt
    (``continuations[i]``: prompt ``i``'s), ``batch_size`` sequences a pass; progress as :func:`generate_continuations`."""
    from tqdm.auto import tqdm

    prompts = _check_prompts(prompts)
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    items, seqs, prompt_lens = nll_batches(tokenizer, prompts, continuations, context, batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = []
    for batch in tqdm(range(len(items)), desc="perplexity", unit="batch", disable=not progress):
        results.append(nll_batch(model.eval(), seqs[batch], prompt_lens[batch], pad_id))
        if on_batch is not None:
            on_batch(batch + 1, len(items))
    return nll_tables(items, results, len(prompts), max(len(c) for c in continuations))


def nll_tables(items: Sequence[Any], results: Sequence[Any], num_prompts: int, k: int) -> tuple[np.ndarray, ...]:
    """``(nll_sums, token_counts)`` tables, ``(num_prompts, k)``, from each batch's items and ``(nll, n)`` result."""
    nll, counts = np.zeros((num_prompts, k)), np.zeros((num_prompts, k), dtype=np.int64)
    for batch, (values, ns) in zip(items, results, strict=True):
        for (i, j), value, n in zip(batch, values, ns, strict=True):
            nll[i, j], counts[i, j] = value, n
    return nll, counts


def nll_batches(
    tokenizer: Any, prompts: Sequence[str], continuations: Sequence[Sequence[str]], context: int, batch_size: int
) -> tuple[list[list[tuple[int, int]]], list[list[list[int]]], list[list[int]]]:
    """The batches :func:`continuation_nll` runs: per batch its ``(prompt, sample)`` items, token sequences (prompt
    + continuation) and prompt lengths. Longest first; empty continuations are left out (0 tokens, 0 NLL)."""
    cont_ids = [tokenizer(list(c), add_special_tokens=False)["input_ids"] if c else [] for c in continuations]
    longest = max((len(ids) for row in cont_ids for ids in row), default=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation was already reported at generation time
        prompt_ids = _encode(tokenizer, list(prompts), max(2, context - longest))
    items = [(i, j) for i in range(len(prompts)) for j in range(len(cont_ids[i])) if cont_ids[i][j]]
    items.sort(key=lambda ij: -(len(prompt_ids[ij[0]]) + len(cont_ids[ij[0]][ij[1]])))
    batches = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
    seqs = [[prompt_ids[i] + cont_ids[i][j] for i, j in batch] for batch in batches]
    return batches, seqs, [[len(prompt_ids[i]) for i, _ in batch] for batch in batches]


def nll_batch(model: Any, seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int) -> tuple[Any, Any]:
    """One batch of :func:`continuation_nll`: the NLL sum and the token count of each sequence's continuation part
    (the tokens after its first ``prompt_lens[r]``), right-padded into one forward pass."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    target = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions of continuation tokens
    for r, (seq, plen) in enumerate(zip(seqs, prompt_lens, strict=True)):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        target[r, plen : len(seq)] = True
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    tgt = target[:, 1:].to(logp.device)
    return (-logp * tgt).sum(-1).cpu().numpy(), tgt.sum(-1).cpu().numpy()


def _check_adapter(run_dir: Path, arm: str) -> None:
    if not RunPaths(run_dir).adapter_config(arm).is_file():
        raise EvaluationError(
            f"No adapter in {RunPaths(run_dir).adapter(arm)} — run notebooks/1-sft.ipynb first (or `detox-sft train`) "
            f"to train the {arm!r} arm."
        )


def load_base_model(ref: str, device: str = "auto", revision: str | None = None) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a hub id (at ``revision``), a local path or ``zoo:<name>``; float16 on a
    GPU, float32 on CPU (half precision is slow or unsupported there)."""
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
    """The base model with an arm's LoRA adapter, as training loads it (:func:`detox_sft.training.load_adapter_model`),
    merged (faster than the adapter's extra matmuls, the same outputs), and the tokenizer; EvaluationError without."""
    _check_adapter(Path(run_dir), arm)
    model, tokenizer = load_adapter_model(run_dir, arm, resolve_device(device, "evaluation.device"))
    return model.merge_and_unload().eval(), tokenizer


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
