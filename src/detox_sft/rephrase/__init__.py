"""Detoxify training samples with TrustyAI TMaRCo (:func:`detoxify_training_set`): gated, batched, cached, resumable.

TMaRCo masks the tokens on which an expert and an anti-expert disagree most (Jensen-Shannon distance over the sentence
mean above ``mask_threshold``) and fills them from ``base + w_anti * anti_expert + w_expert * expert`` logits. Only
samples whose toxicity reaches ``gate_threshold`` are rephrased: the mask threshold is relative, so TMaRCo would
otherwise rewrite clean sentences too.
"""

from detox_sft.rephrase.cache import CacheWriteError, RephraseError
from detox_sft.rephrase.dataset import (
    ADDED_FIELDS,
    RephraseResult,
    RephraseSummary,
    detoxify_training_set,
    rephrase_dataset,
)
from detox_sft.rephrase.display import highlight_html, plot_token_scores, plot_toxicity_histogram
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
    "plot_token_scores",
    "plot_toxicity_histogram",
    "rephrase_dataset",
    "survival_means",
    "survival_table",
]
