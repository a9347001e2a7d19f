"""The background deck: slides/deck.ipynb executed on a run or on the committed record, rendered as reveal.js slides.

The deck's numbers and figures come from its code cells; these tests execute it on the committed record
(results/offline) and on a run directory laid out as the pipeline writes one, and read the HTML back. The browser
tests (screenshot, PDF) skip, saying so, where Debian's `chromium` is not installed (.ci/run installs it when it can).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from detox_sft.config import ARMS, RunPaths
from detox_sft_dev import slides

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "results" / "offline"


@pytest.fixture(scope="module")
def record_deck(tmp_path_factory) -> Path:
    """The deck as `make slides` renders it (HTML, and the PDF where Chromium is installed), on the record."""
    out = tmp_path_factory.mktemp("deck")
    assert slides.main([str(ROOT / "slides"), "--run-dir", str(RECORD), "--out", str(out)]) == 0
    return out / "deck.slides.html"


def _images(page: str) -> list[str]:
    return re.findall(r'<img[^>]+src="data:image/png;base64,', page)


def test_the_deck_shows_the_records_numbers_and_figures(record_deck):
    page = record_deck.read_text()
    record = json.loads((RECORD / "record.json").read_text())
    headline = record["headline"]["detox - raw EMT"].removeprefix("EMT ")  # "-0.180 [-0.245, -0.125]"
    assert headline in page
    assert record["headline"]["raw EMT"] in page and record["headline"]["detox EMT"] in page
    assert len(_images(page)) == 2  # the loss curves and the metric bars, embedded (the page is self-contained)
    # the reading is on the slides: why EMT and TP coincide, why both tuned arms are above the base model
    assert "binary judge" in page and "fine-tuned on continuations of toxic prompts" in page
    # measurements from benchmarks/results/*.json; no to-do on a slide
    speedup = json.loads((ROOT / "benchmarks" / "results" / "rephrase.json").read_text())["results"][0]["speedup"]
    assert f"{speedup:.1f}x" in page
    assert "not recorded yet" not in page.lower() and "Traceback" not in page
    assert page.count("<section") >= 15


def test_the_deck_cells_print_no_noise_and_show_no_code(record_deck):
    executed = nbformat.read(record_deck.with_name("deck.ipynb"), as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type in ("stream", "error")], "a deck cell printed text or failed"
    assert "import pandas" not in record_deck.read_text()  # inputs hidden


def test_a_run_directory_gives_the_same_deck_with_its_worked_example(tmp_path):
    """`make slides` after `make demo`: the run's own layout (eval/, data/, adapters/), recipe.json beside it."""
    run = tmp_path / "runs" / "20990101-000000" / "run"
    paths = RunPaths(run)
    paths.eval.mkdir(parents=True)
    shutil.copy(RECORD / "results.json", paths.results)
    paths.data.mkdir()
    (paths.data / "rephrase_summary.jsonl").write_text(
        (RECORD / "rephrase_summary.json").read_text().replace("\n", "") + "\n"
    )
    train = json.loads((RECORD / "notebooks" / "1-sft.json").read_text())["train"]
    for arm in ARMS:
        paths.adapter(arm).mkdir(parents=True)
        (paths.adapter(arm) / "metrics.json").write_text(json.dumps(train[arm]))
    shutil.copy(RECORD / "recipe.json", run.parent / "recipe.json")
    sample = {"prompt": "Shut up, you", "toxicity_before": 0.9, "toxicity_after": 0.2, "rephrased": True}
    rows = [
        {**sample, "original_continuation": "stupid idiot", "continuation": "silly person"},
        {**sample, "original_continuation": "a kind person", "continuation": "a kind person", "rephrased": False},
    ]
    paths.train_set("detox").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert slides.find_run_dir(tmp_path) == run
    page = slides.render_deck(run, tmp_path / "build").read_text()
    assert "A worked example from this run" in page and "stupid idiot" in page and "silly person" in page
    assert "run <code>20990101-000000</code>" in page
    assert json.loads((RECORD / "record.json").read_text())["headline"]["detox - raw EMT"].removeprefix("EMT ") in page


def test_the_default_run_is_the_newest_with_results_else_the_record(tmp_path):
    assert slides.find_run_dir(tmp_path) == tmp_path / "results" / "offline"
    for name, when in (("old", 1), ("new", 2)):
        RunPaths(tmp_path / "runs" / name).eval.mkdir(parents=True)
        RunPaths(tmp_path / "runs" / name).results.write_text("{}")
        os.utime(RunPaths(tmp_path / "runs" / name).results, (when, when))
    (tmp_path / "runs" / "empty").mkdir()
    assert slides.find_run_dir(tmp_path) == tmp_path / "runs" / "new"
    with pytest.raises(slides.SlidesError, match="make demo"):
        slides.render_deck(tmp_path / "runs" / "empty", tmp_path / "build")


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = slides.find_chromium()
    if exe is None:
        pytest.skip(
            "chromium not installed (Debian: apt-get install -y chromium): the deck is not screenshot or printed"
        )
    return exe


def test_the_deck_renders_in_chromium_and_prints_to_pdf(record_deck, chromium, tmp_path):
    from PIL import Image, ImageStat

    png = tmp_path / "deck.png"
    args = [f"--screenshot={png}", "--window-size=1280,720", "--virtual-time-budget=5000", record_deck.as_uri()]
    slides.chromium(args, chromium)
    assert ImageStat.Stat(Image.open(png).convert("L")).stddev[0] > 5, "the rendered deck looks blank"
    pdf = record_deck.with_name("deck.pdf")  # printed by the command
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 10_000
