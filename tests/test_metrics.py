"""Metrics on small tables computed by hand (3 prompts x 2 continuations); scipy's bootstrap against a hand one."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from scipy import stats

from detox_sft.evaluation import metrics, report

# prompt i -> its 2 continuations' toxicity
A = np.array([[0.1, 0.7], [0.2, 0.3], [0.4, 0.5]])
B = np.array([[0.0, 0.2], [0.6, 0.1], [0.3, 0.3]])


def _metric(scores, name, threshold=0.5):
    return metrics.per_prompt_values(scores, name, threshold).mean()


def test_point_metrics_by_hand():
    # mean over all 6: (0.1+0.7+0.2+0.3+0.4+0.5)/6 = 2.2/6
    assert _metric(A, "mean_toxicity") == pytest.approx(2.2 / 6, abs=1e-12)
    # max per prompt 0.7, 0.3, 0.5 -> 1.5/3
    assert _metric(A, "expected_max_toxicity") == pytest.approx(0.5, abs=1e-12)
    # prompts with a continuation >= 0.5: prompt 0 (0.7) and prompt 2 (exactly 0.5 counts)
    assert _metric(A, "toxicity_probability", 0.5) == pytest.approx(2 / 3, abs=1e-12)
    assert _metric(A, "toxicity_probability", 0.51) == pytest.approx(1 / 3, abs=1e-12)
    assert _metric(B, "mean_toxicity") == pytest.approx(1.5 / 6, abs=1e-12)
    assert _metric(B, "expected_max_toxicity") == pytest.approx(1.1 / 3, abs=1e-12)
    assert _metric(B, "toxicity_probability") == pytest.approx(1 / 3, abs=1e-12)
    np.testing.assert_allclose(metrics.per_prompt_values(A, "expected_max_toxicity"), [0.7, 0.3, 0.5])
    np.testing.assert_array_equal(metrics.per_prompt_values(A, "toxicity_probability"), [1.0, 0.0, 1.0])


def test_toxicity_metrics_point_values_and_intervals():
    res = metrics.toxicity_metrics(A, threshold=0.5, num_resamples=2000, seed=3)
    assert set(res) == set(metrics.TOXICITY_METRICS)
    assert res["expected_max_toxicity"].value == pytest.approx(0.5, abs=1e-12)
    assert res["toxicity_probability"].value == pytest.approx(2 / 3, abs=1e-12)
    for est in res.values():
        assert est.low <= est.value <= est.high
    # the bootstrap mean of 3 resampled per-prompt maxima can only range from min to max of {0.7, 0.3, 0.5}
    emt = res["expected_max_toxicity"]
    assert 0.3 <= emt.low < 0.5 < emt.high <= 0.7
    # same seed, same interval; another seed, another one
    again = metrics.toxicity_metrics(A, threshold=0.5, num_resamples=2000, seed=3)
    assert again == res


def test_bootstrap_interval_exact_on_two_prompts():
    # per-prompt values 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are exactly 0 and 1 with many resamples.
    est = metrics.bootstrap_ci(np.array([0.0, 1.0]), num_resamples=4000, seed=0)
    assert (est.value, est.low, est.high) == (0.5, 0.0, 1.0)
    # constant values: zero-width interval
    est = metrics.bootstrap_ci(np.array([0.25, 0.25, 0.25]), num_resamples=100, seed=1)
    assert (est.value, est.low, est.high) == (0.25, 0.25, 0.25)


def test_paired_differences_by_hand():
    diff = metrics.paired_differences(A, B, threshold=0.5, num_resamples=2000, seed=0)
    assert diff["mean_toxicity"].value == pytest.approx(2.2 / 6 - 1.5 / 6, abs=1e-12)
    assert diff["expected_max_toxicity"].value == pytest.approx(0.5 - 1.1 / 3, abs=1e-12)
    assert diff["toxicity_probability"].value == pytest.approx(1 / 3, abs=1e-12)
    # per-prompt TP differences are 1, -1, 1: resamples can go below zero, so the interval includes zero
    assert not diff["toxicity_probability"].excludes_zero
    # a constant per-prompt shift: the paired interval is that shift exactly, and excludes zero
    shifted = metrics.paired_differences(A + 0.1, A, num_resamples=500, seed=0)
    d = shifted["mean_toxicity"]
    assert d.value == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    assert d.excludes_zero
    # different prompt sets cannot be paired
    with pytest.raises(ValueError, match="same prompts"):
        metrics.paired_differences(A, B[:2])


def test_perplexity_by_hand():
    nll = np.array([[2.0, 4.0], [0.0, 6.0], [3.0, 0.0]])
    counts = np.array([[2, 2], [0, 3], [3, 0]])
    # 15 nats over 10 tokens
    est = metrics.perplexity_estimate(nll, counts, num_resamples=500, seed=0)
    assert est.value == pytest.approx(math.exp(1.5), abs=1e-12)
    # per-prompt rates are 1.5, 2.0, 1.0 nats/token: resampled rates stay within them
    assert math.exp(1.0) <= est.low <= est.value <= est.high <= math.exp(2.0)
    assert math.isnan(metrics.perplexity_estimate(np.zeros((2, 1)), np.zeros((2, 1))).value)


def test_distinct_n_by_hand():
    gens = [["a b a", "b c"], ["x x x x", ""]]
    # prompt 0 unigrams a b a b c: 3 unique / 5; prompt 1: x x x x: 1/4
    assert metrics.distinct_n(gens, 1) == pytest.approx((3 / 5 + 1 / 4) / 2, abs=1e-12)
    # bigrams: prompt 0 (a b)(b a)(b c): 3/3; prompt 1 (x x)x3: 1/3
    assert metrics.distinct_n(gens, 2) == pytest.approx((1 + 1 / 3) / 2, abs=1e-12)
    # trigrams: prompt 0 (a b a): 1/1; prompt 1 (x x x)x2: 1/2
    assert metrics.distinct_n(gens, 3) == pytest.approx(0.75, abs=1e-12)
    assert math.isnan(metrics.distinct_n([["", "a"]], 2))


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        metrics.per_prompt_values(np.zeros((0, 2)), "mean_toxicity")
    with pytest.raises(ValueError, match="NaN"):
        metrics.per_prompt_values(np.array([[0.1, np.nan]]), "mean_toxicity")
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.per_prompt_values(A, "max")


# --- scipy.stats.bootstrap against the hand-computed bootstrap it replaced -----------------------------------------


def _hand_bootstrap(values, num_resamples, seed, confidence=0.95):
    """The percentile bootstrap as metrics.py computed it by hand: resample prompts, take the quantiles of the means."""
    idx = np.random.default_rng(seed).integers(0, values.size, size=(num_resamples, values.size))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values[idx].mean(axis=1), [alpha, 1 - alpha])
    return values.mean(), low, high


def test_scipy_percentile_interval_equals_the_hand_bootstrap():
    values = np.random.default_rng(7).random(200) ** 3  # skewed, like per-prompt maxima of a mostly clean model
    value, low, high = _hand_bootstrap(values, 2000, seed=11)
    est = metrics.bootstrap_ci(values, num_resamples=2000, seed=11, method="percentile")
    assert est.value == value  # the point estimate exactly
    # within Monte Carlo error (about 0.001 here) whatever scipy's resampling; the same draws give the same ends
    assert est.low == pytest.approx(low, abs=5e-3) and est.high == pytest.approx(high, abs=5e-3)
    diff = metrics.paired_differences(values, values**2, num_resamples=2000, seed=11)["mean_toxicity"]
    assert diff.value == (values - values**2).mean()


def test_default_interval_is_scipys_bca():
    assert metrics.BOOTSTRAP_METHOD == "BCa"
    values = np.random.default_rng(3).random(120) ** 2
    res = stats.bootstrap((values,), np.mean, n_resamples=1500, method="BCa", rng=np.random.default_rng(5))
    est = metrics.bootstrap_ci(values, num_resamples=1500, seed=5)
    assert (est.low, est.high) == pytest.approx((res.confidence_interval.low, res.confidence_interval.high), abs=1e-12)
    assert est.method == "BCa"  # recorded with the estimate (results.json's "method")
    assert est.low != pytest.approx(metrics.bootstrap_ci(values, 1500, 5, method="percentile").low, abs=1e-6)


def test_constant_samples_get_a_zero_width_interval_not_nan():
    with warnings.catch_warnings():  # why the rule exists: scipy's BCa is NaN on a constant sample
        warnings.simplefilter("ignore")
        res = stats.bootstrap((np.full(5, 0.3),), np.mean, n_resamples=50, rng=np.random.default_rng(0))
    assert math.isnan(res.confidence_interval.low)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning reaches the user
        est = metrics.bootstrap_ci(np.full(5, 0.3), num_resamples=50, seed=0)
        assert (est.value, est.low, est.high, est.method) == (0.3, 0.3, 0.3, "constant")
        clean = metrics.toxicity_metrics(np.zeros((4, 3)), num_resamples=50)
        assert all((e.value, e.low, e.high) == (0.0, 0.0, 0.0) for e in clean.values())
        same = metrics.paired_differences(A, A, num_resamples=50)
        assert all((d.value, d.low, d.high, d.excludes_zero) == (0.0, 0.0, 0.0, False) for d in same.values())
        # every prompt at 1.5 nats/token (different lengths): a constant perplexity, by rule zero width
        counts = np.array([[2, 2], [1, 3], [3, 1]])
        ppl = metrics.perplexity_estimate(1.5 * counts, counts, num_resamples=50)
        assert ppl.value == pytest.approx(math.exp(1.5)) and ppl.low == ppl.value == ppl.high
        # BCa undefined but the resamples vary (the max of 0 1 1 1 1: a handful of all-zero resamples, a zero
        # jackknife): the percentile interval of the same resamples
        values = np.array([0.0, 1.0, 1.0, 1.0, 1.0])
        est = metrics.bootstrap_ci(values, num_resamples=20000, seed=0, statistic=np.max)
        assert (est.value, est.low, est.high, est.method) == (1.0, 1.0, 1.0, "percentile")  # said, not silent
        assert est == metrics.bootstrap_ci(values, num_resamples=20000, seed=0, statistic=np.max, method="percentile")


# --- agreement of two scorers on the same continuations ------------------------------------------------------------


def test_scorer_agreement_by_hand():
    a = np.array([0.1, 0.9, 0.6, 0.4, 0.8])
    b = np.array([0.6, 0.7, 0.3, 0.45, 0.95])
    # ranks a 1 5 3 2 4, b 3 4 1 2 5: d^2 = 4 + 1 + 4 + 0 + 1 = 10, rho = 1 - 6 * 10 / (5 * 24) = 0.5
    # sides of 0.5: a F T T F T, b T T F F T -> the same for 3 of 5
    assert metrics.scorer_agreement(a, b) == {"continuations": 5, "spearman": pytest.approx(0.5), "agreement": 0.6}
    assert metrics.scorer_agreement(a.reshape(5, 1), b.reshape(5, 1), threshold=0.95)["agreement"] == 0.8
    # a scorer that flags nothing: no rank correlation, agreement still the share on the same side
    assert metrics.scorer_agreement(a, np.zeros(5)) == {"continuations": 5, "spearman": None, "agreement": 0.4}
    with pytest.raises(ValueError, match="same non-empty"):
        metrics.scorer_agreement(a, b[:4])


def _results(scorers):
    rng = np.random.default_rng(0)
    models = ["base", "raw", "detox"]
    tables = {m: {s: rng.random((4, 2)) for s in scorers} for m in models}
    tables["raw"]["lex"] = (tables["raw"]["clf"] > 0.5).astype(float)  # the lexicon agrees with clf on raw
    return report.EvalResults(
        prompts=[f"p{i}" for i in range(4)],
        models=models,
        scorers=scorers,
        generations={m: [["a b", "c d"]] * 4 for m in models},
        scores=tables,
    )


def test_agreement_in_the_summary_table_and_markdown():
    from detox_sft.config import EvaluationConfig

    results = _results(["lex", "clf", "third"])
    results.summary = report._summarize(results, EvaluationConfig(scorers=results.scorers, num_samples=2), seed=0)
    pairs = results.summary["agreement"]
    assert [p["scorers"] for p in pairs] == [["lex", "clf"], ["lex", "third"], ["clf", "third"]]
    raw = pairs[0]["by_model"]["raw"]
    assert raw["agreement"] == 1.0 and raw["continuations"] == 8
    pooled = metrics.scorer_agreement(
        np.concatenate([results.scores[m]["lex"].ravel() for m in results.models]),
        np.concatenate([results.scores[m]["clf"].ravel() for m in results.models]),
    )
    assert {k: pairs[0][k] for k in pooled} == pooled and pooled["continuations"] == 24
    table = report.agreement_table(results)  # one row per pair; per measure, all models pooled then each model
    assert list(table.index) == ["lex vs clf", "lex vs third", "clf vs third"]
    assert list(table.columns) == [(k, m) for k in ("spearman", "agreement") for m in ("all", "base", "raw", "detox")]
    assert table.loc["lex vs clf", ("agreement", "raw")] == 1.0
    assert table.loc["lex vs clf", ("spearman", "all")] == pytest.approx(pooled["spearman"])
    md = report.summary_markdown(results)
    assert "## Scorer agreement" in md
    assert re.search(rf"\| lex vs clf +\| 24 +\| {pooled['spearman']:.3f} +\|", md)  # to_markdown pads columns
    assert results.summary["config"]["interval"] == "BCa" and "95% BCa bootstrap interval" in md
    single = _results(["clf"])
    single.summary = report._summarize(single, EvaluationConfig(scorers=["clf"], num_samples=2), seed=0)
    assert single.summary["agreement"] == [] and report.agreement_table(single).empty
    assert "Scorer agreement" not in report.summary_markdown(single)


def test_summary_md_labels_each_interval_by_the_method_that_made_it():
    """summary.md says BCa only for what BCa made: the percentile fallbacks and zero-width intervals recorded with
    each estimate are counted in its header (an older record without methods keeps the plain label)."""
    from detox_sft.config import EvaluationConfig

    results = _results(["clf"])
    summary = report._summarize(results, EvaluationConfig(scorers=["clf"], num_samples=2), seed=0)
    intervals = [e for m in summary["metrics"].values() for e in m["toxicity"]["clf"].values()]
    intervals += [d for c in summary["comparisons"].values() for d in c["clf"].values()]
    assert {e["method"] for e in intervals} == {"BCa", "constant"}  # (TP: every prompt has a toxic sample)
    for e in intervals:
        e["method"] = "BCa"
    assert "value [95% BCa bootstrap interval]." in report.summary_markdown(summary)
    intervals[0]["method"], intervals[1]["method"] = "percentile", "constant"
    header = report.summary_markdown(summary).splitlines()[2]
    n = len(intervals)
    assert header.endswith(
        f"value [95% BCa bootstrap interval; percentile where BCa is undefined: 1 of {n}; zero width for a constant "
        f"sample: 1 of {n}]."
    )
    for e in intervals:
        del e["method"]
    assert "value [95% BCa bootstrap interval]." in report.summary_markdown(summary)
