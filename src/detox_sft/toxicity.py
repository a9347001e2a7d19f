"""Toxicity scorers: the roberta hate-speech classifier (tutorial) and the offline offensive-language classifier.

Every scorer maps a list of texts to a float array of toxicity probabilities in [0, 1], in order, in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["OFFLINE_SCORER", "Scorer", "ProfanityCheckScorer", "HateSpeechScorer", "ScorerError", "load_scorer"]

OFFLINE_SCORER = "profanity-check"


class ScorerError(RuntimeError):
    """A scorer cannot be loaded; the message names the package or path."""


class Scorer(Protocol):
    """Anything that scores texts: ``scorer(texts) -> np.ndarray`` of P(toxic)."""

    name: str

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class ProfanityCheckScorer:
    """The offensive-language classifier shipped in the PyPI package alt-profanity-check (a linear SVM, offline)."""

    name: str = OFFLINE_SCORER
    _predict: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            from profanity_check import predict_prob
        except ImportError as exc:
            raise ScorerError(
                "scorer 'profanity-check' needs the package alt-profanity-check: pip install alt-profanity-check"
            ) from exc
        self._predict = predict_prob

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" for t in texts]
        if not texts:
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self._predict(texts), dtype=np.float64)


@dataclass
class HateSpeechScorer:
    """A sequence classifier whose toxicity is P(label), e.g. facebook/roberta-hate-speech-dynabench-r4-target."""

    name: str
    device: str = "cpu"
    batch_size: int = 32
    toxic_label: str = "hate"
    max_length: int = 512

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.name)
            self._model = AutoModelForSequenceClassification.from_pretrained(self.name).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ScorerError(
                f"cannot load scorer {self.name!r} ({exc}). Fix: give a local path to the classifier, or reach the "
                f"Hugging Face hub, or use the offline scorer {OFFLINE_SCORER!r}."
            ) from exc
        labels = {v.lower(): int(k) for k, v in self._model.config.id2label.items()}
        if self.toxic_label not in labels:
            raise ScorerError(f"scorer {self.name!r} has labels {sorted(labels)}, not {self.toxic_label!r}")
        self._index = labels[self.toxic_label]
        self._torch = torch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = [t if isinstance(t, str) else "" for t in texts[start : start + self.batch_size]]
            enc = self._tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt").to(self.device)
            with self._torch.inference_mode():
                probs = self._model(**enc).logits.float().softmax(-1)[:, self._index]
            out.append(probs.cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0, dtype=np.float64)


def load_scorer(name: str, device: str = "cpu", batch_size: int = 32) -> Scorer:
    """Load a scorer by name: ``profanity-check`` (offline) or a hub id / local path of a classifier.

    Raises:
        ScorerError: the package or the model cannot be loaded.
    """
    if name == OFFLINE_SCORER:
        return ProfanityCheckScorer()
    if name.startswith("zoo:"):
        from detox_sft.config import resolve_ref

        name = resolve_ref(name)
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    return HateSpeechScorer(name=name, device=device, batch_size=batch_size)
