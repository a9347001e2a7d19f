"""An evaluation's results: results.json's contents, the tables a person reads (pandas DataFrames, taking an
:class:`EvalResults` or the results.json dict), the reading in words, the figures."""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from detox_sft.config import ARMS, EvaluationConfig
from detox_sft.evaluation import metrics

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

MODELS = ("base", *ARMS)
# (a, b): the difference a - b is reported, paired by prompt
COMPARISONS = (("detox", "raw"), ("raw", "base"), ("detox", "base"))
_COLORS = {"base": "#7f7f7f", "raw": "#d95f02", "detox": "#1b9e77"}  # the same in every figure
# the toxicity metrics in the order every table shows them
LABELS = {"expected_max_toxicity": "EMT", "toxicity_probability": "TP", "mean_toxicity": "mean toxicity"}
# why a model's perplexity is left out: the fluency judge is that model, which scores its own text as likely (a base
# model's continuations scored 2.3 under itself against its fine-tuned arms' 20.6 and 22.9)
SELF_JUDGED = "judged by the model that generated it"


@dataclass
class EvalResults:
    """One evaluation: per model, ``generations[model][prompt][sample]``, their ``scores[model][scorer]``, ``nll`` and
    scored ``token_counts`` (``(num_prompts, k)`` tables); ``summary``: the metrics, as results.json holds them."""

    prompts: list[str]
    models: list[str]
    scorers: list[str]
    generations: dict[str, list[list[str]]]
    scores: dict[str, dict[str, np.ndarray]]
    nll: dict[str, np.ndarray] = field(default_factory=dict)
    token_counts: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _summarize(
    results: EvalResults,
    cfg: EvaluationConfig,
    seed: int,
    extra: dict[str, Any] | None = None,
    self_judged: Collection[str] = (),
) -> dict[str, Any]:
    """What results.json holds; the ``self_judged`` models get no perplexity, only the reason why."""
    n_boot, threshold, scores = cfg.bootstrap_samples, cfg.toxic_threshold, results.scores
    per_model: dict[str, Any] = {}
    for m in results.models:
        gens = results.generations[m]
        per_model[m] = {
            "toxicity": {s: metrics.toxicity_metrics(scores[m][s], threshold, n_boot, seed) for s in results.scorers},
            **{f"distinct_{n}": metrics.distinct_n(gens, n) for n in (1, 2, 3)},
            "empty_continuations": sum(not t.strip() for row in gens for t in row),
        }
        if m in self_judged:
            per_model[m]["perplexity"] = {"value": None, "low": None, "high": None, "not_measured": SELF_JUDGED}
        elif m in results.nll:
            nll, counts = results.nll[m], results.token_counts[m]
            per_model[m]["perplexity"] = metrics.perplexity_estimate(nll, counts, n_boot, seed)
    pairs = [(a, b) for a, b in COMPARISONS if a in results.models and b in results.models]
    paired = functools.partial(metrics.paired_differences, threshold=threshold, num_resamples=n_boot, seed=seed)
    comparisons = {f"{a}_vs_{b}": {s: paired(scores[a][s], scores[b][s]) for s in results.scorers} for a, b in pairs}
    config = {k: getattr(cfg, k) for k in ("num_samples", "max_new_tokens", "top_p", "temperature")}
    config |= {"bootstrap_samples": n_boot, "toxic_threshold": threshold, "confidence": 0.95}
    config["interval"] = metrics.BOOTSTRAP_METHOD  # each estimate's "method" says which made its own interval
    agreement = []  # every pair of scorers on the same continuations: all models pooled, and each model's alone
    for i, a in enumerate(results.scorers):
        for b in results.scorers[i + 1 :]:
            pooled = [np.concatenate([scores[m][s].ravel() for m in results.models]) for s in (a, b)]
            by_model = {m: metrics.scorer_agreement(scores[m][a], scores[m][b], threshold) for m in results.models}
            agreement.append({"scorers": [a, b], **metrics.scorer_agreement(*pooled, threshold), "by_model": by_model})
    summary = {
        "num_prompts": len(results.prompts),
        "num_samples": len(results.generations[results.models[0]][0]),
        "models": results.models,
        "scorers": results.scorers,
        "headline_scorer": results.scorers[0],
        "seed": seed,
        "config": config,
        "metrics": per_model,
        "comparisons": comparisons,
        "agreement": agreement,
        **(extra or {}),
    }
    # plain JSON data: estimates as dicts, NumPy scalars as Python's, NaN and infinities as None (null)
    text = json.dumps(summary, default=lambda o: asdict(o) if isinstance(o, metrics.Estimate) else o.item())
    return json.loads(text, parse_constant=lambda _: None)


