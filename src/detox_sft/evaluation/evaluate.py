"""The whole evaluation step: generate, score and summarise every model on the same prompts, resumably."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detox_sft.config import EvaluationConfig, Recipe, RunPaths
from detox_sft.data import load_eval_prompts
from detox_sft.evaluation.generation import (
    EvaluationError,
    _check_adapter,
    _model_signature,
    _resolve_device,
    continuation_nll,
    generate_continuations,
    load_arm_model,
    load_base_model,
)
from detox_sft.evaluation.on_ray import generate_on_ray, score_on_ray, scorer_batch_size
from detox_sft.evaluation.report import (
    ARMS,
    MODELS,
    EvalResults,
    _summarize,
    plot_metric_bars,
    plot_toxicity_distributions,
    summary_markdown,
)
from detox_sft.files import atomic_write_json, atomic_write_text, read_json_or_none
from detox_sft.prompts import generation_prompt
from detox_sft.toxicity import load_scorers

logger = logging.getLogger(__name__)


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
        progress: show one progress bar for the whole step (a step per model and stage: generate, score,
            perplexity; the running stage and its batches beside it). With ``evaluation.executor: ray`` each stage
            shows its own bar over Ray blocks instead.

    Returns:
        The :class:`EvalResults`; also written to ``<run_dir>/eval/`` and ``<run_dir>/figures/``.

    Raises:
        EvaluationError: unknown model name, missing adapter, no prompts.
        detox_sft.toxicity.ScorerError: a scorer cannot be loaded.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    cfg = recipe.evaluation
    run_dir = Path(run_dir) if run_dir is not None else recipe.run_path
    models = _checked_models(models, run_dir)
    device = _resolve_device(cfg.device)
    # one bar for the step: generate, score and perplexity per model, on the toxic (and the non-toxic) prompts; on
    # Ray each stage has its own bar over blocks (detox_sft.scale.map_blocks) and this one stays hidden
    steps = 3 * len(models) * (2 if cfg.nontoxic_prompts else 1)
    with tqdm(total=steps, desc="evaluate", unit="step", disable=not progress or cfg.executor == "ray") as bar:
        bar.set_postfix_str("load scorers")
        scorers = load_scorers(
            cfg.scorers, device=device, batch_size=scorer_batch_size(cfg), revisions=cfg.scorer_revisions
        )
        prompts = _eval_prompts(recipe, prompts)
        model_inputs = _model_inputs(recipe, prompts)
        eval_dir = RunPaths(run_dir).eval
        eval_dir.mkdir(parents=True, exist_ok=True)

        timings: dict[str, float] = {}
        generations, base = _generate_all(
            recipe, run_dir, models, model_inputs, device, eval_dir, progress, timings, bar
        )
        if cfg.executor == "ray":  # the same batches as below, on actor pools: the same numbers
            t0 = time.perf_counter()
            scores, nll, counts = score_on_ray(recipe, generations, models, model_inputs, progress)
            results = EvalResults(prompts, models, list(cfg.scorers), generations, scores, nll, counts, run_dir=run_dir)
            timings["score_and_perplexity_s"] = round(time.perf_counter() - t0, 2)
        else:
            scores = _score_all(scorers, generations, models, len(prompts), bar)
            results = EvalResults(prompts, models, list(cfg.scorers), generations, scores, run_dir=run_dir)
            _add_fluency(results, recipe, device, model_inputs, base, bar, timings)
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
        if cfg.nontoxic_prompts:  # a separate key and file: the toxic-prompt results stay as they are without it
            nontoxic = _evaluate_nontoxic(recipe, run_dir, models, scorers, device, eval_dir, base, progress, bar)
            results.summary["nontoxic"] = nontoxic.summary
            atomic_write_text(eval_dir / "generations_nontoxic.csv", _generations_frame(nontoxic).to_csv(index=False))
        bar.set_postfix_str("done")
    _write_outputs(results, eval_dir, RunPaths(run_dir).figures)
    return results


def _evaluate_nontoxic(
    recipe: Recipe,
    run_dir: Path,
    models: list[str],
    scorers: dict[str, Any],
    device: str,
    eval_dir: Path,
    base: tuple[Any, Any] | None,
    progress: bool,
    bar: Any,
) -> EvalResults:
    """The same models, sampling, scorers and metrics on ``evaluation.nontoxic_prompts`` label-0 prompts.

    What the detox arm gives up where there is nothing to detoxify: its toxicity, perplexity and distinct-n beside
    the base model's and the raw arm's. Generations are cached in ``generations_<model>_nontoxic.json``.
    """
    cfg = recipe.evaluation
    started = time.perf_counter()
    data = dataclasses.replace(recipe.data, eval_label=0, num_eval_prompts=cfg.nontoxic_prompts)
    prompts = _eval_prompts(dataclasses.replace(recipe, data=data), None)
    model_inputs = _model_inputs(recipe, prompts)
    timings: dict[str, float] = {}
    generations, base = _generate_all(
        recipe, run_dir, models, model_inputs, device, eval_dir, progress, timings, bar, "_nontoxic", base
    )
    if cfg.executor == "ray":
        scores, nll, counts = score_on_ray(recipe, generations, models, model_inputs, progress)
        results = EvalResults(prompts, models, list(cfg.scorers), generations, scores, nll, counts, run_dir=run_dir)
    else:
        scores = _score_all(scorers, generations, models, len(prompts), bar, " (non-toxic)")
        results = EvalResults(prompts, models, list(cfg.scorers), generations, scores, run_dir=run_dir)
        _add_fluency(results, recipe, device, model_inputs, base, bar, timings, " (non-toxic)")
    timing = {**timings, "total_s": round(time.perf_counter() - started, 2)}
    results.summary = _summarize(results, cfg, recipe.seed, {"eval_label": 0, "timing": timing})
    return results


def _score_all(
    scorers: dict[str, Any],
    generations: dict[str, list[list[str]]],
    models: list[str],
    num_prompts: int,
    bar: Any,
    where: str = "",
) -> dict[str, dict[str, Any]]:
    """Toxicity of every continuation under every scorer: ``scores[model][scorer]``, shape (prompts, k).

    One step of ``bar`` per model; ``where`` labels the prompts in its postfix (`` (non-toxic)``).
    """
    scores: dict[str, dict[str, Any]] = {m: {} for m in models}
    for m in models:
        texts = [t for row in generations[m] for t in row]
        for s, scorer in scorers.items():
            bar.set_postfix_str(f"score {m}{where}: {s}")
            scores[m][s] = scorer(texts).reshape(num_prompts, -1)
        bar.update()
    return scores


def _on_batch(bar: Any, label: str) -> Any:
    """Show ``label`` in ``bar``'s postfix now, and ``label done/total`` after each batch (an ``on_batch``)."""
    bar.set_postfix_str(label)
    return lambda done, total: bar.set_postfix_str(f"{label} {done}/{total}")


