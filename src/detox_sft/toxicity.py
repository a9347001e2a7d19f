"""Toxicity scorers: ``load_scorer(name)(texts)`` is a float array of P(toxic), one per text, in order. Names:
``profanity-check`` and ``hatesonar`` (offline classifiers from PyPI), ``zoo:lexicon`` (the offline zoo's exact judge)
or a lexicon JSON path, a hub id or local directory of a sequence classifier."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from detox_sft.compat import hatesonar_session
from detox_sft.devices import resolve_device
from detox_sft.refs import is_hub_ref, resolve_ref, revision_kwargs

OFFLINE_SCORER = "profanity-check"
HATESONAR_SCORER = "hatesonar"
LEXICON_SCORER = "zoo:lexicon"

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
class HateSonarScorer:
    """HateSonar's ONNX classifier (Davidson et al. 2017, offline): toxicity = 1 - P(neither)."""

    name: str = HATESONAR_SCORER
    _session: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            self._session = hatesonar_session()
        except ImportError as exc:
            raise ScorerError(
                f"scorer {HATESONAR_SCORER!r} needs the packages hatesonar and onnxruntime: pip install hatesonar"
            ) from exc

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _clean(texts)
        if not texts:
            return np.zeros(0, dtype=np.float64)
        _, probs = self._session.run(None, {"text": np.array(texts, dtype=object)})
        # classes 0 hate speech, 1 offensive language, 2 neither (hatesonar.Sonar's mapping)
        return np.clip(np.array([1.0 - float(p[2]) for p in probs], dtype=np.float64), 0.0, 1.0)


@dataclass
class LexiconScorer:
    """1.0 when a text holds a whole word or phrase (any case, any spacing) of the JSON ``{"toxic_words": [...]}`` at
    ``path``, else 0.0; ``zoo:lexicon`` is the synthetic corpus's exact judge (its toxic fillers' words)."""

    path: str
    name: str = LEXICON_SCORER
    words: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        try:
            data = json.loads(Path(self.path).read_text())
        except (OSError, ValueError) as exc:
            raise ScorerError(
                f"cannot read the lexicon {self.path!r} ({exc}). Fix: give a JSON file "
                '{"toxic_words": [...]}, or zoo:lexicon.'
            ) from exc
        words = data.get("toxic_words") if isinstance(data, dict) else None
        if not words or not all(isinstance(w, str) and w.split() for w in words):
            raise ScorerError(
                f'lexicon {self.path!r} has no "toxic_words" list of non-empty strings. Fix: write '
                '{"toxic_words": ["idiot", ...]} (the zoo writes zoo:lexicon).'
            )
        self.words = tuple(words)
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in self.words)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _clean(texts)
        return np.array([1.0 if self._pattern.search(t) else 0.0 for t in texts], dtype=np.float64)


@dataclass
class HateSpeechScorer:
    """A text-classification pipeline's P(``toxic_label``) (`None`: the model's first known toxic label); ``name`` is a
    hub id (at ``revision``) or a local path."""

    name: str
    device: str = "cpu"
    batch_size: int = 32
    toxic_label: str | None = "hate"
    max_length: int = 512
    revision: str | None = None

    def __post_init__(self) -> None:
        import torch
        from transformers import pipeline

        self.device = resolve_device(self.device, "the scorer's device")
        if self.name.startswith(("/", "./", "../", "~")) and not Path(self.name).expanduser().exists():
            raise ScorerError(
                f"cannot load scorer {self.name!r}: no such path. Fix: give the directory of a "
                f"sequence classifier, a hub id, or the offline scorer {OFFLINE_SCORER!r}."
            )
        # half precision on a GPU halves memory and time; the pipeline's softmax runs in float32
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self._pipeline = pipeline(
                "text-classification",
                model=self.name,
                top_k=None,
                device=self.device,
                dtype=dtype,
                **revision_kwargs(self.name, self.revision, f"the revision of scorer {self.name}"),
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ScorerError(
                f"cannot load scorer {self.name!r} ({exc}). Fix: give a local path to the classifier, or reach the "
                f"Hugging Face hub, or use the offline scorer {OFFLINE_SCORER!r}."
            ) from exc
        labels = {str(v).lower(): str(v) for v in self._pipeline.model.config.id2label.values()}
        wanted = [self.toxic_label.lower()] if self.toxic_label else list(_TOXIC_LABELS)
        found = [label for label in wanted if label in labels]
        if not found:
            raise ScorerError(
                f"scorer {self.name!r} has labels {sorted(labels)}, not {' or '.join(wanted)}. "
                "Fix: pass toxic_label= one of its labels."
            )
        self.toxic_label = found[0]
        self._label = labels[found[0]]  # as the pipeline names it

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _clean(texts)
        out = np.zeros(len(texts), dtype=np.float64)
        if not texts:
            return out
        order = np.argsort([len(t) for t in texts], kind="stable")
        results = self._pipeline(
            [texts[i] for i in order], batch_size=self.batch_size, truncation=True, max_length=self.max_length
        )
        for i, scores in zip(order, results, strict=True):
            out[i] = next(s["score"] for s in scores if s["label"] == self._label)
        return out


def load_scorer(name: str, device: str = "cpu", batch_size: int = 32, revision: str | None = None) -> Scorer:
    """Load a scorer by name (see the module); ``revision`` pins a hub classifier, ``device``/``batch_size`` apply to it.

    Raises:
        ScorerError: it cannot be loaded, or has a revision but is not a hub classifier.
    """
    local = name in (OFFLINE_SCORER, HATESONAR_SCORER) or (not name.startswith("zoo:") and not is_hub_ref(name))
    if local and revision is not None:
        raise ScorerError(
            f"scorer {name!r} has a revision ({revision}) but is not a hub classifier: a packaged scorer is pinned "
            "by its package's version (requirements.txt), a local one by its files. Fix: remove its revision."
        )
    if name == OFFLINE_SCORER:
        return ProfanityCheckScorer()
    if name == HATESONAR_SCORER:
        return HateSonarScorer()
    given = name
    if name.startswith("zoo:"):
        name = resolve_ref(name)
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    if name.endswith(".json"):
        return LexiconScorer(path=name, name=given)
    return HateSpeechScorer(
        name=name, device=device, batch_size=batch_size, revision=None if given.startswith("zoo:") else revision
    )


def load_scorers(
    names: Sequence[str], device: str = "cpu", batch_size: int = 32, revisions: Mapping[str, str] | None = None
) -> dict[str, Scorer]:
    """Several scorers keyed by name (the first is the headline one); ``revisions`` pins hub classifiers by name."""
    if not names:
        raise ScorerError("no scorer named. Fix: set evaluation.scorers, e.g. [zoo:lexicon, profanity-check].")
    pins = revisions or {}
    return {name: load_scorer(name, device=device, batch_size=batch_size, revision=pins.get(name)) for name in names}