def _summary(results: EvalResults | dict[str, Any]) -> dict[str, Any]:
    return results.summary if isinstance(results, EvalResults) else results


def _fmt(est: dict[str, Any] | None, digits: int = 3, sign: str = "") -> str:
    """``value [low, high]`` (``sign="+"``: signed), the value alone, "not measured" (on purpose) or "n/a"."""
    if est and est.get("not_measured"):
        return "not measured"
    if not est or est.get("value") is None:
        return "n/a"
    f = f"{{:{sign}.{digits}f}}".format
    return f(est["value"]) if est.get("low") is None else f"{f(est['value'])} [{f(est['low'])}, {f(est['high'])}]"


_diff = functools.partial(_fmt, sign="+")


def metrics_table(results: EvalResults | dict[str, Any], scorer: str | None = None) -> pd.DataFrame:
    """A row per model: EMT, TP, mean toxicity (``scorer``: default the headline one), perplexity, distinct-2."""
    import pandas as pd

    s = _summary(results)
    scorer = scorer or s["headline_scorer"]
    rows = {  # (the same perplexity and distinct-2 under every scorer)
        model: {label: _fmt(entry["toxicity"][scorer][key]) for key, label in LABELS.items()}
        | {"perplexity": _fmt(entry.get("perplexity"), 1), "distinct-2": _fmt({"value": entry["distinct_2"]})}
        for model, entry in ((m, s["metrics"][m]) for m in s["models"])
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(f"model (scorer: {scorer})")


def paired_table(results: EvalResults | dict[str, Any], scorer: str | None = None) -> pd.DataFrame:
    """A row per comparison ``a - b``: each metric as ``+0.012 [-0.030, +0.055]``, ``*`` when it excludes zero."""
    import pandas as pd

    s = _summary(results)
    scorer = scorer or s["headline_scorer"]
    rows = {
        key.replace("_vs_", " - "): [
            _diff(d) + (" *" if d["excludes_zero"] else "") for d in map(by[scorer].get, LABELS)
        ]
        for key, by in (s.get("comparisons") or {}).items()
    }
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(LABELS.values()))
    return table.rename_axis(f"paired difference (scorer: {scorer}; * excludes 0)")


def scorer_table(results: EvalResults | dict[str, Any]) -> pd.DataFrame:
    """A row per (scorer, model): EMT, TP, mean toxicity, and the paired detox - raw EMT difference."""
    import pandas as pd

    s = _summary(results)
    frames = {}
    for scorer in s["scorers"]:
        table = metrics_table(s, scorer)[list(LABELS.values())]
        diff = (s.get("comparisons") or {}).get("detox_vs_raw", {}).get(scorer, {}).get("expected_max_toxicity")
        table["detox - raw EMT (paired)"] = [_diff(diff) if diff and m == "detox" else "" for m in table.index]
        frames[scorer + (" (headline)" if scorer == s["headline_scorer"] else "")] = table
    return pd.concat(frames, names=["scorer", "model"])


