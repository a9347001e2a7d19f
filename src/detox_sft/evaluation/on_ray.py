"""The evaluation on Ray Data actor pools (``evaluation.executor: ray``): the local run's batches, spread over actors.

The driver plans the local run's batches; each block runs one with the local per-batch code (same tensors, same
numbers). The actors load the models from the run directory, which they must see (on a cluster, a shared volume).
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.config import EvaluationConfig, Recipe, RunPaths
from detox_sft.devices import resolve_device
from detox_sft.evaluation.generation import (
    _check_prompts,
    _context_limit,
    by_prompt,
    generate_batch,
    generation_batches,
    load_arm_model,
    load_base_model,
    nll_batch,
    nll_batches,
    nll_tables,
)
from detox_sft.refs import resolve_ref, revision_kwargs
from detox_sft.scale import BlockStore, content_key, map_blocks
from detox_sft.toxicity import load_scorers


def scorer_batch_size(cfg: EvaluationConfig) -> int:
    """Texts per scorer forward pass in the evaluation (at least 32: scoring is cheap next to generation)."""
    return max(cfg.batch_size, 32)


def _config_and_tokenizer(ref: str, revision: str | None, tokenizer_dir: str | None = None) -> tuple[Any, Any]:
    """The model's config and tokenizer, without its weights: what the driver needs to plan the batches."""
    from transformers import AutoConfig, AutoTokenizer

    path, pinned = resolve_ref(ref), revision_kwargs(ref, revision)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    return AutoConfig.from_pretrained(path, **pinned), tokenizer or AutoTokenizer.from_pretrained(path, **pinned)


def generate_on_ray(
    recipe: Recipe, run_dir: Path, name: str, model_inputs: Sequence[str], work_dir: Path, key: str, progress: bool
) -> list[list[str]]:
    """``generate_continuations`` of model ``name``, one batch per block; finished blocks are kept in ``work_dir``
    under ``key`` (the generation cache's), so an interrupted run resumes where it stopped."""
    cfg, training = recipe.evaluation, recipe.training
    adapter = None if name == "base" else str(RunPaths(run_dir).adapter(name))
    config, tokenizer = _config_and_tokenizer(training.base_model, training.base_model_revision, adapter)
    limit = _context_limit(types.SimpleNamespace(config=config), None, cfg.max_new_tokens)
    encoded, batches = generation_batches(tokenizer, _check_prompts(model_inputs), limit, cfg.batch_size)
    results = map_blocks(
        [{"ids": batch, "encoded": [encoded[i] for i in batch]} for batch in batches],
        _generator_setup,
        _generate_block,
        setup_args=(recipe, str(run_dir), name),
        actors=cfg.ray_actors,
        device=cfg.device,
        # the plan is in the key: block i is batch i of these batches only
        store=BlockStore(work_dir, f"generate-{name}-{content_key(key, batches)}", num_blocks=len(batches)),
        desc=f"generate ({name}) on ray",
        progress=progress,
    )
    return by_prompt(batches, results, len(model_inputs))


def _generator_setup(recipe: Recipe, run_dir: str, name: str) -> tuple[Any, ...]:
    device = resolve_device(recipe.evaluation.device, "evaluation.device")
    if name == "base":
        model, tokenizer = load_base_model(recipe.training.base_model, device, recipe.training.base_model_revision)
    else:
        model, tokenizer = load_arm_model(recipe, run_dir, name, device)
    return model, tokenizer, recipe.evaluation, recipe.seed


def _generate_block(state: tuple[Any, ...], payload: dict[str, Any]) -> list[list[str]]:
    return generate_batch(*state[:2], payload["encoded"], payload["ids"], *state[2:])


def score_on_ray(
    recipe: Recipe,
    generations: dict[str, list[list[str]]],
    models: Sequence[str],
    model_inputs: Sequence[str],
    progress: bool,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(scores[model][scorer], nll[model], token_counts[model])`` (``(prompts, k)`` each) of every continuation.

    Scoring blocks are runs of each model's continuations sorted by length, a scorer batch each: the batches a
    length-sorting classifier forms on the whole list (a row-wise scorer gives the same numbers on any split).
    """
    cfg = recipe.evaluation
    ppl_ref = cfg.perplexity_model or recipe.training.base_model
    ppl_revision = cfg.perplexity_model_revision if cfg.perplexity_model else recipe.training.base_model_revision
    config, tokenizer = _config_and_tokenizer(ppl_ref, ppl_revision)
    context = int(getattr(config, "max_position_embeddings", None) or 2048)
    size = scorer_batch_size(cfg)
    chunks, nll_items, payloads = {}, {}, []  # per model: its scoring blocks, then its perplexity batches
    for m in models:
        flat = [t for row in generations[m] for t in row]
        order = np.argsort([len(t) for t in flat], kind="stable").tolist()
        chunks[m] = [order[s : s + size] for s in range(0, len(order), size)]
        payloads += [{"texts": [flat[i] for i in rows]} for rows in chunks[m]]
        nll_items[m], seqs, prompt_lens = nll_batches(tokenizer, model_inputs, generations[m], context, cfg.batch_size)
        payloads += [{"seqs": seq, "prompt_lens": plen} for seq, plen in zip(seqs, prompt_lens, strict=True)]
    results = iter(
        map_blocks(
            payloads,
            _scorer_setup,
            _score_block,
            setup_args=(list(cfg.scorers), size, ppl_ref, cfg.device, ppl_revision, dict(cfg.scorer_revisions)),
            actors=cfg.ray_actors,
            device=cfg.device,
            desc="score and perplexity on ray",
            progress=progress,
        )
    )
    scores, nll, counts, n = {}, {}, {}, len(model_inputs)
    for m in models:
        flat_scores = {s: np.zeros(sum(map(len, generations[m]))) for s in cfg.scorers}
        for rows in chunks[m]:
            result = next(results)
            for s in cfg.scorers:
                flat_scores[s][rows] = result[s]
        scores[m] = {s: flat_scores[s].reshape(n, -1) for s in cfg.scorers}
        done = [(r["nll"], r["n"]) for r in itertools.islice(results, len(nll_items[m]))]
        nll[m], counts[m] = nll_tables(nll_items[m], done, n, max(len(c) for c in generations[m]))
    return scores, nll, counts


def _scorer_setup(
    scorers: list[str], batch_size: int, ppl_ref: str, device: str, ppl_revision: str | None, revisions: dict[str, str]
) -> tuple[Any, ...]:
    device = resolve_device(device, "evaluation.device")
    model, tokenizer = load_base_model(ppl_ref, device, ppl_revision)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return load_scorers(scorers, device=device, batch_size=batch_size, revisions=revisions), model, pad_id


def _score_block(state: tuple[Any, ...], payload: dict[str, Any]) -> dict[str, list[float]]:
    scorers, model, pad_id = state
    if "texts" in payload:
        return {s: np.asarray(scorer(payload["texts"]), dtype=np.float64).tolist() for s, scorer in scorers.items()}
    nll, n = nll_batch(model, payload["seqs"], payload["prompt_lens"], pad_id)
    return {"nll": nll.tolist(), "n": n.tolist()}
