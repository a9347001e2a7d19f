"""Render the background deck, slides/deck.ipynb, on a run: reveal.js slides (HTML) and a PDF.

    detox-sft-dev slides [DECK_DIR] [--run-dir D] [--out DIR]      # make slides

The deck is a notebook whose cells carry ``slideshow.slide_type``; its code cells read the run (or the committed
record results/offline/) and benchmarks/results/*.json and display the tables, figures and sentences. This module
executes it with papermill (parameters ``run_dir``, ``benchmarks_dir``), drops the code cells that displayed nothing (a
slide whose figure this run has no record of), renders ``<DECK_DIR>/build/deck.slides.html`` with nbconvert's
``SlidesExporter`` (code hidden; reveal.js is loaded from nbconvert's CDN URL) and prints ``deck.pdf`` with headless
Chromium when it is installed (Debian: ``apt-get install chromium``). Without network access reveal.js does not load:
the HTML then reads as one long page, and so does the PDF.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from detox_sft.config import RunPaths

__all__ = [
    "SlidesError",
    "find_run_dir",
    "render_deck",
    "find_chromium",
    "chromium",
    "print_pdf",
    "check_widths",
    "main",
]

ROOT = Path(__file__).resolve().parents[2]


class SlidesError(RuntimeError):
    """The deck cannot be rendered as asked; the message says what to run or fix."""


def find_run_dir(root: str | Path = ROOT) -> Path:
    """The newest run under ``<root>/runs`` holding ``eval/results.json`` (``runs/<name>/`` or, from ``make demo``,
    ``runs/<stamp>/run/``), else the committed record ``<root>/results/offline``."""
    root = Path(root)
    runs = [
        RunPaths(p.parents[1])
        for pattern in ("*/eval/results.json", "*/*/eval/results.json")
        for p in (root / "runs").glob(pattern)
    ]
    if runs:
        return max(runs, key=lambda p: p.results.stat().st_mtime).root
    return root / "results" / "offline"


def render_deck(run_dir: str | Path, out_dir: str | Path, deck_dir: str | Path = ROOT / "slides") -> Path:
    """Execute ``<deck_dir>/deck.ipynb`` on ``run_dir`` into ``out_dir/deck.ipynb`` and render
    ``out_dir/deck.slides.html``; returns the HTML's path.

    Raises:
        SlidesError: the deck failed on this run (the message names the cell's error).
    """
    import nbformat
    import papermill
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    deck_dir, out = Path(deck_dir).resolve(), Path(out_dir).resolve()
    if not (Path(run_dir) / "record.json").is_file() and not RunPaths(Path(run_dir)).results.is_file():
        raise SlidesError(f"No results in {run_dir} — run `make demo` (or the notebooks) first, or pass --run-dir.")
    out.mkdir(parents=True, exist_ok=True)
    executed = out / "deck.ipynb"
    parameters = {"run_dir": str(Path(run_dir).resolve()), "benchmarks_dir": str(ROOT / "benchmarks" / "results")}
    try:
        papermill.execute_notebook(
            str(deck_dir / "deck.ipynb"),
            str(executed),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(deck_dir),
            progress_bar=False,
            config=Config({"KernelManager": {"transport": "ipc"}}),  # no "running over TCP" warning in the output
        )
    except papermill.PapermillExecutionError as exc:
        raise SlidesError(f"The deck failed on {run_dir}: {exc.ename}: {exc.evalue} (see {executed})") from exc
    nb = nbformat.read(executed, as_version=4)
    nb.cells = [c for c in nb.cells if c.cell_type != "code" or c.outputs]  # a slide without its record is dropped
    exporter = SlidesExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": "deck"}})
    page = out / "deck.slides.html"
    tmp = page.with_suffix(".tmp")
    tmp.write_text(body)
    tmp.replace(page)
    return page


def find_chromium() -> str | None:
    """The headless browser: Debian's ``chromium`` (or chromium-browser / google-chrome), or None."""
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def chromium(args: list[str], exe: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with a throw-away profile (``--no-sandbox``: CI runs as root)."""
    exe = exe or find_chromium()
    if exe is None:
        raise SlidesError("Chromium not found — install it (Debian: `apt-get install -y chromium`).")
    with tempfile.TemporaryDirectory(prefix="detox-sft-chromium-") as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}"]
        return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=timeout)


def print_pdf(html_path: str | Path, pdf_path: str | Path, exe: str | None = None) -> Path:
    """Print the slides to PDF with reveal.js's print layout (``?print-pdf``)."""
    pdf = Path(pdf_path).resolve()
    pdf.unlink(missing_ok=True)
    url = Path(html_path).resolve().as_uri() + "?print-pdf"
    proc = chromium(["--no-pdf-header-footer", f"--print-to-pdf={pdf}", "--virtual-time-budget=10000", url], exe)
    if not pdf.is_file() or pdf.stat().st_size == 0:
        raise SlidesError(f"Chromium wrote no PDF ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return pdf


# Runs in the browser on a copy of a page (make demo's report.html): records the tables, code blocks, figures and
# images that reach past the page's content box, and a page that scrolls sideways, on <body data-widths>.
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


def check_widths(html_path: str | Path, exe: str | None = None, width: int = 1280) -> list[str]:
    """What is wider than an HTML page ``width`` pixels wide (a table, code block or image; a sideways scroll)."""
    source = Path(html_path)
    with tempfile.TemporaryDirectory(prefix="detox-sft-widths-") as tmp:
        copy = Path(tmp) / source.name
        copy.write_text(source.read_text().replace("</body>", f"<script>{_WIDTH_JS}</script></body>"))
        proc = chromium(["--dump-dom", f"--window-size={width},900", "--virtual-time-budget=1000", copy.as_uri()], exe)
    match = re.search(r'<body[^>]*\sdata-widths="([^"]*)"', proc.stdout)
    if not match:
        return [f"the width check did not run in Chromium: {proc.stderr.strip()[-300:]}"]
    return json.loads(html.unescape(match.group(1)))


def main(argv: list[str] | None = None) -> int:
    """``detox-sft-dev slides [DECK_DIR] [--run-dir D] [--out DIR]``: execute the deck, render HTML, print the PDF."""
    parser = argparse.ArgumentParser(prog="detox-sft-dev slides", description=__doc__.split("\n\n")[0])
    parser.add_argument("deck_dir", nargs="?", default=str(ROOT / "slides"), help="folder holding deck.ipynb")
    parser.add_argument("--run-dir", help="run to show (default: newest runs/* with results, else results/offline)")
    parser.add_argument("--out", help="output folder (default: <deck_dir>/build)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir) if args.run_dir else find_run_dir()
    try:
        page = render_deck(run_dir, args.out or Path(args.deck_dir) / "build", args.deck_dir)
        print(f"run: {run_dir}\nhtml: {page}")
        if find_chromium() is None:
            print("pdf: skipped, chromium is not installed (Debian: apt-get install -y chromium)")
        else:
            print(f"pdf: {print_pdf(page, page.with_name('deck.pdf'))}")
    except SlidesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
