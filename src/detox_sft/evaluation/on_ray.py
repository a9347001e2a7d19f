"""The evaluation on Ray Data actor pools (``evaluation.executor: ray``): the local run's calls and numbers. The actors
load the models from the run directory, which they must see (on a cluster, a shared volume)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.config import EvaluationConfig, Recipe, RunPaths
from detox_sft.devices import resolve_device
from detox_sft.evaluation import generation
from detox_sft.refs import resolve_ref, revision_kwargs
from detox_sft.scale import BlockStore, content_key, map_blocks
from detox_sft.toxicity import load_scorers


def scorer_batch_size(cfg: EvaluationConfig) -> int:
    """Texts per scorer forward pass in the evaluation (at least 32: scoring is cheap next to generation)."""
    return max(cfg.batch_size, 32)


def generate_on_ray(
    recipe: Recipe, run_dir: Path, name: str, model_inputs: Sequence[str], work_dir: Path, key: str, progress: bool
) -> list[list[str]]:
    """``generate_continuations`` of model ``name``, one batch per block, kept in ``work_dir`` to resume."""
    from transformers import AutoConfig, AutoTokenizer

    cfg, ref = recipe.evaluation, recipe.training.base_model
    pinned = revision_kwargs(ref, recipe.training.base_model_revision)
    # the plan needs the tokenizer (an arm's is saved with its adapter) and the context, not the weights
    tokenizer_dir = resolve_ref(ref) if name == "base" else str(RunPaths(run_dir).adapter(name))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **(pinned if name == "base" else {}))
    context = getattr(AutoConfig.from_pretrained(resolve_ref(ref), **pinned), "max_position_embeddings", None)
    limit = generation._context_limit(None, context, cfg.max_new_tokens)
    encoded, batches = generation.generation_batches(tokenizer, model_inputs, limit, cfg.batch_size)
    texts = map_blocks(
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
    return generation.by_prompt(batches, texts, len(model_inputs))


def _generator_setup(recipe: Recipe, run_dir: str, name: str) -> tuple[Any, ...]:
    device, training = resolve_device(recipe.evaluation.device, "evaluation.device"), recipe.training
    if name == "base":
        return (*generation.load_base_model(training.base_model, device, training.base_model_revision), recipe)
    return (*generation.load_arm_model(recipe, run_dir, name, device), recipe)


def _generate_block(state: tuple[Any, ...], payload: dict[str, Any]) -> list[list[str]]:
    model, tok, recipe = state
    return generation.generate_batch(model, tok, payload["encoded"], payload["ids"], recipe.evaluation, recipe.seed)


def score_on_ray(
    recipe: Recipe, generations: dict[str, list[list[str]]], model_inputs: Sequence[str], progress: bool
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(scores[model][scorer], nll[model], token_counts[model])`` of every continuation (``(prompts, k)`` each)."""
    cfg = recipe.evaluation
    results = map_blocks(
        [{"inputs": list(model_inputs), "continuations": gens} for gens in generations.values()],
        _scorer_setup,
        _score_block,
        setup_args=(recipe,),
        actors=cfg.ray_actors,
        device=cfg.device,
        desc="score and perplexity on ray",
        progress=progress,
    )
    by_model = dict(zip(generations, results, strict=True))
    scores = {m: {s: np.asarray(v, dtype=np.float64) for s, v in r["scores"].items()} for m, r in by_model.items()}
    nll = {m: np.asarray(r["nll"], dtype=np.float64) for m, r in by_model.items()}
    return scores, nll, {m: np.asarray(r["n"], dtype=np.int64) for m, r in by_model.items()}


def _scorer_setup(recipe: Recipe) -> tuple[Any, ...]:
    cfg, device = recipe.evaluation, resolve_device(recipe.evaluation.device, "evaluation.device")
    scorers = load_scorers(cfg.scorers, device, scorer_batch_size(cfg), revisions=cfg.scorer_revisions)
    return scorers, generation.load_perplexity_model(recipe, device), cfg.batch_size


def _score_block(state: tuple[Any, ...], payload: dict[str, Any]) -> dict[str, Any]:
    scores, nll, n = generation.score_continuations(*state[:2], payload["inputs"], payload["continuations"], state[2])
    return {"scores": {s: v.tolist() for s, v in scores.items()}, "nll": nll.tolist(), "n": n.tolist()}
