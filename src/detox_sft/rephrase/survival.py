"""How much of a text survives its rephrasing (the cost of detoxifying): chrF against the original (100 is
unchanged; one word of twenty rewritten keeps it in the 80s-90s) and the share of words changed, per rephrased sample
and averaged. ``survival_table(cfg.paths.train_set("detox"))`` is what a notebook shows."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from functools import cache
from typing import Any

from detox_sft.data import read_jsonl

Records = Sequence[dict[str, Any]] | str | os.PathLike[str]  # records, or a JSONL path of them
_COLUMNS = ["original", "rephrased", "chrf", "changed_word_share", "toxicity_before", "toxicity_after"]


@cache
def _chrf_metric() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()  # sacrebleu's defaults: character 6-grams, beta 2, no word n-grams


def chrf(original: str, rephrased: str) -> float:
    """sacrebleu's sentence chrF (0-100) of ``rephrased`` with ``original`` as the reference."""
    return float(_chrf_metric().sentence_score(rephrased, [original]).score)


def changed_word_share(original: str, rephrased: str) -> float:
    """The share of ``original``'s words (split on whitespace) outside the blocks difflib matches in ``rephrased``
    (no junk heuristic), in [0, 1]; 0.0 for an empty original."""
    before, after = original.split(), rephrased.split()
    if not before:
        return 0.0
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    return 1.0 - sum(block.size for block in matcher.get_matching_blocks()) / len(before)


def _rows(records: Records, field: str) -> list[dict[str, Any]]:
    """One row per record TMaRCo changed. ``field="continuation"`` compares the training set's
    ``original_continuation`` with ``continuation`` (what the detox arm learns); another field with ``rephrased_text``."""
    if isinstance(records, str | os.PathLike):
        records = read_jsonl(records)
    original, rephrased = ("original_continuation", field) if field == "continuation" else (field, "rephrased_text")
    rows = []
    for r in records:
        a, b = r.get(original), r.get(rephrased)
        if r.get("rephrased") and isinstance(a, str) and isinstance(b, str):
            values = (a, b, chrf(a, b), changed_word_share(a, b), r.get("toxicity_before"), r.get("toxicity_after"))
            rows.append(dict(zip(_COLUMNS, values, strict=True)))
    return rows


def survival_means(records: Records, field: str = "text") -> dict[str, float | None]:
    """Mean chrF and mean changed-word share over the records TMaRCo rephrased (`None` when none was); ``records``
    and ``field`` as :func:`survival_table` takes them."""
    rows = _rows(records, field)
    names = ("chrf", "changed_word_share")
    return {f"mean_{name}": sum(r[name] for r in rows) / len(rows) if rows else None for name in names}


def survival_table(records: Records, field: str = "sample", n: int | None = 10) -> Any:
    """A DataFrame, one row per rephrased sample: original, rephrased, chrF, changed-word share, toxicity before and
    after; its ``attrs`` hold ``rephrased`` and the means over *all* of them, also when ``n`` shows fewer rows.

    Args:
        records: rephrased records or a JSONL path of them (``data/train_detox.jsonl``).
        field: the original text's field: ``sample`` (prompt and continuation as TMaRCo saw them, as the rephrase
            summary's means) or ``continuation`` (only the part the detox arm learns).
        n: rows to show (the first ``n`` rephrased samples); `None` shows all.
    """
    import pandas as pd

    frame = pd.DataFrame(_rows(records, field), columns=_COLUMNS)
    shown = frame if n is None else frame.head(n)
    shown.attrs.update(
        rephrased=len(frame),
        mean_chrf=float(frame["chrf"].mean()) if len(frame) else None,
        mean_changed_word_share=float(frame["changed_word_share"].mean()) if len(frame) else None,
    )
    return shown
