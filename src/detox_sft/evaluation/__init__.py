"""Honest toxicity evaluation of the base model and the two arms (``raw``, ``detox``) on the same toxic prompts.

The protocol is RealToxicityPrompts / DExperts: ``k`` sampled continuations per prompt, only the generated tokens
scored, Expected Maximum Toxicity, Toxicity Probability and mean toxicity with 95% bootstrap intervals over prompts,
paired comparisons on the same prompts, conditional perplexity of the continuations under the base model,
distinct-1/2/3.

Parts: :mod:`~detox_sft.evaluation.generation` (reproducible batched sampling, NLL, the models),
:mod:`~detox_sft.evaluation.metrics` (the statistics), :mod:`~detox_sft.evaluation.report` (tables, reading,
figures), :mod:`~detox_sft.evaluation.on_ray` (the same batches on Ray) and :mod:`~detox_sft.evaluation.evaluate`
(the whole step, resumable: :func:`evaluate_models`).
"""

from detox_sft.evaluation.evaluate import evaluate_models, load_results
from detox_sft.evaluation.generation import (
    EvaluationError,
    continuation_nll,
    generate_continuations,
    load_arm_model,
    load_base_model,
)
from detox_sft.evaluation.report import (
    ARMS,
    COMPARISONS,
    MODELS,
    EvalResults,
    agreement_table,
    cost_table,
    describe_result,
    headline_numbers,
    judge_note,
    metrics_table,
    paired_table,
    plot_metric_bars,
    plot_toxicity_distributions,
    scorer_table,
    summary_markdown,
)

__all__ = [
    "ARMS", "COMPARISONS", "MODELS", "EvalResults", "EvaluationError", "agreement_table", "continuation_nll",
    "cost_table", "describe_result", "evaluate_models", "generate_continuations", "headline_numbers", "judge_note",
    "load_arm_model", "load_base_model", "load_results", "metrics_table", "paired_table", "plot_metric_bars",
    "plot_toxicity_distributions", "scorer_table", "summary_markdown",
]  # fmt: skip
