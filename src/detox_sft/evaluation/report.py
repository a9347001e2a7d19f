"""The results of an evaluation: tables with intervals, the reading in words, the figures."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detox_sft.config import ARMS, EvaluationConfig
from detox_sft.evaluation import metrics

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


logger = logging.getLogger(__name__)

MODELS = ("base", *ARMS)
# (a, b): the difference a - b is reported, paired by prompt
COMPARISONS = (("detox", "raw"), ("raw", "base"), ("detox", "base"))
_COLORS = {"base": "#7f7f7f", "raw": "#d95f02", "detox": "#1b9e77"}  # the same in every figure
_METRIC_LABELS = {"mean_toxicity": "mean toxicity", "expected_max_toxicity": "EMT", "toxicity_probability": "TP"}


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
    agreement = _agreement(results, cfg.toxic_threshold)
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
                "interval": metrics.BOOTSTRAP_METHOD,  # scipy.stats.bootstrap's method
            },
            "metrics": per_model,
            "comparisons": comparisons,
            "agreement": agreement,
            **(extra or {}),
        }
    )


def _agreement(results: EvalResults, threshold: float) -> list[dict[str, Any]]:
    """Every pair of scorers on the same continuations: all models pooled, and each model's alone."""
    pairs = []
    for i, a in enumerate(results.scorers):
        for b in results.scorers[i + 1 :]:
            pooled = metrics.scorer_agreement(
                np.concatenate([results.scores[m][a].ravel() for m in results.models]),
                np.concatenate([results.scores[m][b].ravel() for m in results.models]),
                threshold,
            )
            by_model = {
                m: metrics.scorer_agreement(results.scores[m][a], results.scores[m][b], threshold)
                for m in results.models
            }
            pairs.append({"scorers": [a, b], **pooled, "by_model": by_model})
    return pairs


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


def agreement_table(results: EvalResults | dict[str, Any]) -> pd.DataFrame:
    """One row per (pair of scorers, models): Spearman's rank correlation and agreement at the toxic threshold.

    ``models`` is ``all`` for every model's continuations pooled, else one model's. Agreement is the share of the
    continuations that both scorers put on the same side of the threshold.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
    """
    import pandas as pd

    summary = results.summary if isinstance(results, EvalResults) else results
    rows = []
    for pair in summary.get("agreement", []):
        a, b = pair["scorers"]
        for models, entry in [("all", pair), *pair["by_model"].items()]:
            rows.append(
                {
                    "scorer_a": a,
                    "scorer_b": b,
                    "models": models,
                    "continuations": entry["continuations"],
                    "spearman": entry["spearman"],
                    "agreement": entry["agreement"],
                }
            )
    return pd.DataFrame(rows, columns=["scorer_a", "scorer_b", "models", "continuations", "spearman", "agreement"])


def metrics_table(results: EvalResults | dict[str, Any], scorer: str | None = None) -> pd.DataFrame:
    """The table a person reads: one row per model, each metric as ``value [low, high]`` (95% bootstrap interval).

    Columns: EMT, TP and mean toxicity under ``scorer``, then perplexity and distinct-2 (the same for every scorer).
    :func:`results_table` has the same numbers as floats.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
        scorer: which scorer's toxicity (default: the headline one).
    """
    import pandas as pd

    s = results.summary if isinstance(results, EvalResults) else results
    scorer = scorer or s["headline_scorer"]
    rows = {}
    for model in s["models"]:
        entry = s["metrics"][model]
        tox = entry["toxicity"][scorer]
        row = {_METRIC_LABELS[k]: _fmt(tox[k]) for k in ("expected_max_toxicity", "toxicity_probability")}
        row["mean toxicity"] = _fmt(tox["mean_toxicity"])
        row["perplexity"] = _fmt(entry.get("perplexity"), 1)
        row["distinct-2"] = "n/a" if entry.get("distinct_2") is None else f"{entry['distinct_2']:.3f}"
        rows[model] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = f"model (scorer: {scorer})"
    return table


