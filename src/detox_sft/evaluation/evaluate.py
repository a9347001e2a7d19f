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

from detox_sft.config import Recipe, RunPaths
from detox_sft.data import load_eval_prompts
from detox_sft.devices import resolve_device
from detox_sft.evaluation.generation import (
    EvaluationError,
    _check_adapter,
    _model_signature,
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


def evaluate_models(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    models: Sequence[str] = MODELS,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
) -> EvalResults:
    """Generate with each model on the same eval prompts, score, compute the metrics; write them to ``<run_dir>/eval``
    and ``<run_dir>/figures`` and return them.

    Generations are cached per model in ``eval/generations_<model>.json`` (keyed by prompts, settings, seed and
    weights files), so a rerun only scores and re-plots. With ``evaluation.nontoxic_prompts`` the same models,
    sampling, scorers and metrics run on that many label-0 prompts as well (what the detox arm gives up where there is
    nothing to detoxify): results.json's ``nontoxic`` key, ``generations_nontoxic.csv``.

    Args:
        recipe: the run recipe; ``run_dir`` defaults to ``recipe.run_path`` (the adapters are in its ``adapters``).
        models: any of ``base``, ``raw``, ``detox``.
        prompts: eval prompts instead of ``detox_sft.data.load_eval_prompts(recipe.data, recipe.seed)``.
        progress: one bar for the whole step (a step per model and stage); on Ray, a bar per stage over blocks.

    Raises:
        EvaluationError: unknown model name, missing adapter, no prompts (ScorerError: a scorer cannot be loaded).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    cfg = recipe.evaluation
    run_dir = Path(run_dir) if run_dir is not None else recipe.run_path
    requested = [models] if isinstance(models, str) else list(models)
    models = [m for m in MODELS if m in requested]  # checked before any expensive work
    if not models or set(requested) - set(MODELS):
        raise EvaluationError(f"models must be some of {', '.join(MODELS)}; got {requested}")
    for arm in [m for m in models if m in ARMS]:
        _check_adapter(run_dir, arm)
    device = resolve_device(cfg.device, "evaluation.device")
    step = _Step(recipe, run_dir, models, device, progress)
    # one bar for the step: generate, score and perplexity per model and prompt set; on Ray each stage has its own
    # bar over blocks (detox_sft.scale.map_blocks) and this one stays hidden
    steps = 3 * len(models) * (2 if cfg.nontoxic_prompts else 1)
    with tqdm(total=steps, desc="evaluate", unit="step", disable=not progress or cfg.executor == "ray") as step.bar:
        step.bar.set_postfix_str("load scorers")
        step.scorers = load_scorers(
            cfg.scorers, device=device, batch_size=scorer_batch_size(cfg), revisions=cfg.scorer_revisions
        )
        results, timings = step.run(_eval_prompts(recipe, prompts), "")
        info = {"recipe": recipe.name, "profile": recipe.profile, "base_model": recipe.training.base_model}
        info["perplexity_model"] = cfg.perplexity_model or recipe.training.base_model
        timings["total_s"] = round(time.perf_counter() - started, 2)
        results.summary = _summarize(results, cfg, recipe.seed, {**info, "timing": timings})
        if cfg.nontoxic_prompts:  # a separate key and file: the toxic-prompt results stay as they are without it
            started = time.perf_counter()
            data = dataclasses.replace(recipe.data, eval_label=0, num_eval_prompts=cfg.nontoxic_prompts)
            nontoxic, timings = step.run(_eval_prompts(dataclasses.replace(recipe, data=data), None), "_nontoxic")
            timings["total_s"] = round(time.perf_counter() - started, 2)
            results.summary["nontoxic"] = _summarize(nontoxic, cfg, recipe.seed, {"eval_label": 0, "timing": timings})
            atomic_write_text(step.eval_dir / "generations_nontoxic.csv", _frame(nontoxic).to_csv(index=False))
        step.bar.set_postfix_str("done")
    # results.json last: the completion marker load_results trusts; each file atomically
    atomic_write_text(step.eval_dir / "generations.csv", _frame(results).to_csv(index=False))
    atomic_write_text(step.eval_dir / "summary.md", summary_markdown(results))
    plot_toxicity_distributions(results, path=RunPaths(run_dir).figures / "eval_toxicity_distributions.png")
    plot_metric_bars(results, path=RunPaths(run_dir).figures / "eval_metric_bars.png")
    atomic_write_json(step.eval_dir / "results.json", results.summary, indent=2)
    return results


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


@dataclasses.dataclass
class _Step:
    """One evaluation's models run on a prompt set; the scorers and the base model stay loaded between sets."""

    recipe: Recipe
    run_dir: Path
    models: list[str]
    device: str
    progress: bool
    bar: Any = None
    scorers: dict[str, Any] = dataclasses.field(default_factory=dict)
    base: tuple[Any, Any] | None = None  # the base model and tokenizer, once loaded

    @property
    def eval_dir(self) -> Path:
        return RunPaths(self.run_dir).eval

    def run(self, prompts: list[str], tag: str) -> tuple[EvalResults, dict[str, float]]:
        """Generate (or read back), score and measure perplexity on ``prompts``; caches ``generations_<m><tag>``."""
        cfg, recipe, where = self.recipe.evaluation, self.recipe, " (non-toxic)" if tag else ""
        # what the models are given: the prompts in the training template (the arms were tuned on it), or as they are
        inputs = [generation_prompt(p) for p in prompts] if cfg.prompt_template else list(prompts)
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        generations = {m: self._generate(m, inputs, tag, where, timings) for m in self.models}
        results = EvalResults(prompts, self.models, list(cfg.scorers), generations, {}, run_dir=self.run_dir)
        t0 = time.perf_counter()
        if cfg.executor == "ray":  # the same batches as below, on actor pools: the same numbers
            results.scores, results.nll, results.token_counts = score_on_ray(
                recipe, generations, self.models, inputs, self.progress
            )
            timings["score_and_perplexity_s"] = round(time.perf_counter() - t0, 2)
            return results, timings
        self.bar.set_postfix_str("load the perplexity model")
        ppl = (
            load_base_model(cfg.perplexity_model, self.device, cfg.perplexity_model_revision)
            if cfg.perplexity_model
            else self._base()
        )
        for m in self.models:
            texts = [t for row in generations[m] for t in row]
            self.bar.set_postfix_str(f"score {m}{where}")
            results.scores[m] = {s: scorer(texts).reshape(len(prompts), -1) for s, scorer in self.scorers.items()}
            self.bar.update()
            on_batch = self._on_batch(f"perplexity {m}{where}")
            nll = continuation_nll(*ppl, inputs, generations[m], cfg.batch_size, progress=False, on_batch=on_batch)
            results.nll[m], results.token_counts[m] = nll
            self.bar.update()
        timings["score_and_perplexity_s"] = round(time.perf_counter() - t0, 2)
        return results, timings

    def _base(self) -> tuple[Any, Any]:
        if self.base is None:
            training = self.recipe.training
            self.base = load_base_model(training.base_model, self.device, training.base_model_revision)
        return self.base

    def _on_batch(self, label: str) -> Any:
        """Show ``label`` in the bar's postfix now, and ``label done/total`` after each batch (an ``on_batch``)."""
        self.bar.set_postfix_str(label)
        return lambda done, total: self.bar.set_postfix_str(f"{label} {done}/{total}")

    def _generate(self, name: str, inputs: list[str], tag: str, where: str, timings: dict[str, float]) -> Any:
        """Model ``name``'s continuations, read from its cache when the key matches, else generated and cached."""
        cfg, seed = self.recipe.evaluation, self.recipe.seed
        key = {k: getattr(cfg, k) for k in ("num_samples", "max_new_tokens", "top_p", "temperature")}
        key |= {"prompts": hashlib.sha256("\x1e".join(inputs).encode()).hexdigest(), "seed": seed}
        key["model"] = _model_signature(self.recipe, self.run_dir, name)
        key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache = self.eval_dir / f"generations_{name}{tag}.json"
        cached = read_json_or_none(cache) if cache.is_file() else {"generations": []}
        if not isinstance(cached, dict) or not isinstance(cached.get("generations"), list):
            warnings.warn(f"{cache} is unreadable (truncated?); generating again", UserWarning, stacklevel=3)
        elif cached.get("key") == key:
            logger.info("reusing cached generations of %s from %s", name, cache)
            self.bar.update()
            return cached["generations"]
        t0 = time.perf_counter()
        if cfg.executor == "ray":
            texts = generate_on_ray(
                self.recipe, self.run_dir, name, inputs, self.eval_dir / "ray-blocks", key, self.progress
            )
        else:
            self.bar.set_postfix_str(f"load {name}")
            model, tokenizer = (
                self._base() if name == "base" else load_arm_model(self.recipe, self.run_dir, name, self.device)
            )
            texts = generate_continuations(
                model, tokenizer, inputs, cfg, seed, progress=False, on_batch=self._on_batch(f"generate {name}{where}")
            )
            del model  # an arm is freed before the next one loads; the base model stays for the perplexity
        timings[f"generate_{name}_s"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(cache, {"key": key, "model": name, "generations": texts})
        self.bar.update()
        return texts


def _frame(results: EvalResults) -> Any:
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