def _checked_models(models: Sequence[str], run_dir: Path) -> list[str]:
    """The requested models in :data:`MODELS` order; fails before any expensive work (unknown name, no adapter)."""
    requested = [models] if isinstance(models, str) else list(models)
    checked = [m for m in MODELS if m in requested]
    if not checked or set(requested) - set(MODELS):
        raise EvaluationError(f"models must be some of {', '.join(MODELS)}; got {requested}")
    for arm in checked:
        if arm in ARMS:
            _check_adapter(run_dir, arm)
    return checked


def _generate_all(
    recipe: Recipe,
    run_dir: Path,
    models: list[str],
    model_inputs: list[str],
    device: str,
    eval_dir: Path,
    progress: bool,
    timings: dict[str, float],
    bar: Any,
    tag: str = "",
    base: tuple[Any, Any] | None = None,
) -> tuple[dict[str, list[list[str]]], tuple[Any, Any] | None]:
    """Each model's continuations, read from ``generations_<model><tag>.json`` when its key matches, else generated.

    Returns them and the base model with its tokenizer when it was loaded (the fluency step reuses it); ``base``
    is one loaded before, reused. ``bar`` (the evaluation's) advances one step per model, a cached one included.
    """
    cfg = recipe.evaluation
    where = " (non-toxic)" if tag == "_nontoxic" else tag
    generations: dict[str, list[list[str]]] = {}
    for name in models:
        key = _cache_key(model_inputs, cfg, recipe.seed, _model_signature(recipe, run_dir, name))
        cache = eval_dir / f"generations_{name}{tag}.json"
        cached = _cached_generations(cache, key)
        if cached is not None:
            logger.info("reusing cached generations of %s from %s", name, cache)
            generations[name] = cached
            bar.update()
            continue
        t0 = time.perf_counter()
        if cfg.executor == "ray":
            generations[name] = generate_on_ray(
                recipe, run_dir, name, model_inputs, eval_dir / "ray-blocks", key, progress
            )
            timings[f"generate_{name}_s"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(cache, {"key": key, "model": name, "generations": generations[name]})
            bar.update()
            continue
        if name == "base":
            if base is None:
                bar.set_postfix_str("load base")
                base = load_base_model(recipe.training.base_model, device, recipe.training.base_model_revision)
            model, tokenizer = base
        else:
            bar.set_postfix_str(f"load {name}")
            model, tokenizer = load_arm_model(recipe, run_dir, name, device)
        generations[name] = generate_continuations(
            model,
            tokenizer,
            model_inputs,
            cfg,
            recipe.seed,
            progress=False,
            on_batch=_on_batch(bar, f"generate {name}{where}"),
        )
        timings[f"generate_{name}_s"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(cache, {"key": key, "model": name, "generations": generations[name]})
        bar.update()
        if name != "base":
            del model  # free the arm before loading the next one
    return generations, base


def _cached_generations(cache: Path, key: str) -> list[list[str]] | None:
    """The cached continuations when the cache's key matches; `None` (generate again) otherwise.

    A damaged cache (truncated, not JSON: a run killed while writing it by a version that wrote in place) counts as
    absent, with a warning.
    """
    if not cache.is_file():
        return None
    cached = read_json_or_none(cache)
    if not isinstance(cached, dict) or not isinstance(cached.get("generations"), list):
        warnings.warn(f"{cache} is unreadable (truncated?); generating again", UserWarning, stacklevel=3)
        return None
    return cached["generations"] if cached.get("key") == key else None


def _add_fluency(
    results: EvalResults,
    recipe: Recipe,
    device: str,
    model_inputs: list[str],
    base: tuple[Any, Any] | None,
    bar: Any,
    timings: dict[str, float],
    where: str = "",
) -> None:
    """NLL of every model's continuations, given the prompt, under the base (or the configured) model.

    One step of ``bar`` per model; ``where`` labels the prompts in its postfix (`` (non-toxic)``).
    """
    cfg = recipe.evaluation
    t0 = time.perf_counter()
    if cfg.perplexity_model or base is None:
        bar.set_postfix_str("load the perplexity model")
    if cfg.perplexity_model:
        ppl_model, ppl_tok = load_base_model(cfg.perplexity_model, device, cfg.perplexity_model_revision)
    else:
        ppl_model, ppl_tok = base or load_base_model(
            recipe.training.base_model, device, recipe.training.base_model_revision
        )
    for m in results.models:
        results.nll[m], results.token_counts[m] = continuation_nll(
            ppl_model,
            ppl_tok,
            model_inputs,
            results.generations[m],
            batch_size=cfg.batch_size,
            progress=False,
            on_batch=_on_batch(bar, f"perplexity {m}{where}"),
        )
        bar.update()
    timings["perplexity_s"] = round(time.perf_counter() - t0, 2)


def _write_outputs(results: EvalResults, eval_dir: Path, figures: Path) -> None:
    """``generations.csv``, ``summary.md``, the two figures in ``figures``, then ``results.json`` in ``eval_dir``.

    Each file is written atomically, and ``results.json``, the completion marker :func:`load_results` trusts, last.
    """
    atomic_write_text(eval_dir / "generations.csv", _generations_frame(results).to_csv(index=False))
    atomic_write_text(eval_dir / "summary.md", summary_markdown(results))
    plot_toxicity_distributions(results, path=figures / "eval_toxicity_distributions.png")
    plot_metric_bars(results, path=figures / "eval_metric_bars.png")
    atomic_write_json(eval_dir / "results.json", results.summary, indent=2)


def _generations_frame(results: EvalResults) -> Any:
    """One row per (model, prompt, sample): the continuation, its toxicity under each scorer, its NLL."""
    import pandas as pd

    rows = []
    for m in results.models:
        for i, row in enumerate(results.generations[m]):
            for j, text in enumerate(row):
                rec = {"model": m, "prompt_id": i, "sample_idx": j, "prompt": results.prompts[i], "continuation": text}
                rec.update({f"toxicity:{s}": float(results.scores[m][s][i, j]) for s in results.scorers})
                rec["nll"], rec["num_tokens"] = float(results.nll[m][i, j]), int(results.token_counts[m][i, j])
                rows.append(rec)
    return pd.DataFrame(rows)


def load_results(run_dir: str | Path) -> EvalResults:
    """Read an evaluation back from ``<run_dir>/eval`` (results.json and generations.csv), for plots and tables.

    Raises:
        EvaluationError: no evaluation in that run directory yet, or a damaged ``results.json``.
    """
    import pandas as pd

    eval_dir = RunPaths(Path(run_dir)).eval
    if not (eval_dir / "results.json").is_file():
        raise EvaluationError(
            f"No evaluation in {eval_dir} — run notebooks/2-eval.ipynb first (or `detox-sft evaluate`)."
        )
    summary = read_json_or_none(eval_dir / "results.json")
    if not isinstance(summary, dict):
        raise EvaluationError(
            f"{eval_dir / 'results.json'} is unreadable (truncated?) — run `detox-sft evaluate` (or notebooks/"
            "2-eval.ipynb) again: it reuses the cached generations and rewrites the results."
        )
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