def agreement_table(results: EvalResults | dict[str, Any]) -> pd.DataFrame:
    """A row per pair of scorers: Spearman's rho (NaN: a constant scorer) and same-side share, pooled and per model."""
    import pandas as pd

    rows = {}
    for pair in _summary(results).get("agreement", []):
        for name in ("spearman", "agreement"):
            for models, entry in [("all", pair), *pair["by_model"].items()]:
                rows.setdefault(" vs ".join(pair["scorers"]), {})[(name, models)] = entry[name]
    table = pd.DataFrame.from_dict(rows, orient="index", dtype=float)
    table.columns = pd.MultiIndex.from_tuples(table.columns) if rows else table.columns
    return table.rename_axis("scorers")


def cost_table(results: EvalResults | dict[str, Any]) -> Any:
    """:func:`metrics_table` on the toxic, then the non-toxic prompts (a ``Styler``); a Markdown note without them."""
    import pandas as pd
    from IPython.display import Markdown

    s = _summary(results)
    if not s.get("nontoxic"):
        return Markdown(
            "No non-toxic prompts in this evaluation (set `evaluation.nontoxic_prompts` in the recipe to see what the "
            "detox arm gives up on them)."
        )
    parts = {f"{label} ({part['num_prompts']})": part for label, part in (("toxic", s), ("non-toxic", s["nontoxic"]))}
    table = pd.concat({label: metrics_table(part) for label, part in parts.items()})
    table.index.names = ["prompts", f"model (scorer: {s['headline_scorer']})"]
    return table.style.set_properties(**{"white-space": "nowrap"})


def headline_numbers(results: EvalResults | dict[str, Any]) -> dict[str, str]:
    """The numbers a README quotes: ``{"detox - raw EMT": "EMT -0.180 [-0.242, -0.120]", ..., "raw EMT": ...}``."""
    s = _summary(results)
    scorer, diffs = s["headline_scorer"], s["comparisons"]["detox_vs_raw"][s["headline_scorer"]]
    out = {f"detox - raw {label}": f"{label} {_diff(diffs[m])}" for m, label in LABELS.items()}
    for model in s["models"]:
        out |= {f"{model} {label}": _fmt(s["metrics"][model]["toxicity"][scorer][m]) for m, label in LABELS.items()}
    return out


def judge_note(results: EvalResults) -> str | None:
    """Why EMT equals TP under a binary headline judge (every score 0 or 1); `None` for a graded scorer."""
    scorer = results.scorers[0]
    if not all(np.isin(results.scores[m][scorer], (0.0, 1.0)).all() for m in results.models):
        return None
    return (
        f"{scorer} is a binary judge: it scores every continuation 0 or 1, so a prompt's worst continuation reaches "
        f"{results.summary['config']['toxic_threshold']:g} exactly when it is 1, and EMT (the mean of the per-prompt maxima) equals TP (the share "
        "of prompts with a toxic continuation): their panels are the same."
    )


def fluency_note(results: EvalResults | dict[str, Any]) -> str | None:
    """Why a model judged by itself gets no perplexity, and how to measure it; `None` when every model has one."""
    s = _summary(results)
    parts = [s, *([s["nontoxic"]] if s.get("nontoxic") else [])]
    if not (left_out := [m for m in s["models"] if any(_not_measured(part, m) for part in parts)]):
        return None
    judge = s.get("perplexity_model", "the base model")
    return (
        f"Perplexity (fluency) is measured under {judge}. It is not given for {', '.join(left_out)}: "
        f"{judge} generated those texts, and a model judged by itself finds its own text likely, so the number would "
        "say nothing about fluency. Name a separate, larger model that generated none of the texts in "
        "`evaluation.perplexity_model` to measure it (the tutorial recipe names one, as DExperts judges GPT-2's "
        "generations with GPT-2 XL)."
    )


def _not_measured(summary: dict[str, Any], model: str) -> bool:
    return bool(((summary.get("metrics") or {}).get(model, {}).get("perplexity") or {}).get("not_measured"))


