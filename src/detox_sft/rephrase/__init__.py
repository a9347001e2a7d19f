"""Detoxify training samples with TrustyAI TMaRCo: gated, batched, cached and resumable.

TMaRCo (MaRCo, Hallinan et al. 2023) scores each token of a sentence by how much an expert (trained on non-toxic
text) and an anti-expert (trained on toxic text) disagree about it when it is masked: the Jensen-Shannon distance
between their mask-filling distributions, divided by the sentence mean. Tokens scoring above ``mask_threshold`` are
masked and then filled left to right with the argmax of ``base + w_anti * anti_expert + w_expert * expert`` logits.
Only samples whose toxicity under the recipe's scorer reaches ``gate_threshold`` are rephrased: the mask threshold is
relative to the sentence mean, so TMaRCo would otherwise rewrite clean sentences too.

The modules, top to bottom (each imports only those below it): :mod:`~detox_sft.rephrase.dataset` (the step:
:func:`detoxify_training_set`, :func:`rephrase_dataset` with its gate), :mod:`~detox_sft.rephrase.engines`
(TrustyAI's engine and the batched one), :mod:`~detox_sft.rephrase.cache` (SQLite, so a rerun resumes); beside
them :mod:`~detox_sft.rephrase.survival` (how much of a sample its rewrite keeps) and
:mod:`~detox_sft.rephrase.display` (what a notebook shows).
"""

from detox_sft.rephrase.cache import CacheWriteError, RephraseError
from detox_sft.rephrase.dataset import (
    ADDED_FIELDS,
    RephraseResult,
    RephraseSummary,
    detoxify_training_set,
    rephrase_dataset,
)
from detox_sft.rephrase.display import highlight_html, plot_toxicity_histogram
from detox_sft.rephrase.engines import (
    BatchedEngine,
    EngineFailed,
    EngineOutput,
    ReferenceEngine,
    load_engine,
)
from detox_sft.rephrase.survival import changed_word_share, chrf, survival_means, survival_table

__all__ = [
    "ADDED_FIELDS",
    "BatchedEngine",
    "CacheWriteError",
    "EngineFailed",
    "EngineOutput",
    "ReferenceEngine",
    "RephraseError",
    "RephraseResult",
    "RephraseSummary",
    "changed_word_share",
    "chrf",
    "detoxify_training_set",
    "highlight_html",
    "load_engine",
    "plot_toxicity_histogram",
    "rephrase_dataset",
    "survival_means",
    "survival_table",
]
