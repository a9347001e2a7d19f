"""Render the background deck (slides/deck.md) to one self-contained HTML file and a PDF, offline.

The deck is Markdown; slides are separated by a line holding only ``---``. Everything that is a result comes from
the project's own outputs at render time, never from the text:

* ``@figure <file>[|<alternative>...] "<caption>" producer="<step>"`` (a line of its own): a PNG of the run
  directory (``figures/loss_curves.png``), copied to ``build/figures/`` and embedded; rendering stops, naming the
  producing step, when none of the files exists.
* ``{{eval:<dotted.path>}}``: a number from ``<run>/eval/results.json``; ``@`` stands for the headline scorer;
  an estimate ``{value, low, high}`` prints as ``0.412 [0.380, 0.445]``.
* ``{{eval_table}}``: the toxicity table of that file (headline scorer, one row per model).
* ``{{bench:<section>|<row>|<column>|<where>}}``: one figure of BENCHMARKS.md, quoted: in the section whose
  heading contains ``<section>``, the cell of column ``<column>`` in the first row whose first cell holds ``<row>``, in the
  first table where ``<where>`` (optional: ``H200``, ``EPYC``) appears in that row, its header or the text since
  the table before (whole benchmark tables do not fit a slide).
* ``{{memory_table}}``: opt-350m weight / optimizer-state memory computed from its config and the tutorial
  recipe's LoRA settings (arithmetic, labelled as such; measured peaks belong in BENCHMARKS.md).
* ``{{rephrase_example}}``: the shortest training sample the rephrase step changed (``data/train_raw.jsonl`` vs
  ``data/train_detox.jsonl``), each text clipped to fit.
* ``{{run}}``, ``{{run_note}}`` (which profile made the run, from its recipe.json), ``{{recipe:<dotted.path>}}``
  (from ``recipe.json`` in or beside the run) and ``{{tutorial:<dotted.path>}}`` (a setting of recipes/tutorial.yaml).

What is not available yet (a benchmark section not written, no recipe.json) renders as a visible PENDING box and
is listed on the terminal; ``--strict`` turns that into an error. Every slide gets a footer naming its sources.
The PDF is printed by headless Chromium (Debian package ``chromium``), which also checks the rendered deck: every
image decoded, no empty slide, no overflowing slide.

Usage: ``python -m detox_sft.dev.slides slides/ [--run-dir runs/x] [--strict] [--no-pdf]`` (``make slides``).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detox_sft.config import RunPaths, load_recipe

__all__ = [
    "SlidesError",
    "RenderedDeck",
    "find_run_dir",
    "render_deck",
    "memory_rows",
    "find_chromium",
    "print_pdf",
    "check_deck",
    "check_widths",
    "screenshot_deck",
    "main",
]

SLIDE_W, SLIDE_H = 1280, 720
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# facebook/opt-350m config.json (the tutorial's model); the memory slide is arithmetic on these.
OPT_350M = {
    "vocab_size": 50272,
    "hidden_size": 1024,
    "ffn_dim": 4096,
    "num_hidden_layers": 24,
    "word_embed_proj_dim": 512,
    "max_position_embeddings": 2048,
}
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)(?::([^}]*))?\s*\}\}")


class SlidesError(RuntimeError):
    """The deck cannot be rendered as asked; the message says what to run or fix."""


@dataclass
class RenderedDeck:
    """What :func:`render_deck` produced.

    Attributes:
        html (`Path`): the self-contained deck (images embedded).
        num_slides (`int`): slides in the deck.
        figures (`list[Path]`): figure files copied to ``build/figures``.
        sources (`list[str]`): every source a slide quotes (files, sections).
        pending (`list[str]`): placeholders that could not be filled (rendered as PENDING boxes).
        run_dir (`Path`): the run the figures and numbers come from.
    """

    html: Path
    num_slides: int
    figures: list[Path] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    run_dir: Path | None = None


def find_run_dir(runs_root: str | Path) -> Path:
    """The newest run directory (by figure time) under `runs_root` that holds ``figures/*.png``.

    Runs sit at ``runs/<name>/`` (notebooks, CLI) or ``runs/<timestamp>/run/`` (``make demo``): both are searched.

    Raises:
        SlidesError: there is none.
    """
    root = Path(runs_root)
    runs = sorted({f.parent.parent for pattern in ("*/figures/*.png", "*/*/figures/*.png") for f in root.glob(pattern)})
    if not runs:
        raise SlidesError(
            f"No run with figures under {root}/ — run `make demo` (or the notebooks) first, or pass "
            "--run-dir <a run directory holding figures/>."
        )
    return max(runs, key=lambda p: max(f.stat().st_mtime for f in RunPaths(p).figures.glob("*.png")))


def _recipe_json(run_dir: Path) -> Path | None:
    """The run's saved recipe: ``<run>/recipe.json`` or, for ``make demo`` runs, next to the run directory."""
    return next((p for p in (run_dir / "recipe.json", run_dir.parent / "recipe.json") if p.is_file()), None)


def _run_note(run_dir: Path, label: str) -> str:
    path = _recipe_json(run_dir)
    if path is None:
        return (
            f"Run `{label}` (no recipe.json beside it: the profile that produced it is not recorded — "
            "check before quoting its numbers)."
        )
    recipe = json.loads(path.read_text())
    profile, model = recipe.get("profile"), (recipe.get("training") or {}).get("base_model")
    if profile == "offline":
        return (
            f"Run `{label}`, profile **offline**: the small local models built by the project ({model}) on "
            "CPU, not opt-350m — its numbers show the pipeline end to end, not opt-350m's toxicity."
        )
    return f"Run `{label}`, profile **{profile}**, base model `{model}`."


# ------------------------------------------------------------------------------------------------ numbers


def _fmt_number(value: Any) -> str:
    if isinstance(value, dict) and "value" in value:
        if value["value"] is None:
            return "n/a"
        if value.get("low") is None:
            return f"{value['value']:.3f}"
        sign = "+" if "excludes_zero" in value else ""
        return f"{value['value']:{sign}.3f} [{value['low']:{sign}.3f}, {value['high']:{sign}.3f}]"
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _lookup(data: dict[str, Any], path: str, where: str, fix: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if part == "@":
            part = data.get("headline_scorer", "")
        if not isinstance(node, dict) or part not in node:
            raise SlidesError(f"{where} has no {path!r} (stuck at {part!r}) — {fix}.")
        node = node[part]
    return node


def _eval_table(results: dict[str, Any]) -> str:
    """The headline scorer's table: one row per model (a few short rows, so it fits any run's slide)."""
    scorer = results["headline_scorer"]
    lines = ["| model | EMT | TP | mean toxicity | perplexity |", "|---|---|---|---|---|"]
    for model in results["models"]:
        entry = results["metrics"][model]
        tox = entry["toxicity"][scorer]
        lines.append(
            f"| {model} | {_fmt_number(tox['expected_max_toxicity'])} | "
            f"{_fmt_number(tox['toxicity_probability'])} | {_fmt_number(tox['mean_toxicity'])} | "
            f"{_fmt_number(entry.get('perplexity') or {'value': None})} |"
        )
    return "\n".join(lines) + (
        f"\n\nScorer `{scorer}`; {results['num_prompts']} prompts × {results['num_samples']} samples; "
        "value [95% bootstrap interval]."
    )


def memory_rows(lora: dict[str, Any], config: dict[str, int] | None = None) -> list[tuple[str, int, float]]:
    """Weight and optimizer-state memory of OPT (default opt-350m), computed from its shapes.

    Args:
        lora: LoRA settings (``r``, ``target_modules``), as in the recipe.
        config: OPT config values (see ``OPT_350M``).

    Returns:
        Rows ``(what, parameters, GB)``: parameters, fp32 / fp16 / NF4 weights, full fine-tuning state with Adam
        (weights + grads + 2 moments in fp32, 16 B per parameter), QLoRA state (NF4 base + LoRA with Adam).
    """
    c = {**OPT_350M, **(config or {})}
    h, f, n, e = c["hidden_size"], c["ffn_dim"], c["num_hidden_layers"], c["word_embed_proj_dim"]
    embed = c["vocab_size"] * e + (c["max_position_embeddings"] + 2) * h  # OPT offsets positions by 2
    project = 2 * e * h if e != h else 0  # project_in / project_out, no bias
    attn = 4 * (h * h + h)
    mlp = (h * f + f) + (f * h + h)
    per_layer = attn + mlp + 2 * 2 * h  # two LayerNorms
    total = embed + project + n * per_layer
    linear = n * (4 * h * h + 2 * h * f) + project  # what bitsandbytes quantizes (every Linear but lm_head)
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h), "fc1": (h, f), "fc2": (f, h)}
    r = int(lora.get("r", 16))
    lora_params = n * sum(r * (i + o) for name, (i, o) in shapes.items() if name in lora.get("target_modules", []))
    gb = 1e9
    nf4 = (linear * (0.5 + 4 / 64) + (total - linear) * 2) / gb  # 4-bit codes + one fp32 absmax per 64 weights
    return [
        ("parameters (opt-350m)", total, total * 4 / gb),
        ("weights, fp16", total, total * 2 / gb),
        ("weights, NF4 (Linear layers 4-bit, block 64; rest fp16)", linear, nf4),
        ("full fine-tuning: fp32 weights + grads + Adam", total, total * 16 / gb),
        (f"QLoRA: NF4 base + LoRA r={r} with Adam", lora_params, nf4 + lora_params * 16 / gb),
    ]


def _memory_table() -> str:

    lora = load_recipe("tutorial").training.lora
    rows = memory_rows(lora)
    total = rows[0][1]
    lines = ["| | parameters | GB |", "|---|---:|---:|"]
    for what, params, size in rows:
        lines.append(f"| {what} | {params:,} ({params / total:.1%}) | {size:.2f} |")
    return "\n".join(lines) + (
        "\n\nComputed at render time from opt-350m's config and recipes/tutorial.yaml "
        "(`training.lora`): weights and optimizer state only — activations and the CUDA "
        "context come on top."
    )


def _tox(value: Any) -> str:
    return f" (toxicity {value:.2f})" if isinstance(value, int | float) and not isinstance(value, bool) else ""


_EXAMPLE_CHARS = 160  # each text of the worked example, at most: a slide holds four of them at any run's length


def _clip(text: Any) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 1].rstrip() + "…"


def _rephrase_example(run_dir: Path) -> str:
    """The shortest sample the rephrase step changed: before, masked (when recorded), after, with toxicity scores;
    each text clipped to :data:`_EXAMPLE_CHARS`."""
    raw_path, detox_path = RunPaths(run_dir).train_set("raw"), RunPaths(run_dir).train_set("detox")
    for path in (raw_path, detox_path):
        if not path.is_file():
            raise SlidesError(f"{path} is missing — run `detox-sft rephrase` (notebooks/1-sft.ipynb) for this run.")
    changed = []
    with raw_path.open() as raw_f, detox_path.open() as detox_f:
        for raw_line, detox_line in zip(raw_f, detox_f, strict=False):
            raw, detox = json.loads(raw_line), json.loads(detox_line)
            before = detox.get("original_continuation", raw.get("continuation", raw.get("text")))
            after = detox.get("continuation", detox.get("text"))
            if before != after and detox.get("rephrased") is not False:
                changed.append((len(str(raw.get("prompt", ""))) + len(str(before)), raw, detox, before, after))
    if not changed:
        raise SlidesError(
            f"No sample differs between {raw_path.name} and {detox_path.name}: the rephrase step changed "
            "nothing — check rephrase.gate_threshold and the scorer."
        )
    _, raw, detox, before, after = min(changed, key=lambda item: item[0])
    esc = lambda v: html.escape(_clip(v))  # noqa: E731 - model text may hold <mask> and other markup
    lines = [
        f"**Prompt:** {esc(raw.get('prompt', ''))}",
        f"**Before{_tox(detox.get('toxicity_before', raw.get('toxicity')))}:** {esc(before)}",
    ]
    if detox.get("masked_text"):
        lines.append(f"**Masked:** {esc(detox['masked_text'])}")
    lines.append(f"**After TMaRCo{_tox(detox.get('toxicity_after'))}:** {esc(after)}")
    return "\n\n".join(lines)


def _bench_section(benchmarks: Path, name: str) -> str | None:
    """The text of the BENCHMARKS.md section whose heading contains ``name`` (up to the next heading of its level)."""
    if not benchmarks.is_file():
        return None
    text = benchmarks.read_text()
    heads = list(re.finditer(r"^(#{2,3})\s+(.*)$", text, flags=re.M))
    for i, m in enumerate(heads):
        if name.lower() in m.group(2).lower():
            end = next((h.start() for h in heads[i + 1 :] if len(h.group(1)) <= len(m.group(1))), len(text))
            return text[m.end() : end]
    return None


def _cells(line: str) -> list[str]:
    return [c.strip().replace("**", "").strip() for c in line.strip().strip("|").split("|")]


def _bench_tables(section: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Each Markdown table of a section: (the text between the previous table and it, its header, its rows' cells)."""
    tables, before = [], []
    for block in re.split(r"\n\s*\n", section):
        lines = [line for line in block.strip().splitlines() if line.strip()]
        if lines and lines[0].lstrip().startswith("|"):
            rows = [_cells(line) for line in lines[2:] if line.lstrip().startswith("|")]
            tables.append((" ".join(before), _cells(lines[0]), rows))
            before = []
        elif lines:
            before += lines
    return tables


def _bench_figure(section: str, row: str, column: str, where: str = "") -> str | None:
    """One figure of a section's tables: the cell in column ``column`` (its header, exactly) of the first row whose
    first cell contains ``row``, in the first table where ``where`` (if given) appears in that row, the header or the
    text between the previous table and this one (``H200`` picks the GPU runs, ``EPYC`` the CPU ones). Case is
    ignored."""
    row, column, where = row.strip().lower(), column.strip().lower(), where.strip().lower()
    for before, header, rows in _bench_tables(section):
        names = [h.lower() for h in header]
        if column not in names:
            continue
        for cells in rows:
            context = " ".join([before, *header, *cells]).lower()
            if cells and row in cells[0].lower() and (not where or where in context):
                index = names.index(column)
                return cells[index] if index < len(cells) else None
    return None


# ------------------------------------------------------------------------------------------------- render


@dataclass
class _Context:
    run_dir: Path
    benchmarks: Path
    out_dir: Path
    results: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    figures: list[Path] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The run as the slides name it: relative to the repository when inside it (runs/x), else its folder name."""
        return self.display(self.run_dir)

    def display(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.benchmarks.resolve().parent))
        except ValueError:
            return str(path.resolve().relative_to(self.run_dir.parent)) if path != self.run_dir else path.name

    def eval_results(self) -> dict[str, Any]:
        if self.results is None:
            path = RunPaths(self.run_dir).results
            if not path.is_file():
                raise SlidesError(
                    f"{path} is missing — run `detox-sft evaluate` (notebooks/2-eval.ipynb) for this "
                    "run, or pass --run-dir of a run that has it."
                )
            self.results = json.loads(path.read_text())
        return self.results


def _pending(ctx: _Context, what: str, how: str) -> str:
    ctx.pending.append(f"{what}: {how}")
    return f'<div class="pending">PENDING — {html.escape(what)}: {html.escape(how)}</div>'


def _fill(ctx: _Context, kind: str, arg: str | None, sources: list[str]) -> str:
    arg = (arg or "").strip()
    rel = ctx.label
    if kind == "eval":
        sources.append(f"{rel}/eval/results.json")
        return _fmt_number(
            _lookup(
                ctx.eval_results(),
                arg,
                f"{ctx.run_dir}/eval/results.json",
                "re-run `detox-sft evaluate` with the current code",
            )
        )
    if kind == "eval_table":
        sources.append(f"{rel}/eval/results.json")
        return "\n\n" + _eval_table(ctx.eval_results()) + "\n\n"
    if kind == "run":
        return ctx.label
    if kind == "run_note":
        if _recipe_json(ctx.run_dir):
            sources.append(ctx.display(_recipe_json(ctx.run_dir)))
        return _run_note(ctx.run_dir, ctx.label)
    if kind == "recipe":
        path = _recipe_json(ctx.run_dir)
        if path is None:
            return _pending(
                ctx, f"recipe:{arg}", f"no recipe.json in or beside {ctx.run_dir} (`detox-sft demo` writes it)"
            )
        sources.append(ctx.display(path))
        value = _lookup(json.loads(path.read_text()), arg, str(path), "use a field of the recipe")
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    if kind == "tutorial":
        sources.append("recipes/tutorial.yaml")
        value = _lookup(load_recipe("tutorial").to_dict(), arg, "recipes/tutorial.yaml", "use a field of it")
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    if kind == "bench":
        section_name, *query = [part.strip() for part in arg.split("|")]
        if len(query) not in (2, 3):
            raise SlidesError(
                f"{{{{bench:{arg}}}}}: quote one figure, {{{{bench:<section>|<row>|<column>[|<where>]}}}} "
                "(whole benchmark tables do not fit a slide)."
            )
        section = _bench_section(ctx.benchmarks, section_name)
        figure = _bench_figure(section, *query) if section is not None else None
        if figure is None:
            return _pending(
                ctx,
                f"benchmark '{arg}'",
                f"no such figure in {ctx.benchmarks.name} yet — run `make bench` (benchmarks/*.py) and record it "
                "there, or fix the row / column names",
            )
        sources.append(f"{ctx.benchmarks.name} § {section_name}")
        return figure
    if kind == "memory_table":
        sources.append("opt-350m config.json + recipes/tutorial.yaml (computed)")
        return "\n\n" + _memory_table() + "\n\n"
    if kind == "rephrase_example":
        sources.append(f"{rel}/data/train_raw.jsonl vs train_detox.jsonl")
        return "\n\n" + _rephrase_example(ctx.run_dir) + "\n\n"
    raise SlidesError(
        f"Unknown placeholder {{{{{kind}}}}} in the deck — use eval, eval_table, bench, memory_table, "
        "rephrase_example, run, recipe or tutorial."
    )


def _figure(ctx: _Context, line: str, sources: list[str]) -> str:
    try:
        parts = shlex.split(line[len("@figure") :])
    except ValueError as exc:
        raise SlidesError(f"Bad @figure line {line!r}: {exc}") from exc
    opts = dict(p.split("=", 1) for p in parts if re.match(r"^[a-z_]+=", p))
    words = [p for p in parts if not re.match(r"^[a-z_]+=", p)]
    if not words:
        raise SlidesError(f"@figure without a file: {line!r}")
    candidates, caption = words[0].split("|"), " ".join(words[1:])
    found = next((ctx.run_dir / c for c in candidates if (ctx.run_dir / c).is_file()), None)
    if found is None:
        producer = opts.get("producer", "the pipeline step that writes it")
        raise SlidesError(
            f"Figure {' or '.join(candidates)} is missing in {ctx.run_dir} — it is produced by "
            f"{producer}; run that step for this run (or pass --run-dir of a run that has it)."
        )
    dest = ctx.out_dir / "figures" / found.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found, dest)
    ctx.figures.append(dest)
    rel = f"{ctx.label}/{found.relative_to(ctx.run_dir)}"
    sources.append(rel)
    data = base64.b64encode(found.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" data-source="{rel}">'
        f'<figcaption>{html.escape(caption)} <span class="src">({html.escape(rel)})</span></figcaption>'
        "</figure>"
    )


def _markdown() -> Any:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True, "typographer": True}).enable("table")


_CSS = f"""
@page {{ size: {SLIDE_W}px {SLIDE_H}px; margin: 0; }}
html, body {{ margin: 0; padding: 0; background: #fff; }}
body {{ font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; color: #1d2733; }}
.slide {{ width: {SLIDE_W}px; height: {SLIDE_H}px; box-sizing: border-box; padding: 40px 64px 56px;
  position: relative; overflow: hidden; break-after: page; page-break-after: always;
  border-top: 10px solid #a30000; }}
.slide:last-child {{ break-after: auto; page-break-after: auto; }}
.slide .content {{ height: {SLIDE_H - 40 - 56 - 10}px; overflow: hidden; display: flex; flex-direction: column; }}
.content > * {{ flex: 0 0 auto; }}
h1 {{ font-size: 46px; margin: 120px 0 20px; color: #a30000; }}
h2 {{ font-size: 34px; margin: 0 0 18px; color: #a30000; }}
p, li {{ font-size: 22px; line-height: 1.35; }}
li {{ margin: 4px 0; }}
code {{ font-family: "DejaVu Sans Mono", monospace; font-size: 0.9em; background: #f2f2f2; padding: 0 4px; }}
pre {{ background: #f2f2f2; padding: 10px 14px; font-size: 17px; overflow: hidden; }}
pre code {{ background: none; padding: 0; }}
table {{ border-collapse: collapse; font-size: 20px; margin: 12px 0; }}
th, td {{ border-bottom: 1px solid #ccd; padding: 6px 14px; text-align: left; }}
/* A figure takes the room the text leaves: it shrinks instead of overflowing the slide. */
.content > figure, .content > .cols {{ flex: 1 1 0; min-height: 120px; }}
figure {{ margin: 0; display: flex; flex-direction: column; align-items: center; min-height: 0; }}
figure img {{ flex: 1 1 0; min-height: 0; max-width: 100%; object-fit: contain; }}
figcaption {{ flex: 0 0 auto; font-size: 16px; color: #555; text-align: center; }}
.cols {{ display: flex; gap: 24px; }}
.cols > * {{ flex: 1 1 0; min-width: 0; }}
.pending {{ border: 3px dashed #d08000; color: #8a5300; background: #fff6e5; padding: 10px 14px; font-size: 18px; }}
.sources {{ position: absolute; left: 64px; right: 120px; bottom: 14px; font-size: 13px; color: #777; }}
.pageno {{ position: absolute; right: 40px; bottom: 14px; font-size: 13px; color: #777; }}
.src {{ color: #888; }}
"""

# Runs in the browser: records decoded images, empty and overflowing slides on <body data-check>.
_CHECK_JS = """
window.addEventListener('load', () => {
  const problems = [];
  document.querySelectorAll('section.slide').forEach((s, i) => {
    const c = s.querySelector('.content');
    const text = Array.from(c.querySelectorAll(':scope > :not(h1):not(h2)')).map(e => e.textContent).join('').trim();
    if (!text && !c.querySelector('img') && !c.querySelector('h1')) problems.push(`slide ${i + 1}: empty`);
    if (c.scrollHeight > c.clientHeight + 2) problems.push(`slide ${i + 1}: content overflows the slide`);
    s.querySelectorAll('img').forEach(img => {
      if (!img.complete || img.naturalWidth === 0)
        problems.push(`slide ${i + 1}: image not loaded (${img.dataset.source || img.src.slice(0, 60)})`);
    });
  });
  document.body.dataset.slides = document.querySelectorAll('section.slide').length;
  document.body.dataset.check = JSON.stringify(problems);
});
"""


def render_deck(
    deck_dir: str | Path,
    run_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    benchmarks: str | Path | None = None,
    strict: bool = False,
) -> RenderedDeck:
    """Render ``<deck_dir>/deck.md`` to ``<out_dir>/deck.html`` (one file, figures embedded).

    Args:
        deck_dir: the folder holding deck.md (``slides/``).
        run_dir: the run the figures and numbers come from; default: the newest ``runs/*`` with figures.
        out_dir: where to write; default ``<deck_dir>/build``.
        benchmarks: BENCHMARKS.md; default the one next to ``deck_dir``.
        strict: fail instead of rendering PENDING boxes.

    Raises:
        SlidesError: a figure or result is missing (the message names the step that produces it), a slide is
            empty, or (strict) something is pending.
    """
    deck_dir = Path(deck_dir)
    source = deck_dir / "deck.md"
    if not source.is_file():
        raise SlidesError(f"No deck at {source} — pass the slides/ folder.")
    root = deck_dir.resolve().parent
    run = Path(run_dir) if run_dir else find_run_dir(root / "runs")
    if not run.is_dir():
        raise SlidesError(f"Run directory {run} does not exist — run `make demo` or pass an existing --run-dir.")
    out = Path(out_dir) if out_dir else deck_dir / "build"
    if (out / "figures").is_dir():
        shutil.rmtree(out / "figures")  # no stale figures from another run
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(
        run_dir=run.resolve(), benchmarks=Path(benchmarks) if benchmarks else root / "BENCHMARKS.md", out_dir=out
    )
    md = _markdown()
    chunks = re.split(r"^---[ \t]*$", source.read_text(), flags=re.M)
    slides_html, all_sources = [], []
    for number, chunk in enumerate(chunks, start=1):
        sources: list[str] = []
        lines = []
        chunk = re.sub(r"<!--.*?-->", "", chunk, flags=re.S)  # authors' notes: not rendered, not filled
        for line in chunk.splitlines():
            lines.append(_figure(ctx, line.strip(), sources) if line.strip().startswith("@figure") else line)
        text = _PLACEHOLDER.sub(lambda m, s=sources: _fill(ctx, m.group(1), m.group(2), s), "\n".join(lines))
        if not text.strip():
            raise SlidesError(f"Slide {number} of {source} is empty — remove the extra '---' or give it content.")
        body = md.render(text)
        unique = list(dict.fromkeys(sources))
        all_sources += unique
        footer = f'<footer class="sources">Source: {html.escape("; ".join(unique))}</footer>' if unique else ""
        slides_html.append(
            f'<section class="slide" id="slide-{number}"><div class="content">{body}</div>{footer}'
            f'<div class="pageno">{number} / {len(chunks)}</div></section>'
        )
    if strict and ctx.pending:
        raise SlidesError("Pending placeholders (--strict): " + "; ".join(ctx.pending))
    title = re.search(r"^#\s+(.*)$", source.read_text(), flags=re.M)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
        f"{html.escape(title.group(1) if title else 'detox-sft')}</title><style>{_CSS}</style></head><body>"
        + "".join(slides_html)
        + f"<script>{_CHECK_JS}</script></body></html>"
    )
    html_path = out / "deck.html"
    html_path.write_text(page)
    return RenderedDeck(
        html=html_path,
        num_slides=len(chunks),
        figures=ctx.figures,
        sources=list(dict.fromkeys(all_sources)),
        pending=ctx.pending,
        run_dir=ctx.run_dir,
    )


# ------------------------------------------------------------------------------------------------ chromium


def find_chromium() -> str | None:
    """The headless browser: Debian's ``chromium`` (or chromium-browser / google-chrome), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(args: list[str], chromium: str | None, timeout: int = 120) -> subprocess.CompletedProcess:
    exe = chromium or find_chromium()
    if exe is None:
        raise SlidesError(
            "Chromium not found — install it (Debian: `apt-get install -y chromium`) to print the PDF "
            "and check the deck."
        )
    with tempfile.TemporaryDirectory(prefix="detox-sft-chromium-") as profile:
        proc = subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout
        )
    return proc


def print_pdf(html_path: str | Path, pdf_path: str | Path | None = None, chromium: str | None = None) -> Path:
    """Print the deck to PDF, one slide per page, with headless Chromium.

    Raises:
        SlidesError: Chromium is missing or wrote no PDF.
    """
    html_path = Path(html_path).resolve()
    pdf = Path(pdf_path) if pdf_path else html_path.with_suffix(".pdf")
    pdf.unlink(missing_ok=True)
    proc = _chromium(
        [
            "--no-pdf-header-footer",
            "--print-to-pdf-no-header",
            f"--print-to-pdf={pdf.resolve()}",
            "--virtual-time-budget=1000",
            html_path.as_uri(),
        ],
        chromium,
    )
    if not pdf.is_file() or pdf.stat().st_size == 0:
        raise SlidesError(f"Chromium wrote no PDF ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return pdf


def check_deck(html_path: str | Path, chromium: str | None = None) -> list[str]:
    """Load the deck in headless Chromium and list its problems: images not decoded, empty or overflowing slides.

    Returns:
        The problems; empty when the deck is fine.
    """
    proc = _chromium(["--dump-dom", "--virtual-time-budget=1000", Path(html_path).resolve().as_uri()], chromium)
    match = re.search(r'<body[^>]*\sdata-check="([^"]*)"', proc.stdout)
    if not match:
        return [f"the deck's self-check did not run in Chromium: {proc.stderr.strip()[-300:]}"]
    return json.loads(html.unescape(match.group(1)))


# Runs in the browser on a copy of a page: records the tables, code blocks, figures and images that reach past the
# page's content box, and a page that scrolls sideways, on <body data-widths>.
_WIDTH_JS = """
window.addEventListener('load', () => {
  const body = document.body, style = getComputedStyle(body);
  const right = body.getBoundingClientRect().right - parseFloat(style.paddingRight) + 1;
  const problems = [];
  document.querySelectorAll('table, pre, figure, img').forEach((e, i) => {
    const box = e.getBoundingClientRect();
    if (box.right > right) problems.push(`${e.tagName.toLowerCase()} #${i + 1} reaches ${Math.round(box.right)}px, the page ends at ${Math.round(right)}px`);
  });
  if (document.documentElement.scrollWidth > window.innerWidth + 1)
    problems.push(`the page scrolls sideways (${document.documentElement.scrollWidth}px wide)`);
  body.dataset.widths = JSON.stringify(problems);
});
"""


def check_widths(html_path: str | Path, chromium: str | None = None, width: int = SLIDE_W) -> list[str]:
    """Load an HTML page (``make demo``'s report.html) in headless Chromium, ``width`` pixels wide, and list what is
    wider than the page: a table, code block or image reaching past the page's content, or a sideways scroll.

    Returns:
        The problems; empty when everything fits.
    """
    source = Path(html_path)
    with tempfile.TemporaryDirectory(prefix="detox-sft-widths-") as tmp:
        copy = Path(tmp) / source.name
        copy.write_text(source.read_text().replace("</body>", f"<script>{_WIDTH_JS}</script></body>"))
        proc = _chromium(
            ["--dump-dom", f"--window-size={width},900", "--virtual-time-budget=1000", copy.as_uri()], chromium
        )
    match = re.search(r'<body[^>]*\sdata-widths="([^"]*)"', proc.stdout)
    if not match:
        return [f"the width check did not run in Chromium: {proc.stderr.strip()[-300:]}"]
    return json.loads(html.unescape(match.group(1)))


def screenshot_deck(html_path: str | Path, png_path: str | Path, num_slides: int, chromium: str | None = None) -> Path:
    """One PNG of the whole deck, slides stacked (slide i at y = i * 720)."""
    png = Path(png_path).resolve()
    png.unlink(missing_ok=True)
    proc = _chromium(
        [
            f"--screenshot={png}",
            f"--window-size={SLIDE_W},{SLIDE_H * num_slides}",
            "--virtual-time-budget=1000",
            Path(html_path).resolve().as_uri(),
        ],
        chromium,
    )
    if not png.is_file():
        raise SlidesError(f"Chromium wrote no screenshot ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return png


# ----------------------------------------------------------------------------------------------------- cli


def main(argv: list[str] | None = None) -> int:
    """``python -m detox_sft.dev.slides slides/``: render HTML, check it in Chromium, print the PDF."""
    parser = argparse.ArgumentParser(prog="python -m detox_sft.dev.slides", description=__doc__.split("\n\n")[0])
    parser.add_argument("deck_dir", nargs="?", default="slides", help="folder holding deck.md (default: slides)")
    parser.add_argument("--run-dir", help="run whose figures and results to use (default: newest runs/* with figures)")
    parser.add_argument("--out", help="output folder (default: <deck_dir>/build)")
    parser.add_argument("--benchmarks", help="BENCHMARKS.md to quote (default: next to the deck folder)")
    parser.add_argument("--strict", action="store_true", help="fail on pending placeholders")
    parser.add_argument("--no-pdf", action="store_true", help="HTML only (no Chromium needed)")
    args = parser.parse_args(argv)
    try:
        deck = render_deck(args.deck_dir, args.run_dir, args.out, args.benchmarks, args.strict)
        print(f"run: {deck.run_dir}\nhtml: {deck.html} ({deck.num_slides} slides, {len(deck.figures)} figures)")
        for item in deck.pending:
            print(f"PENDING {item}")
        if args.no_pdf:
            return 0
        problems = check_deck(deck.html)
        if problems:
            raise SlidesError("The rendered deck has problems: " + "; ".join(problems))
        print(f"pdf: {print_pdf(deck.html)}")
    except SlidesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