def scorer_table(results: EvalResults | dict[str, Any]) -> pd.DataFrame:
    """Every scorer's reading of the same continuations: one row per (scorer, model), EMT / TP / mean toxicity as
    ``value [low, high]``, the headline scorer first; beside them the paired detox - raw EMT difference.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
    """
    import pandas as pd

    s = results.summary if isinstance(results, EvalResults) else results
    rows = []
    for scorer in s["scorers"]:
        diff = ((s.get("comparisons") or {}).get("detox_vs_raw") or {}).get(scorer, {}).get("expected_max_toxicity")
        for model in s["models"]:
            tox = s["metrics"][model]["toxicity"][scorer]
            rows.append(
                {
                    "scorer": scorer + (" (headline)" if scorer == s["headline_scorer"] else ""),
                    "model": model,
                    "EMT": _fmt(tox["expected_max_toxicity"]),
                    "TP": _fmt(tox["toxicity_probability"]),
                    "mean toxicity": _fmt(tox["mean_toxicity"]),
                    "detox - raw EMT (paired)": _fmt_difference("", diff).strip() if diff and model == "detox" else "",
                }
            )
    return pd.DataFrame(rows).set_index(["scorer", "model"])


def paired_table(results: EvalResults | dict[str, Any], scorer: str | None = None) -> pd.DataFrame:
    """The paired differences ``a - b`` as a person reads them: one row per comparison, each metric as
    ``+0.012 [-0.030, +0.055]``, marked ``*`` when the interval excludes zero.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
        scorer: which scorer (default: the headline one).
    """
    import pandas as pd

    s = results.summary if isinstance(results, EvalResults) else results
    scorer = scorer or s["headline_scorer"]
    rows = {}
    for key, by_scorer in (s.get("comparisons") or {}).items():
        rows[key.replace("_vs_", " - ")] = {
            _METRIC_LABELS[metric]: _fmt_difference("", d).strip() + (" *" if d["excludes_zero"] else "")
            for metric in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity")
            for d in [by_scorer[scorer][metric]]
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = f"paired difference (scorer: {scorer}; * excludes 0)"
    return table


def _fmt_difference(label: str, d: dict[str, Any]) -> str:
    return f"{label} {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def headline_numbers(results: EvalResults | dict[str, Any], comparison: str = "detox_vs_raw") -> dict[str, str]:
    """The numbers a README quotes, formatted as it quotes them, under the headline scorer.

    Returns:
        ``{"detox - raw EMT": "EMT -0.180 [-0.242, -0.120]", ... , "raw EMT": "0.904 [0.870, 0.939]", ...}``: the
        paired differences of ``comparison`` (EMT, TP, mean toxicity), then each model's value [interval].

    Args:
        results: an :class:`EvalResults` or the results.json dict.
        comparison: the key of ``summary["comparisons"]`` to quote.
    """
    s = results.summary if isinstance(results, EvalResults) else results
    scorer = s["headline_scorer"]
    out = {}
    diffs = s["comparisons"][comparison][scorer]
    for metric in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
        label = _METRIC_LABELS[metric]
        out[f"{comparison.replace('_vs_', ' - ')} {label}"] = _fmt_difference(label, diffs[metric])
    for model in s["models"]:
        for metric in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
            out[f"{model} {_METRIC_LABELS[metric]}"] = _fmt(s["metrics"][model]["toxicity"][scorer][metric])
    return out


def describe_result(results: EvalResults | dict[str, Any], scorer: str | None = None, markdown: bool = False) -> str:
    """A paragraph that reads the result from the numbers, saying whether the intervals exclude zero.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
        scorer: which scorer to read (default: the headline one).
        markdown: the same sentences as Markdown: the first as a lead, then one bullet per model and per comparison,
            each verdict in bold (for a notebook's ``IPython.display.Markdown`` or an HTML report).
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
        if markdown:
            verdict = f"**{verdict}**"
        parts.append(
            f"{a} minus {b} (paired by prompt): EMT {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]; {verdict}; "
            f"TP {tp['value']:+.3f} [{tp['low']:+.3f}, {tp['high']:+.3f}]"
            f"{' (excludes zero)' if tp['excludes_zero'] else ' (includes zero)'}."
        )
    if s["num_prompts"] < 100:
        parts.append(f"With only {s['num_prompts']} prompts the intervals are wide; more prompts narrow them.")
    if markdown:
        return parts[0] + "\n\n" + "\n".join(f"- {part}" for part in parts[1:])
    return " ".join(parts)


def summary_markdown(results: EvalResults | dict[str, Any]) -> str:
    """The short markdown report written to eval/summary.md: a table per scorer, the paired differences, a reading."""
    s = results.summary if isinstance(results, EvalResults) else results
    lines = [
        "# Toxicity evaluation",
        "",
        f"{s['num_prompts']} prompts x {s['num_samples']} continuations (top_p {s['config']['top_p']}, "
        f"{s['config']['max_new_tokens']} new tokens, seed {s['seed']}); value [95% "
        f"{s['config'].get('interval', 'percentile')} bootstrap interval].",
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
    if s.get("agreement"):
        lines += [
            "## Scorer agreement",
            "",
            f"On the same continuations (all models): Spearman's rank correlation, and the share that both scorers put "
            f"on the same side of {s['config']['toxic_threshold']}.",
            "",
            "| scorers | continuations | Spearman | agreement |",
            "|---|---|---|---|",
        ]
        for pair in s["agreement"]:
            rho = "n/a" if pair["spearman"] is None else f"{pair['spearman']:.3f}"
            lines.append(
                f"| {' vs '.join(pair['scorers'])} | {pair['continuations']} | {rho} | {pair['agreement']:.3f} |"
            )
        lines.append("")
    lines += _cost_markdown(s)
    lines += ["## Reading", "", describe_result(s), ""]
    return "\n".join(lines)


def cost_table(results: EvalResults | dict[str, Any], scorer: str | None = None) -> pd.DataFrame:
    """What detoxifying costs beside what it gains: every model on the toxic prompts and on the non-toxic ones.

    One row per (prompts, model), ``prompts`` being ``toxic`` (the headline evaluation) or ``non-toxic``
    (``evaluation.nontoxic_prompts`` label-0 prompts, same sampling): toxicity under ``scorer`` with interval ends,
    perplexity and distinct-1/2/3, as in :func:`results_table`. The paired differences on the non-toxic prompts are
    ``differences_table(results.summary["nontoxic"])``.

    Args:
        results: an :class:`EvalResults` or the results.json dict.
        scorer: which scorer's toxicity (default: the headline one).

    Raises:
        ValueError: the evaluation ran without non-toxic prompts.
    """
    import pandas as pd

    s = results.summary if isinstance(results, EvalResults) else results
    if not s.get("nontoxic"):
        raise ValueError(
            "these results have no non-toxic evaluation. Fix: set evaluation.nontoxic_prompts (e.g. 100) and run "
            "the evaluation again (it reuses the cached generations of the toxic prompts)."
        )
    scorer = scorer or s["headline_scorer"]
    frames = []
    for label, part in (("toxic", s), ("non-toxic", s["nontoxic"])):
        table = results_table(part)
        table = table[table["scorer"] == scorer].drop(columns="scorer")
        table.insert(0, "prompts", label)
        table.insert(1, "num_prompts", part["num_prompts"])
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def _cost_markdown(s: dict[str, Any]) -> list[str]:
    """summary.md's section on the non-toxic prompts (none without them)."""
    nontoxic = s.get("nontoxic")
    if not nontoxic:
        return []
    scorer = s["headline_scorer"]
    lines = [
        "## What detoxifying costs: non-toxic prompts",
        "",
        f"The same models and sampling on {nontoxic['num_prompts']} non-toxic prompts (label 0), scored by {scorer}.",
        "",
        "| model | mean toxicity | EMT | perplexity | distinct-2 |",
        "|---|---|---|---|---|",
    ]
    for model in nontoxic["models"]:
        e = nontoxic["metrics"][model]
        t = e["toxicity"][scorer]
        d2 = e["distinct_2"]
        lines.append(
            f"| {model} | {_fmt(t['mean_toxicity'])} | {_fmt(t['expected_max_toxicity'])} | "
            f"{_fmt(e.get('perplexity'), 1)} | {'n/a' if d2 is None else f'{d2:.3f}'} |"
        )
    if "detox_vs_raw" in nontoxic["comparisons"]:
        d = nontoxic["comparisons"]["detox_vs_raw"][scorer]["mean_toxicity"]
        lines += ["", _fmt_difference("detox - raw, mean toxicity (paired):", d) + "."]
    return [*lines, ""]


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
