"""Toxicity scorers: the roberta hate-speech classifier (tutorial) and the offline offensive-language classifier.

Every scorer maps a list of texts to a float array of toxicity probabilities in [0, 1], in order, in batches.
The same scorers are offered through the `evaluate` API by the local measurement module in
``detox_sft/measurements/toxicity`` (see :func:`load_measurement`), which works offline and on transformers 5, unlike
``evaluate.load("toxicity")`` (hub-only, and its script breaks on current pipeline outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "OFFLINE_SCORER",
    "HATE_SPEECH_SCORER",
    "MEASUREMENT_DIR",
    "Scorer",
    "ProfanityCheckScorer",
    "HateSpeechScorer",
    "ScorerError",
    "load_scorer",
    "load_scorers",
    "load_measurement",
]

OFFLINE_SCORER = "profanity-check"
HATE_SPEECH_SCORER = "facebook/roberta-hate-speech-dynabench-r4-target"
MEASUREMENT_DIR = Path(__file__).resolve().parent / "measurements" / "toxicity"

# Labels that mean "toxic" in common classifiers, tried in order when no label is given.
_TOXIC_LABELS = ("hate", "toxic", "toxicity", "offensive", "label_1")


class ScorerError(RuntimeError):
    """A scorer cannot be loaded; the message names the package or path."""


class Scorer(Protocol):
    """Anything that scores texts: ``scorer(texts) -> np.ndarray`` of P(toxic)."""

    name: str

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def _clean(texts: Sequence[Any]) -> list[str]:
    if isinstance(texts, str):  # the 2024 original's bug: a bare string scored character by character
        raise TypeError("score a list of texts, not a bare string: scorer([text])")
    return [t if isinstance(t, str) else "" for t in texts]


def _resolve_device(device: str) -> str:
    from detox_sft.devices import resolve_device

    return resolve_device(device, "the scorer's device", ScorerError)


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
        texts = _clean(texts)
        if not texts:
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self._predict(texts), dtype=np.float64)


@dataclass
class HateSpeechScorer:
    """A sequence classifier whose toxicity is P(label), e.g. facebook/roberta-hate-speech-dynabench-r4-target.

    Attributes:
        name (`str`): hub id or local path of the classifier.
        device (`str`, defaults to ``"cpu"``): ``cpu``, ``cuda`` or ``auto``.
        batch_size (`int`, defaults to 32): texts per forward pass (texts are sorted by length to limit padding).
        toxic_label (`str` or `None`): the label whose probability is the toxicity; `None` picks the first of
            ``hate``, ``toxic``, ``toxicity``, ``offensive``, ``label_1`` that the model has.
        max_length (`int`, defaults to 512): longer texts are truncated.
    """

    name: str
    device: str = "cpu"
    batch_size: int = 32
    toxic_label: str | None = "hate"
    max_length: int = 512

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = _resolve_device(self.device)
        looks_local = self.name.startswith(("/", "./", "../", "~")) or Path(self.name).expanduser().exists()
        if looks_local and not Path(self.name).expanduser().exists():
            raise ScorerError(
                f"cannot load scorer {self.name!r}: no such path. Fix: give the directory of a "
                f"sequence classifier, a hub id, or the offline scorer {OFFLINE_SCORER!r}."
            )
        # half precision on a GPU halves memory and time; the softmax runs in float32 below
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.name)
            self._model = AutoModelForSequenceClassification.from_pretrained(self.name, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ScorerError(
                f"cannot load scorer {self.name!r} ({exc}). Fix: give a local path to the classifier, or reach the "
                f"Hugging Face hub, or use the offline scorer {OFFLINE_SCORER!r}."
            ) from exc
        self._model.to(self.device).eval()
        labels = {str(v).lower(): int(k) for k, v in self._model.config.id2label.items()}
        wanted = [self.toxic_label.lower()] if self.toxic_label else list(_TOXIC_LABELS)
        found = [label for label in wanted if label in labels]
        if not found:
            raise ScorerError(
                f"scorer {self.name!r} has labels {sorted(labels)}, not {' or '.join(wanted)}. "
                "Fix: pass toxic_label= one of its labels."
            )
        self.toxic_label = found[0]
        self._index = labels[found[0]]
        self._torch = torch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _clean(texts)
        out = np.zeros(len(texts), dtype=np.float64)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            enc = self._tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            with self._torch.inference_mode():
                probs = self._model(**enc).logits.float().softmax(-1)[:, self._index]
            out[rows] = probs.cpu().numpy()
        return out


def load_scorer(name: str, device: str = "cpu", batch_size: int = 32) -> Scorer:
    """Load a scorer by name: ``profanity-check`` (offline) or a hub id / local path of a classifier.

    Args:
        name: ``profanity-check``, a hub id (``facebook/roberta-hate-speech-dynabench-r4-target``), a local
            directory, or ``zoo:<name>``.
        device: ``cpu``, ``cuda`` or ``auto`` (classifiers only).
        batch_size: texts per forward pass (classifiers only).

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


def load_scorers(names: Sequence[str], device: str = "cpu", batch_size: int = 32) -> dict[str, Scorer]:
    """Load several scorers, keyed by the names given (the first is the headline scorer by convention).

    Raises:
        ScorerError: one of them cannot be loaded (before any work is done).
    """
    if not names:
        raise ScorerError("no scorer named. Fix: set evaluation.scorers, e.g. [profanity-check].")
    return {name: load_scorer(name, device=device, batch_size=batch_size) for name in names}


def load_measurement(scorer: str = "default", **kwargs: Any):
    """The toxicity scorer as an `evaluate` measurement: ``m.compute(predictions=[...]) -> {"toxicity": [...]}``.

    Args:
        scorer: the measurement's config name: ``default`` (the roberta hate-speech classifier, as on the hub),
            ``profanity-check`` (offline), a hub id or a local path.
        **kwargs: passed to :func:`evaluate.load`.
    """
    import evaluate

    return evaluate.load(str(MEASUREMENT_DIR), config_name=scorer, module_type="measurement", **kwargs)
