"""What a notebook shows of the rephrasing: highlighted before/after HTML and the toxicity histogram."""

from __future__ import annotations

import html
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.data import read_jsonl
from detox_sft.rephrase.survival import Records


class HTML(str):
    """An HTML string that Jupyter renders (``_repr_html_``)."""

    __slots__ = ()

    def _repr_html_(self) -> str:
        return str(self)


def _highlight_masked(original: str, masked: str, mask_token: str = "<mask>") -> str:
    """HTML of ``original`` with the characters TMaRCo masked (absent from ``masked``) marked."""
    import difflib

    blocks = difflib.SequenceMatcher(a=original, b="".join(masked.split(mask_token)), autojunk=False)
    kept = {i for block in blocks.get_matching_blocks() for i in range(block.a, block.a + block.size)}
    out = []
    for marked, run in itertools.groupby(enumerate(original), key=lambda pair: pair[0] not in kept):
        text = html.escape("".join(ch for _, ch in run))
        out.append(f'<mark style="background:#f8b4b4">{text}</mark>' if marked and text.strip() else text)
    return "".join(out)


def highlight_html(records: Records, n: int = 10, field: str = "text", only_rephrased: bool = True) -> HTML:
    """An HTML table of the first ``n`` rephrased records (or a JSONL path of them; those TMaRCo changed, with
    ``only_rephrased``): ``field`` with the masked tokens highlighted, the rephrased text and the toxicities."""
    if isinstance(records, str | os.PathLike):
        records = read_jsonl(records)
    original_field = "original_continuation" if field == "continuation" else field
    rows = [r for r in records if r.get("rephrased") or not only_rephrased][:n]
    head = (
        "<tr><th>#</th><th>original (masked tokens highlighted)</th><th>rephrased</th>"
        "<th>toxicity before</th><th>toxicity after</th></tr>"
    )
    body = []
    for i, r in enumerate(rows):
        original = r.get(original_field) or r.get(field) or ""
        masked = r.get("masked_text")
        left = _highlight_masked(original, masked) if masked else html.escape(original)
        tb, ta = r.get("toxicity_before"), r.get("toxicity_after")
        body.append(
            f"<tr><td>{i}</td><td>{left}</td><td>{html.escape(r.get('rephrased_text') or '')}</td>"
            f"<td>{'' if tb is None else f'{tb:.3f}'}</td><td>{'' if ta is None else f'{ta:.3f}'}</td></tr>"
        )
    if not body:
        body.append('<tr><td colspan="5">no rephrased records</td></tr>')
    return HTML('<table class="detox-rephrase" style="text-align:left">' + head + "".join(body) + "</table>")


def plot_toxicity_histogram(records: Records, path: str | os.PathLike[str] | None = None, bins: int = 20) -> Any:
    """Histogram of toxicity before and after rephrasing (all scored records) as a matplotlib Figure, also saved as
    PNG when ``path`` is given."""
    from matplotlib.figure import Figure

    if isinstance(records, str | os.PathLike):
        records = read_jsonl(records)
    before = [r["toxicity_before"] for r in records if r.get("toxicity_before") is not None]
    after = [r["toxicity_after"] for r in records if r.get("toxicity_after") is not None]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    edges = np.linspace(0.0, 1.0, bins + 1)
    ax.hist(before, bins=edges, alpha=0.6, label=f"before (mean {np.mean(before):.3f})" if before else "before")
    ax.hist(after, bins=edges, alpha=0.6, label=f"after (mean {np.mean(after):.3f})" if after else "after")
    n_changed = sum(1 for r in records if r.get("rephrased"))
    ax.set_title(f"Toxicity before / after TMaRCo ({n_changed} of {len(records)} rephrased)")
    ax.set_xlabel("toxicity (scorer probability)")
    ax.set_ylabel("samples")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    return fig


def plot_token_scores(tokenizer: Any, sentence: str, scores: Any, threshold: float) -> Any:
    """A figure of ``scores`` (``tmarco.score([sentence])[0]``) as bars over the tokens, those above the mask
    ``threshold`` (masked) red, the threshold a line."""
    from matplotlib.figure import Figure

    tokens = tokenizer.tokenize(sentence)
    labels = [tokenizer.convert_tokens_to_string([t]).strip() or repr(t) for t in tokens]
    values = [float(v) for v in scores]
    masked = [v > threshold for v in values]
    fig = Figure(figsize=(min(14.0, max(6.0, 0.42 * len(tokens))), 3.4))
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color=["#d62728" if m else "#9e9e9e" for m in masked])
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"mask threshold {threshold:g}")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=9)
    ax.set_ylabel("disagreement / sentence mean")
    ax.set_title(f"TMaRCo token scores: {sum(masked)} of {len(tokens)} tokens above the threshold (red) are masked")
    ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    return fig
