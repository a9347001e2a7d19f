"""The evaluation on Ray Data actor pools (``evaluation.executor: ray``): the local run's batches, spread over actors.

Generation, toxicity scoring and the perplexity pass each run the batches the local run forms (planned here, in the
driver, by :func:`~detox_sft.evaluation.generation.generation_batches` and
:func:`~detox_sft.evaluation.generation.nll_batches`), one batch per block, with the same per-batch code
(:func:`~detox_sft.evaluation.generation.generate_batch`, :func:`~detox_sft.evaluation.generation.nll_batch`): every
number is computed from the same tensors as in one process, so the metrics are the same. The actors load the models
from the run directory, which they must see (a local Ray does; on a cluster, a shared volume).

Not here yet: a vLLM backend (``SamplingParams(n=k)``, CUDA only) would generate faster on GPUs, but it draws its own
random numbers, so its continuations would not be the HF path's; it would be a separate, documented choice.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.config import EvaluationConfig, Recipe, RunPaths
from detox_sft.evaluation.generation import (
    _check_prompts,
    _context_limit,
    _resolve_device,
    generate_batch,
    generation_batches,
    load_arm_model,
    load_base_model,
    nll_batch,
    nll_batches,
)
from detox_sft.refs import resolve_ref, revision_kwargs
from detox_sft.scale import BlockStore, content_key, map_blocks
from detox_sft.toxicity import load_scorers

__all__ = ["generate_on_ray", "score_on_ray", "scorer_batch_size"]


def scorer_batch_size(cfg: EvaluationConfig) -> int:
    """Texts per scorer forward pass in the evaluation (at least 32: scoring is cheap next to generation)."""
    return max(cfg.batch_size, 32)


def _config_and_tokenizer(ref: str, tokenizer_dir: str | None = None, revision: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    path, pinned = resolve_ref(ref), revision_kwargs(ref, revision)
    tokenizer = (
        AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else AutoTokenizer.from_pretrained(path, **pinned)
    )
    return AutoConfig.from_pretrained(path, **pinned), tokenizer


def generate_on_ray(
    recipe: Recipe,
    run_dir: Path,
    name: str,
    model_inputs: Sequence[str],
    work_dir: Path,
    key: str,
    progress: bool = True,
) -> list[list[str]]:
    """``generate_continuations`` of model ``name`` (``base``, ``raw``, ``detox``), one batch per block on Ray.

    Finished blocks are kept in ``work_dir`` under ``key`` (the generation cache's key), so an interrupted run
    resumes where it stopped.
    """
    cfg = recipe.evaluation
    adapter = None if name == "base" else str(RunPaths(run_dir).adapter(name))
    config, tokenizer = _config_and_tokenizer(recipe.training.base_model, adapter, recipe.training.base_model_revision)
    limit = _context_limit(types.SimpleNamespace(config=config), None, cfg.max_new_tokens)
    encoded, batches = generation_batches(tokenizer, _check_prompts(model_inputs), limit, cfg.batch_size)
    payloads = [{"ids": batch, "encoded": [encoded[i] for i in batch]} for batch in batches]
    results = map_blocks(
        payloads,
        _generator_setup,
        _generate_block,
        setup_args=(recipe, str(run_dir), name),
        actors=cfg.ray_actors,
        device=cfg.device,
        # the plan is in the key: block i is batch i of these batches only
        store=BlockStore(work_dir, f"generate-{name}-{content_key(key, batches)}", num_blocks=len(payloads)),
        desc=f"generate ({name}) on ray",
        progress=progress,
    )
    out: list[list[str]] = [[] for _ in model_inputs]
    for batch, texts in zip(batches, results, strict=True):
        for i, row in zip(batch, texts, strict=True):
            out[i] = row
    return out


def _generator_setup(recipe: Recipe, run_dir: str, name: str) -> tuple[Any, ...]:
    device = _resolve_device(recipe.evaluation.device)
    if name == "base":
        model, tokenizer = load_base_model(recipe.training.base_model, device, recipe.training.base_model_revision)
    else:
        model, tokenizer = load_arm_model(recipe, run_dir, name, device)
    return model, tokenizer, recipe.evaluation, recipe.seed, device


def _generate_block(state: tuple[Any, ...], payload: dict[str, Any]) -> list[list[str]]:
    model, tokenizer, cfg, seed, device = state
    return generate_batch(model, tokenizer, payload["encoded"], payload["ids"], cfg, seed, device)


def score_on_ray(
    recipe: Recipe,
    generations: dict[str, list[list[str]]],
    models: Sequence[str],
    model_inputs: Sequence[str],
    progress: bool = True,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Toxicity under every scorer and NLL under the perplexity model of every continuation, on Ray.

    Scoring blocks are runs of each model's continuations sorted by length, a scorer batch at a time: the batches a
    length-sorting classifier forms on the whole list (a row-wise scorer gives the same numbers on any split).

    Returns:
        ``(scores[model][scorer], nll[model], token_counts[model])``, each ``(prompts, k)``, as the local run has them.
    """
    cfg = recipe.evaluation
    ppl_ref = cfg.perplexity_model or recipe.training.base_model
    ppl_revision = cfg.perplexity_model_revision if cfg.perplexity_model else recipe.training.base_model_revision
    config, tokenizer = _config_and_tokenizer(ppl_ref, revision=ppl_revision)
    context = int(getattr(config, "max_position_embeddings", None) or 2048)
    size = scorer_batch_size(cfg)
    payloads: list[dict[str, Any]] = []
    places: list[tuple[str, str, list[Any]]] = []
    for m in models:
        flat = [t for row in generations[m] for t in row]
        order = np.argsort([len(t) for t in flat], kind="stable").tolist()
        for s in range(0, len(order), size):
            rows = order[s : s + size]
            payloads.append({"kind": "score", "texts": [flat[i] for i in rows]})
            places.append((m, "score", rows))
        items, seqs, prompt_lens = nll_batches(tokenizer, model_inputs, generations[m], context, cfg.batch_size)
        for batch, seq, plen in zip(items, seqs, prompt_lens, strict=True):
            payloads.append({"kind": "nll", "seqs": seq, "prompt_lens": plen})
            places.append((m, "nll", batch))
    results = map_blocks(
        payloads,
        _scorer_setup,
        _score_block,
        setup_args=(list(cfg.scorers), size, ppl_ref, cfg.device, ppl_revision, dict(cfg.scorer_revisions)),
        actors=cfg.ray_actors,
        device=cfg.device,
        desc="score and perplexity on ray",
        progress=progress,
    )
    n = len(model_inputs)
    flat_scores = {m: {s: np.zeros(sum(map(len, generations[m]))) for s in cfg.scorers} for m in models}
    k = {m: max(len(c) for c in generations[m]) for m in models}
    nll = {m: np.zeros((n, k[m])) for m in models}
    counts = {m: np.zeros((n, k[m]), dtype=np.int64) for m in models}
    for (m, kind, where), result in zip(places, results, strict=True):
        if kind == "score":
            for s in cfg.scorers:
                flat_scores[m][s][where] = result[s]
        else:
            for (i, j), value, count in zip(where, result["nll"], result["n"], strict=True):
                nll[m][i, j], counts[m][i, j] = value, count
    scores = {m: {s: flat_scores[m][s].reshape(n, -1) for s in cfg.scorers} for m in models}
    return scores, nll, counts


def _scorer_setup(
    scorers: list[str],
    batch_size: int,
    ppl_ref: str,
    device: str,
    ppl_revision: str | None = None,
    scorer_revisions: dict[str, str] | None = None,
) -> tuple[Any, ...]:
    device = _resolve_device(device)
    model, tokenizer = load_base_model(ppl_ref, device, ppl_revision)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loaded = load_scorers(scorers, device=device, batch_size=batch_size, revisions=scorer_revisions)
    return loaded, model, pad_id, device


def _score_block(state: tuple[Any, ...], payload: dict[str, Any]) -> dict[str, list[float]]:
    scorers, model, pad_id, device = state
    if payload["kind"] == "score":
        return {s: np.asarray(scorer(payload["texts"]), dtype=np.float64).tolist() for s, scorer in scorers.items()}
    nll, n = nll_batch(model, payload["seqs"], payload["prompt_lens"], pad_id, device)
    return {"nll": nll.tolist(), "n": n.tolist()}