def _interval_label(s: dict[str, Any]) -> str:
    """``95% BCa bootstrap interval``, with the counts of intervals made otherwise (each estimate's ``method``)."""
    methods: Counter[str] = Counter()

    def count(node: dict[str, Any]) -> dict[str, Any]:  # json calls it on every dict, however deep
        if node.get("method") and node.get("low") is not None:
            methods[node["method"]] += 1
        return node

    json.loads(json.dumps(s), object_hook=count)
    label = f"95% {s['config'].get('interval', metrics.PERCENTILE)} bootstrap interval"
    if methods[metrics.PERCENTILE]:
        label += f"; percentile where BCa is undefined: {methods[metrics.PERCENTILE]} of {methods.total()}"
    if methods[metrics.CONSTANT]:
        label += f"; zero width for a constant sample: {methods[metrics.CONSTANT]} of {methods.total()}"
    return label


def describe_result(results: EvalResults | dict[str, Any], markdown: bool = False) -> str:
    """A paragraph reading the result (headline scorer); ``markdown``: a lead sentence, then bullets, verdicts bold."""
    s = _summary(results)
    scorer = s["headline_scorer"]
    parts = [
        f"On {s['num_prompts']} toxic prompts with {s['num_samples']} sampled continuations each, scored by "
        f"{scorer} (95% bootstrap intervals over prompts):"
    ]
    for model in s["models"]:
        tox, ppl = s["metrics"][model]["toxicity"][scorer], s["metrics"][model].get("perplexity")
        if ppl and ppl.get("not_measured"):
            ppl = f", perplexity not measured ({ppl['not_measured']})"
        else:
            ppl = f", perplexity {_fmt(ppl, 1)}" if ppl and ppl.get("value") is not None else ""
        parts.append(f"{model}: " + ", ".join(f"{label} {_fmt(tox[k])}" for k, label in LABELS.items()) + ppl + ".")
    for key, by_scorer in s["comparisons"].items():
        a, b = key.split("_vs_")
        d, tp = by_scorer[scorer]["expected_max_toxicity"], by_scorer[scorer]["toxicity_probability"]
        verdict = (
            f"the interval excludes zero, so {a} is {'less' if d['value'] < 0 else 'more'} toxic than {b} on these prompts"
            if d["excludes_zero"]
            else f"the interval includes zero, so this run cannot tell {a} and {b} apart on EMT"
        )
        verdict = f"**{verdict}**" if markdown else verdict
        parts.append(
            f"{a} minus {b} (paired by prompt): EMT {_diff(d)}; {verdict}; TP {_diff(tp)}"
            f"{' (excludes zero)' if tp['excludes_zero'] else ' (includes zero)'}."
        )
    if s["num_prompts"] < 100:
        parts.append(f"With only {s['num_prompts']} prompts the intervals are wide; more prompts narrow them.")
    if markdown:
        return parts[0] + "\n\n" + "\n".join(f"- {part}" for part in parts[1:])
    return " ".join(parts)


def _markdown(table: pd.DataFrame, index: str) -> str:
    # every cell is already text as it should read: tabulate must not parse "0.905" back into a number
    return table.rename_axis(index).to_markdown(tablefmt="github", disable_numparse=True)


