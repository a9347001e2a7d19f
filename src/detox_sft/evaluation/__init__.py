"""Toxicity evaluation of the base model and the arms on the same prompts, as RealToxicityPrompts / DExperts do:
:func:`evaluate_models` runs the step; the tables and figures read its results."""

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
    MODELS,
    EvalResults,
    agreement_table,
    cost_table,
    describe_result,
    fluency_note,
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
    "ARMS",
    "MODELS",
    "EvalResults",
    "EvaluationError",
    "agreement_table",
    "continuation_nll",
    "cost_table",
    "describe_result",
    "evaluate_models",
    "fluency_note",
    "generate_continuations",
    "headline_numbers",
    "judge_note",
    "load_arm_model",
    "load_base_model",
    "load_results",
    "metrics_table",
    "paired_table",
    "plot_metric_bars",
    "plot_toxicity_distributions",
    "scorer_table",
    "summary_markdown",
]
