"""Detoxify training samples with TrustyAI TMaRCo: gated, batched, cached and resumable.

TMaRCo (MaRCo, Hallinan et al. 2023) scores each token of a sentence by how much an expert (trained on non-toxic
text) and an anti-expert (trained on toxic text) disagree about it when it is masked: the Jensen-Shannon distance
between their mask-filling distributions, divided by the sentence mean. Tokens scoring above ``mask_threshold`` are
masked and then filled left to right with the argmax of ``base + w_anti * anti_expert + w_expert * expert`` logits.

Parts: :mod:`~detox_sft.rephrase.engines` (TrustyAI's reference engine and the batched one, which gives the same
texts many sentences at a time), :mod:`~detox_sft.rephrase.cache` (SQLite, so a rerun resumes),
:mod:`~detox_sft.rephrase.dataset` (the toxicity gate, :func:`rephrase_dataset`, and :func:`detoxify_training_set`
for the detox arm), :mod:`~detox_sft.rephrase.survival` (how much of a sample its rewrite keeps: chrF, changed
words) and :mod:`~detox_sft.rephrase.display` (what a notebook shows).

Only samples whose toxicity under the recipe's scorer reaches ``gate_threshold`` are rephrased: the mask threshold is
relative to the sentence mean, so TMaRCo would otherwise rewrite clean sentences too.
"""

from detox_sft.rephrase.cache import CacheWriteError
from detox_sft.rephrase.dataset import (
    ADDED_FIELDS,
    RephraseResult,
    RephraseSummary,
    continuation_of,
    detoxify_training_set,
    rephrase_dataset,
)
from detox_sft.rephrase.display import highlight_html, plot_toxicity_histogram
from detox_sft.rephrase.engines import (
    BatchedEngine,
    EngineFailed,
    EngineOutput,
    ReferenceEngine,
    RephraseError,
    TMaRCoEngine,
    load_engine,
    models_fingerprint,
    resolve_device,
)
from detox_sft.rephrase.survival import changed_word_share, chrf, survival_means, survival_table

__all__ = [
    "ADDED_FIELDS",
    "BatchedEngine",
    "CacheWriteError",
    "EngineOutput",
    "ReferenceEngine",
    "EngineFailed",
    "RephraseError",
    "RephraseResult",
    "RephraseSummary",
    "TMaRCoEngine",
    "changed_word_share",
    "chrf",
    "continuation_of",
    "detoxify_training_set",
    "highlight_html",
    "load_engine",
    "models_fingerprint",
    "plot_toxicity_histogram",
    "rephrase_dataset",
    "resolve_device",
    "survival_means",
    "survival_table",
]