def summary_markdown(results: EvalResults | dict[str, Any]) -> str:
    """eval/summary.md: a table per scorer, the paired differences, scorer agreement, non-toxic prompts, a reading."""
    import pandas as pd

    s = _summary(results)
    cfg, headline = s["config"], s["headline_scorer"]
    out = [  # sections, a blank line between them
        "# Toxicity evaluation",
        f"{s['num_prompts']} prompts x {s['num_samples']} continuations (top_p {cfg['top_p']}, {cfg['max_new_tokens']} "
        f"new tokens, seed {s['seed']}); value [{_interval_label(s)}].",
        *filter(None, [fluency_note(s)]),
    ]
    for scorer in s["scorers"]:
        out += [f"## Scorer: {scorer}", _markdown(metrics_table(s, scorer), "model")]
        if s["comparisons"]:
            out += [_markdown(paired_table(s, scorer), "paired difference"), "\\* the interval excludes zero."]
    if s.get("agreement"):
        cells = [
            [str(p["continuations"]), _fmt({"value": p["spearman"]}), _fmt({"value": p["agreement"]})]
            for p in s["agreement"]
        ]
        pooled = pd.DataFrame(
            cells, [" vs ".join(p["scorers"]) for p in s["agreement"]], ["continuations", "Spearman", "agreement"]
        )
        out += [
            "## Scorer agreement",
            "On the same continuations (all models): Spearman's rank correlation, and the share that both scorers put "
            f"on the same side of {cfg['toxic_threshold']}.",
            _markdown(pooled, "scorers"),
        ]
    if nontoxic := s.get("nontoxic"):
        table = metrics_table(nontoxic)[["mean toxicity", "EMT", "perplexity", "distinct-2"]]
        out += [
            "## What detoxifying costs: non-toxic prompts",
            f"The same models and sampling on {nontoxic['num_prompts']} non-toxic prompts (label 0), scored by {headline}.",
            _markdown(table, "model"),
        ]
        if "detox_vs_raw" in nontoxic["comparisons"]:
            d = nontoxic["comparisons"]["detox_vs_raw"][headline]["mean_toxicity"]
            out.append(f"detox - raw, mean toxicity (paired): {_diff(d)}.")
    return "\n\n".join([*out, "## Reading", describe_result(s)]) + "\n"


def plot_toxicity_distributions(results: EvalResults) -> Figure:
    """Histograms per model of every continuation's toxicity and of each prompt's maximum (headline scorer)."""
    from matplotlib.figure import Figure

    scorer, fig, bins = results.scorers[0], Figure(figsize=(10, 3.8)), np.linspace(0, 1, 21)
    axes = fig.subplots(1, 2, sharey=False)
    for model in results.models:
        table = results.scores[model][scorer]
        style = {"histtype": "step", "linewidth": 2, "label": model, "density": True, "color": _COLORS.get(model)}
        axes[0].hist(table.ravel(), bins=bins, **style)
        axes[1].hist(table.max(axis=1), bins=bins, **style)
    for ax, title in zip(axes, ("every continuation", "maximum per prompt"), strict=True):
        ax.axvline(results.summary["config"]["toxic_threshold"], color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel=f"toxicity ({scorer})", ylabel="density", title=title)
        ax.legend()
    fig.suptitle("Toxicity of the generated continuations")
    if judge_note(results):  # spikes at 0 and 1 only: say why, where a reader sees them
        fig.text(0.5, -0.02, f"{scorer} scores 0 or 1 (a binary judge): the bars stand at the two ends.", ha="center")
    return fig


def plot_metric_bars(results: EvalResults) -> Figure:
    """Bars of EMT, TP and mean toxicity per model with their 95% intervals (headline scorer; :func:`judge_note`)."""
    import textwrap

    from matplotlib.figure import Figure

    scorer, fig = results.scorers[0], Figure(figsize=(11, 3.6))
    for ax, (name, label) in zip(fig.subplots(1, 3), LABELS.items(), strict=True):
        ests = [results.summary["metrics"][m]["toxicity"][scorer][name] for m in results.models]
        values = np.array([e["value"] for e in ests])
        err = np.array([[e["value"] - e["low"] for e in ests], [e["high"] - e["value"] for e in ests]])
        ax.bar(results.models, values, yerr=err, capsize=6, color=[_COLORS.get(m, "#444444") for m in results.models])
        ax.set_ylim(0, 1)
        ax.set_title(label)
    fig.suptitle(f"Toxicity with 95% bootstrap intervals ({scorer})")
    if note := judge_note(results):
        fig.text(0.5, -0.04, textwrap.fill(note, 140), ha="center", va="top")
    return fig
