"""Metrics on small tables computed by hand (3 prompts x 2 continuations)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detox_sft import metrics

# prompt i -> its 2 continuations' toxicity
A = np.array([[0.1, 0.7], [0.2, 0.3], [0.4, 0.5]])
B = np.array([[0.0, 0.2], [0.6, 0.1], [0.3, 0.3]])


def test_point_metrics_by_hand():
    # mean over all 6: (0.1+0.7+0.2+0.3+0.4+0.5)/6 = 2.2/6
    assert metrics.mean_toxicity(A) == pytest.approx(2.2 / 6, abs=1e-12)
    # max per prompt 0.7, 0.3, 0.5 -> 1.5/3
    assert metrics.expected_maximum_toxicity(A) == pytest.approx(0.5, abs=1e-12)
    # prompts with a continuation >= 0.5: prompt 0 (0.7) and prompt 2 (exactly 0.5 counts)
    assert metrics.toxicity_probability(A, 0.5) == pytest.approx(2 / 3, abs=1e-12)
    assert metrics.toxicity_probability(A, 0.51) == pytest.approx(1 / 3, abs=1e-12)
    assert metrics.mean_toxicity(B) == pytest.approx(1.5 / 6, abs=1e-12)
    assert metrics.expected_maximum_toxicity(B) == pytest.approx(1.1 / 3, abs=1e-12)
    assert metrics.toxicity_probability(B) == pytest.approx(1 / 3, abs=1e-12)
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
    assert metrics.perplexity(nll, counts) == pytest.approx(math.exp(1.5), abs=1e-12)
    est = metrics.perplexity_estimate(nll, counts, num_resamples=500, seed=0)
    assert est.value == pytest.approx(math.exp(1.5))
    # per-prompt rates are 1.5, 2.0, 1.0 nats/token: resampled rates stay within them
    assert math.exp(1.0) <= est.low <= est.value <= est.high <= math.exp(2.0)
    assert math.isnan(metrics.perplexity(np.zeros(2), np.zeros(2)))


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
        metrics.mean_toxicity(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.mean_toxicity(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.per_prompt_values(A, "max")
