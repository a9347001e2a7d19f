"""How much of a text survives its rephrasing: the cost of detoxifying, to show beside the gain.

Two views of one rewrite, both per sample and averaged over the rephrased samples:

* chrF (sacrebleu's character n-gram F-score, 0-100) of the rephrased text against the original: 100 is unchanged,
  and a rewrite of one word in a sentence of twenty keeps it in the 80s-90s;
* the share of the original's words that the rephrased text does not keep (replaced or deleted), with the two word
  sequences aligned by :class:`difflib.SequenceMatcher`.

``survival_table(cfg.paths.train_set("detox"))`` is what a notebook shows; :class:`RephraseSummary` carries the
means (``mean_chrf``, ``mean_changed_word_share``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from detox_sft.data import read_jsonl

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["chrf", "changed_word_share", "survival_means", "survival_table"]


@cache
def _chrf_metric() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()  # sacrebleu's defaults: character 6-grams, beta 2, no word n-grams


def chrf(original: str, rephrased: str) -> float:
    """sacrebleu's sentence chrF (0-100) of ``rephrased`` with ``original`` as the reference."""
    return float(_chrf_metric().sentence_score(rephrased, [original]).score)


def changed_word_share(original: str, rephrased: str) -> float:
    """The share of ``original``'s words (split on whitespace) that ``rephrased`` does not keep, in [0, 1].

    The words are aligned by difflib (longest matching blocks, no junk heuristic); a kept word is one inside a
    matching block. An empty original changes nothing (0.0).
    """
    before, after = original.split(), rephrased.split()
    if not before:
        return 0.0
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    kept = sum(block.size for block in matcher.get_matching_blocks())
    return 1.0 - kept / len(before)


def _pair(record: dict[str, Any], field: str) -> tuple[str, str] | None:
    """(original, rephrased) of a record TMaRCo changed, else `None`.

    ``field="continuation"`` reads the training set's ``original_continuation`` and ``continuation`` (the part the
    detox arm learns); any other field is compared with ``rephrased_text``.
    """
    original, rephrased = (
        ("original_continuation", "continuation") if field == "continuation" else (field, "rephrased_text")
    )
    if not record.get("rephrased"):
        return None
    a, b = record.get(original), record.get(rephrased)
    return (a, b) if isinstance(a, str) and isinstance(b, str) else None


def _pairs(records: Sequence[dict[str, Any]], field: str) -> list[tuple[str, str]]:
    return [pair for r in records if (pair := _pair(r, field)) is not None]


def survival_means(
    records: Sequence[dict[str, Any]] | str | os.PathLike[str], field: str = "text"
) -> dict[str, float | None]:
    """Mean chrF and mean changed-word share over the records TMaRCo rephrased (`None` when none was).

    Args:
        records: rephrased records (:attr:`RephraseResult.records`) or a JSONL path of them: ``field`` is the
            original text, ``rephrased_text`` the rewrite, ``rephrased`` whether it changed.
        field: the original text's field (``sample`` or ``continuation`` in ``data/train_detox.jsonl``, see
            :func:`survival_table`).
    """
    if isinstance(records, str | os.PathLike):
        records = read_jsonl(records)
    pairs = _pairs(records, field)
    if not pairs:
        return {"mean_chrf": None, "mean_changed_word_share": None}
    return {
        "mean_chrf": sum(chrf(a, b) for a, b in pairs) / len(pairs),
        "mean_changed_word_share": sum(changed_word_share(a, b) for a, b in pairs) / len(pairs),
    }


def survival_table(
    records: Sequence[dict[str, Any]] | str | os.PathLike[str], field: str = "sample", n: int | None = 10
) -> pd.DataFrame:
    """One row per rephrased sample: original, rephrased, chrF, changed-word share, toxicity before and after.

    The frame's ``attrs`` hold the means over *all* rephrased samples (``mean_chrf``, ``mean_changed_word_share``,
    ``rephrased``), also when ``n`` shows fewer rows.

    Args:
        records: rephrased records or a JSONL path of them (``data/train_detox.jsonl``).
        field: the original text's field: in the training set ``sample`` (prompt and continuation as TMaRCo saw
            them, as the rephrase summary's means) or ``continuation`` (only the part the detox arm learns).
        n: rows to show (the first ``n`` rephrased samples); `None` shows all.
    """
    import pandas as pd

    if isinstance(records, str | os.PathLike):
        records = read_jsonl(records)
    rows = [(r, pair) for r in records if (pair := _pair(r, field)) is not None]
    frame = pd.DataFrame(
        [
            {
                "original": a,
                "rephrased": b,
                "chrf": chrf(a, b),
                "changed_word_share": changed_word_share(a, b),
                "toxicity_before": r.get("toxicity_before"),
                "toxicity_after": r.get("toxicity_after"),
            }
            for r, (a, b) in rows
        ],
        columns=["original", "rephrased", "chrf", "changed_word_share", "toxicity_before", "toxicity_after"],
    )
    means = {
        "rephrased": len(frame),
        "mean_chrf": float(frame["chrf"].mean()) if len(frame) else None,
        "mean_changed_word_share": float(frame["changed_word_share"].mean()) if len(frame) else None,
    }
    shown = frame if n is None else frame.head(n)
    shown.attrs.update(means)
    return shown
