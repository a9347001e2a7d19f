"""The whole evaluation step: generate, score and summarise every model on the same prompts, resumably."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detox_sft.config import ARMS, Recipe, RunPaths
from detox_sft.data import load_eval_prompts
from detox_sft.devices import resolve_device
from detox_sft.evaluation import generation, on_ray, report
from detox_sft.evaluation.generation import EvaluationError
from detox_sft.evaluation.report import MODELS, EvalResults
from detox_sft.files import atomic_write_json, atomic_write_text, read_json_or_none
from detox_sft.prompts import generation_prompt
from detox_sft.refs import resolve_ref
from detox_sft.toxicity import load_scorers


def evaluate_models(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    models: Sequence[str] = MODELS,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
) -> EvalResults:
    """Generate with each of ``models`` on the same eval prompts (default: the recipe's), score, and write the metrics
    to ``<run_dir>/eval`` and ``figures``; generations are cached per model, so a rerun only scores and re-plots.
    ``evaluation.nontoxic_prompts`` adds that many label-0 prompts (results.json's ``nontoxic`` key).

    Raises:
        EvaluationError: unknown model name, missing adapter, no prompts (ScorerError: a scorer cannot be loaded).
    """
    from tqdm.auto import tqdm

    started, cfg = time.perf_counter(), recipe.evaluation
    run = _Run(recipe, Path(run_dir) if run_dir is not None else recipe.run_path, progress)
    requested = [models] if isinstance(models, str) else list(models)
    run.models = [m for m in MODELS if m in requested]  # checked before any expensive work
    if not run.models or set(requested) - set(MODELS):
        raise EvaluationError(f"models must be some of {', '.join(MODELS)}; got {requested}")
    if missing := [m for m in run.models if m in ARMS and not RunPaths(run.run_dir).adapter_config(m).is_file()]:
        raise EvaluationError(
            f"No adapter in {RunPaths(run.run_dir).adapter(missing[0])} — run notebooks/1-sft.ipynb first (or "
            f"`detox-sft train`) to train the {missing[0]!r} arm."
        )
    steps = 3 * len(run.models) * (2 if cfg.nontoxic_prompts else 1)  # generate, score, perplexity; on Ray a bar each
    with tqdm(total=steps, desc="evaluate", unit="step", disable=not progress or cfg.executor == "ray") as run.bar:
        run.bar.set_postfix_str("load scorers")
        batch_size = on_ray.scorer_batch_size(cfg)
        run.scorers = load_scorers(cfg.scorers, run.device, batch_size, revisions=cfg.scorer_revisions)
        results, timing = run.evaluate(_eval_prompts(recipe, prompts), "")
        info = {"recipe": recipe.name, "profile": recipe.profile, "base_model": recipe.training.base_model}
        info["perplexity_model"] = cfg.perplexity_model or recipe.training.base_model
        self_judged = self_judged_models(recipe)
        timing["total_s"] = round(time.perf_counter() - started, 2)
        results.summary = report._summarize(results, cfg, recipe.seed, {**info, "timing": timing}, self_judged)
        if cfg.nontoxic_prompts:  # a separate key and file: the toxic-prompt results stay as they are without it
            started = time.perf_counter()
            data = dataclasses.replace(recipe.data, eval_label=0, num_eval_prompts=cfg.nontoxic_prompts)
            nontoxic, timing = run.evaluate(_eval_prompts(dataclasses.replace(recipe, data=data), None), "_nontoxic")
            timing["total_s"] = round(time.perf_counter() - started, 2)
            extra = {"eval_label": 0, "timing": timing}
            results.summary["nontoxic"] = report._summarize(nontoxic, cfg, recipe.seed, extra, self_judged)
            atomic_write_text(run.eval_dir / "generations_nontoxic.csv", _frame(nontoxic).to_csv(index=False))
        run.bar.set_postfix_str("done")
    atomic_write_text(run.eval_dir / "generations.csv", _frame(results).to_csv(index=False))
    atomic_write_text(run.eval_dir / "summary.md", report.summary_markdown(results))
    figures = RunPaths(run.run_dir).figures
    figures.mkdir(parents=True, exist_ok=True)
    plots = {"toxicity_distributions": report.plot_toxicity_distributions, "metric_bars": report.plot_metric_bars}
    for name, plot in plots.items():
        plot(results).savefig(figures / f"eval_{name}.png", dpi=120, bbox_inches="tight")
    atomic_write_json(run.eval_dir / "results.json", results.summary, indent=2)  # last: what load_results trusts
    return results


def self_judged_models(recipe: Recipe) -> list[str]:
    """The models judged by themselves (no perplexity): ``["base"]`` unless the recipe names a separate judge."""
    cfg, training = recipe.evaluation, recipe.training
    if not cfg.perplexity_model:
        return ["base"]
    same = resolve_ref(cfg.perplexity_model) == resolve_ref(training.base_model)
    return ["base"] if same and cfg.perplexity_model_revision == training.base_model_revision else []


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
class _Run:
    """One evaluation's models on a prompt set at a time; the scorers and the base model stay loaded between sets."""

    recipe: Recipe
    run_dir: Path
    progress: bool
    models: list[str] = dataclasses.field(default_factory=list)
    bar: Any = None
    scorers: dict[str, Any] = dataclasses.field(default_factory=dict)
    base: tuple[Any, Any] | None = None  # the base model and tokenizer, once loaded

    def __post_init__(self) -> None:
        self.device = resolve_device(self.recipe.evaluation.device, "evaluation.device")
        self.eval_dir = RunPaths(self.run_dir).eval

    def evaluate(self, prompts: list[str], tag: str) -> tuple[EvalResults, dict[str, float]]:
        """Generate (or read back), score and measure perplexity on ``prompts``."""
        cfg, recipe, where = self.recipe.evaluation, self.recipe, " (non-toxic)" if tag else ""
        # what the models are given: the prompts in the training template (the arms were tuned on it), or as they are
        inputs = [generation_prompt(p) for p in prompts] if cfg.prompt_template else list(prompts)
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        timing: dict[str, float] = {}
        generations = {m: self._generate(m, inputs, tag, where, timing) for m in self.models}
        results = EvalResults(prompts, self.models, list(cfg.scorers), generations, {})
        t0 = time.perf_counter()
        if cfg.executor == "ray":  # the same calls, on actor pools: the same numbers
            scored = on_ray.score_on_ray(recipe, generations, inputs, self.progress)
            results.scores, results.nll, results.token_counts = scored
        else:
            ppl = self._model("the perplexity model")
            for m, gens in generations.items():
                on_batch = self._on_batch(f"score and perplexity {m}{where}")
                scored = generation.score_continuations(self.scorers, ppl, inputs, gens, cfg.batch_size, on_batch)
                results.scores[m], results.nll[m], results.token_counts[m] = scored
                self.bar.update(2)
        timing["score_and_perplexity_s"] = round(time.perf_counter() - t0, 2)
        return results, timing

    def _model(self, name: str) -> tuple[Any, Any]:
        """An arm (merged), the perplexity model when the recipe names one, else the base model (loaded once)."""
        self.bar.set_postfix_str(f"load {name}")
        if name in ARMS:
            return generation.load_arm_model(self.recipe, self.run_dir, name, self.device)
        if name != "base" and self.recipe.evaluation.perplexity_model:
            return generation.load_perplexity_model(self.recipe, self.device)
        if self.base is None:
            training = self.recipe.training
            self.base = generation.load_base_model(training.base_model, self.device, training.base_model_revision)
        return self.base

    def _on_batch(self, label: str) -> Any:
        """Show ``label`` in the bar now, and an ``on_batch`` that adds ``done/total``."""
        self.bar.set_postfix_str(label)
        return lambda done, total: self.bar.set_postfix_str(f"{label} {done}/{total}")

    def _generate(self, name: str, inputs: list[str], tag: str, where: str, timing: dict[str, float]) -> Any:
        """Model ``name``'s continuations, read from its cache when the key matches, else generated and cached."""
        cfg, seed = self.recipe.evaluation, self.recipe.seed
        key = {k: getattr(cfg, k) for k in ("num_samples", "max_new_tokens", "top_p", "temperature")}
        key |= {"prompts": hashlib.sha256("\x1e".join(inputs).encode()).hexdigest(), "seed": seed}
        key["model"] = generation._model_signature(self.recipe, self.run_dir, name)
        key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache = self.eval_dir / f"generations_{name}{tag}.json"
        cached = read_json_or_none(cache) if cache.is_file() else {"generations": []}
        if not isinstance(cached, dict) or not isinstance(cached.get("generations"), list):
            warnings.warn(f"{cache} is unreadable (truncated?); generating again", UserWarning, stacklevel=3)
        elif cached.get("key") == key:
            self.bar.update()
            return cached["generations"]
        t0 = time.perf_counter()
        if cfg.executor == "ray":
            work_dir = self.eval_dir / "ray-blocks"
            texts = on_ray.generate_on_ray(self.recipe, self.run_dir, name, inputs, work_dir, key, self.progress)
        else:
            model, tok = self._model(name)
            on_batch = self._on_batch(f"generate {name}{where}")
            texts = generation.generate_continuations(model, tok, inputs, cfg, seed, progress=False, on_batch=on_batch)
            del model  # an arm is freed before the next one loads; the base model stays for the perplexity
        timing[f"generate_{name}_s"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(cache, {"key": key, "model": name, "generations": texts})
        self.bar.update()
        return texts


def _frame(results: EvalResults) -> Any:
    """One row per (model, prompt, sample): the continuation, its toxicity under each scorer, its NLL."""
    import pandas as pd

    return pd.DataFrame(
        {"model": m, "prompt_id": i, "sample_idx": j, "prompt": results.prompts[i], "continuation": text}
        | {f"toxicity:{s}": float(results.scores[m][s][i, j]) for s in results.scorers}
        | {"nll": float(results.nll[m][i, j]), "num_tokens": int(results.token_counts[m][i, j])}
        for m in results.models
        for i, row in enumerate(results.generations[m])
        for j, text in enumerate(row)
    )


def load_results(run_dir: str | Path) -> EvalResults:
    """Read an evaluation back from ``<run_dir>/eval``, for plots and tables.

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
    return EvalResults(prompts, models, scorers, gens, scores, nll, counts, summary)
