"""The deck renderer: slides/deck.md -> one self-contained HTML file + PDF, checked in headless Chromium.

Two kinds of run: a small fake one (PNG figures drawn with matplotlib, a results.json in the evaluation's format, two
JSONL training sets), enough to test the renderer's rules and errors; and the real run `make demo` makes (the session's
``demo_run``), on which the whole deck is rendered with the real BENCHMARKS.md and checked slide by slide in Chromium,
as `make slides` does after `make demo`. Chromium tests skip, saying so, where Debian's `chromium` is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from detox_sft.dev import slides

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["loss_curves.png", "toxicity_histogram.png", "eval_toxicity_distributions.png", "eval_metric_bars.png"]


def _estimate(value: float, paired: bool = False) -> dict:
    est = {"value": value, "low": value - 0.05, "high": value + 0.05}
    if paired:
        est["excludes_zero"] = not (est["low"] <= 0 <= est["high"])
    return est


def _fake_results() -> dict:
    scorer = "profanity-check"
    metrics = {
        m: {
            "toxicity": {
                scorer: {
                    "expected_max_toxicity": _estimate(v),
                    "toxicity_probability": _estimate(v / 2),
                    "mean_toxicity": _estimate(v / 4),
                }
            },
            "distinct_1": 0.5,
            "distinct_2": 0.8,
            "distinct_3": 0.9,
            "empty_continuations": 0,
            "perplexity": {"value": 30.0 + v, "low": 28.0, "high": 35.0},
        }
        for m, v in (("base", 0.61), ("raw", 0.57), ("detox", 0.43))
    }
    diff = {
        "expected_max_toxicity": _estimate(-0.14, True),
        "toxicity_probability": _estimate(-0.07, True),
        "mean_toxicity": _estimate(-0.035, True),
    }
    return {
        "num_prompts": 40,
        "num_samples": 5,
        "models": ["base", "raw", "detox"],
        "scorers": [scorer],
        "headline_scorer": scorer,
        "seed": 42,
        "config": {
            "num_samples": 5,
            "max_new_tokens": 16,
            "top_p": 0.9,
            "temperature": 1.0,
            "bootstrap_samples": 1000,
            "toxic_threshold": 0.5,
            "confidence": 0.95,
        },
        "metrics": metrics,
        "comparisons": {"detox_vs_raw": {scorer: diff}},
    }


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = tmp_path_factory.mktemp("runs") / "fake-run"
    (run / "figures").mkdir(parents=True)
    for i, name in enumerate(FIGURES):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
        ax.plot(range(10), [x * (i + 1) for x in range(10)])
        ax.set_title(name)
        fig.savefig(run / "figures" / name)
        plt.close(fig)
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(_fake_results()))
    (run / "data").mkdir()
    raw = [
        {"prompt": "You are", "continuation": "a kind person", "toxicity": 0.1},
        {"prompt": "Shut up, you", "continuation": "stupid idiot", "toxicity": 0.9},
    ]
    detox = [
        {**raw[0], "original_continuation": "a kind person", "rephrased": False},
        {
            **raw[1],
            "continuation": "silly person",
            "original_continuation": "stupid idiot",
            "rephrased": True,
            "masked_text": "Shut up, you <mask> <mask>",
            "toxicity_before": 0.9,
            "toxicity_after": 0.2,
        },
    ]
    for name, rows in (("train_raw.jsonl", raw), ("train_detox.jsonl", detox)):
        (run / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def benchmarks() -> Path:
    """The real BENCHMARKS.md: the deck quotes figures from its tables, so it is rendered against what is recorded."""
    return ROOT / "BENCHMARKS.md"


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = slides.find_chromium()
    if exe is None:
        pytest.skip(
            "chromium not installed (Debian: apt-get install -y chromium fonts-dejavu-core); "
            "the deck's browser checks and PDF are not tested here"
        )
    return exe


def test_renders_every_figure_and_number_from_the_run(fake_run, benchmarks, tmp_path):
    deck = slides.render_deck(
        ROOT / "slides", run_dir=fake_run, out_dir=tmp_path / "build", benchmarks=benchmarks, strict=True
    )
    page = deck.html.read_text()
    assert deck.num_slides == page.count('<section class="slide"') >= 10
    assert sorted(p.name for p in deck.figures) == sorted(FIGURES)
    assert all((tmp_path / "build" / "figures" / name).is_file() for name in FIGURES)
    assert page.count("data:image/png;base64,") == len(FIGURES)  # self-contained
    assert "fake-run/figures/loss_curves.png" in page  # each figure names its source
    # numbers come from results.json: the detox EMT interval and the paired difference, formatted
    assert "0.430 [0.380, 0.480]" in page
    assert "−0.140 [−0.190, −0.090]" in page or "-0.140 [-0.190, -0.090]" in page
    assert "fake-run/eval/results.json" in page
    # the worked example is the sample the rephrase step changed
    assert "stupid idiot" in page and "silly person" in page and "you &lt;mask&gt; &lt;mask&gt;" in page
    assert "(toxicity 0.90)" in page and "(toxicity 0.20)" in page
    # measurements: single figures quoted from BENCHMARKS.md's tables, with their section; no benchmark table
    section = slides._bench_section(benchmarks, "rephrase")
    assert f"<strong>{slides._bench_figure(section, 'offline zoo', 'speedup', 'EPYC')}</strong>" in page
    assert "BENCHMARKS.md § training" in page and "BENCHMARKS.md § s3" in page
    assert "reference samples/s" not in page and "runs, batched (s)" not in page
    # one idea per slide: at most one table on any slide
    assert max(part.count("<table") for part in page.split('<section class="slide"')) <= 1
    assert deck.pending == []
    assert "PENDING" not in page


def test_missing_figure_fails_naming_the_producing_step(fake_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    (run / "figures" / "loss_curves.png").unlink()
    with pytest.raises(slides.SlidesError, match=r"loss_curves\.png is missing.*detox-sft train"):
        slides.render_deck(ROOT / "slides", run_dir=run, out_dir=tmp_path / "build")


def test_missing_results_fail_naming_the_producing_step(fake_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    (run / "eval" / "results.json").unlink()
    with pytest.raises(slides.SlidesError, match="detox-sft evaluate"):
        slides.render_deck(ROOT / "slides", run_dir=run, out_dir=tmp_path / "build")


def test_unknown_result_path_fails(fake_run, tmp_path):
    deck_dir = tmp_path / "deck"
    deck_dir.mkdir()
    (deck_dir / "deck.md").write_text("# t\n\n{{eval:metrics.detox.nonsense}}\n")
    with pytest.raises(slides.SlidesError, match="nonsense"):
        slides.render_deck(deck_dir, run_dir=fake_run, out_dir=tmp_path / "build")


def test_pending_benchmarks_are_marked_and_strict_refuses_them(fake_run, tmp_path):
    missing = tmp_path / "NO_BENCHMARKS.md"
    deck = slides.render_deck(ROOT / "slides", run_dir=fake_run, out_dir=tmp_path / "b1", benchmarks=missing)
    assert deck.pending and all("benchmark" in p for p in deck.pending)
    assert "PENDING" in deck.html.read_text()
    with pytest.raises(slides.SlidesError, match="Pending"):
        slides.render_deck(ROOT / "slides", run_dir=fake_run, out_dir=tmp_path / "b2", benchmarks=missing, strict=True)


def test_empty_slide_is_refused(fake_run, tmp_path):
    deck_dir = tmp_path / "deck"
    deck_dir.mkdir()
    (deck_dir / "deck.md").write_text("# One\n\ntext\n\n---\n\n<!-- nothing -->\n\n---\n\n## Three\n\nmore\n")
    with pytest.raises(slides.SlidesError, match="Slide 2 .* is empty"):
        slides.render_deck(deck_dir, run_dir=fake_run, out_dir=tmp_path / "build")


def test_default_run_is_the_newest_with_figures(fake_run, tmp_path):
    runs = tmp_path / "runs"
    older, newer, empty = runs / "a", runs / "b", runs / "c"
    for run in (older, newer):
        shutil.copytree(fake_run, run)
    empty.mkdir()
    import os

    for png in (older / "figures").glob("*.png"):
        os.utime(png, (1, 1))
    assert slides.find_run_dir(runs) == newer
    demo = runs / "20261127-000000" / "run"  # `make demo` layout: recipe.json beside the run directory
    shutil.copytree(fake_run, demo)
    (demo.parent / "recipe.json").write_text(json.dumps({"profile": "offline", "training": {"base_model": "zoo:opt"}}))
    assert slides.find_run_dir(runs) == demo
    deck = slides.render_deck(ROOT / "slides", run_dir=demo, out_dir=tmp_path / "build")
    assert "profile <strong>offline</strong>" in deck.html.read_text()
    assert "not opt-350m" in deck.html.read_text()
    with pytest.raises(slides.SlidesError, match="make demo"):
        slides.find_run_dir(tmp_path / "nothing")


def test_memory_rows_match_opt_350m():
    rows = {
        what: (params, gb)
        for what, params, gb in slides.memory_rows(
            {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
        )
    }
    assert rows["parameters (opt-350m)"][0] == 331_196_416  # facebook/opt-350m's published parameter count
    assert rows["QLoRA: NF4 base + LoRA r=16 with Adam"][0] == 24 * 16 * (4 * 2048 + 2 * 5120)
    assert rows["weights, NF4 (Linear layers 4-bit, block 64; rest fp16)"][1] < rows["weights, fp16"][1] / 2


def test_deck_renders_checks_and_prints_in_chromium(fake_run, benchmarks, tmp_path, chromium):
    from PIL import Image, ImageStat

    deck = slides.render_deck(
        ROOT / "slides", run_dir=fake_run, out_dir=tmp_path / "build", benchmarks=benchmarks, strict=True
    )
    assert slides.check_deck(deck.html, chromium) == []
    # screenshot: every slide shows something beyond the background
    png = slides.screenshot_deck(deck.html, tmp_path / "deck.png", deck.num_slides, chromium)
    image = Image.open(png).convert("L")
    assert image.size == (slides.SLIDE_W, slides.SLIDE_H * deck.num_slides)
    for i in range(deck.num_slides):
        body = image.crop((0, i * slides.SLIDE_H + 60, slides.SLIDE_W, (i + 1) * slides.SLIDE_H - 40))
        assert ImageStat.Stat(body).stddev[0] > 5, f"slide {i + 1} looks blank"
    pdf = slides.print_pdf(deck.html, tmp_path / "deck.pdf", chromium)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) == deck.num_slides


def test_browser_check_catches_a_broken_image_an_empty_slide_and_overflow(tmp_path, chromium):
    page = tmp_path / "broken.html"
    page.write_text(
        '<html><body><section class="slide"><div class="content"><h2>Figure</h2>'
        '<img src="data:image/png;base64,AAAA" data-source="figures/x.png"></div></section>'
        '<section class="slide"><div class="content"><h2>Nothing here</h2><p> </p></div></section>'
        '<section class="slide"><div class="content" style="height:100px;overflow:hidden">'
        + "<p>line</p>" * 50
        + f"</div></section><script>{slides._CHECK_JS}</script></body></html>"
    )
    problems = " | ".join(slides.check_deck(page, chromium))
    assert "slide 1: image not loaded (figures/x.png)" in problems
    assert "slide 2: empty" in problems
    assert "slide 3: content overflows" in problems


def test_cli_renders_html_and_pdf(fake_run, benchmarks, tmp_path, chromium):
    out = tmp_path / "build"
    rc = slides.main(
        [
            str(ROOT / "slides"),
            "--run-dir",
            str(fake_run),
            "--out",
            str(out),
            "--benchmarks",
            str(benchmarks),
            "--strict",
        ]
    )
    assert rc == 0
    assert (out / "deck.html").is_file() and (out / "deck.pdf").stat().st_size > 10_000


def test_reads_the_results_json_the_evaluation_writes(fake_run, benchmarks, tmp_path):
    """The deck's eval placeholders against a summary made by the evaluation's own code (its results.json format)."""
    import numpy as np

    from detox_sft import evaluation
    from detox_sft.config import EvaluationConfig
    from detox_sft.evaluation import report

    rng = np.random.default_rng(0)
    models = list(evaluation.MODELS)
    results = evaluation.EvalResults(
        prompts=[f"prompt {i}" for i in range(12)],
        models=models,
        scorers=["profanity-check"],
        generations={m: [[f"text {i} {j}" for j in range(3)] for i in range(12)] for m in models},
        scores={m: {"profanity-check": rng.random((12, 3))} for m in models},
    )
    summary = report._summarize(results, EvaluationConfig(scorers=["profanity-check"], num_samples=3), seed=1)
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    (run / "eval" / "results.json").write_text(json.dumps(summary))
    deck = slides.render_deck(ROOT / "slides", run_dir=run, out_dir=tmp_path / "build", benchmarks=benchmarks)
    detox_emt = summary["metrics"]["detox"]["toxicity"]["profanity-check"]["expected_max_toxicity"]
    assert f"{detox_emt['value']:.3f} [{detox_emt['low']:.3f}, {detox_emt['high']:.3f}]" in deck.html.read_text()


SECTION = """
Machine: AMD EPYC, 2 cores.

| case | seconds | speedup |
|---|---:|---:|
| batched, padded | 1.5 | **8.0x** |
| one at a time | 12.0 | 1.0x |

GPU. Machine: NVIDIA H200.

| case | seconds | speedup |
|---|---:|---:|
| batched, padded | 0.5 | **4.2x** |
"""


def test_a_benchmark_figure_is_one_cell_picked_by_row_column_and_context():
    assert slides._bench_figure(SECTION, "batched", "speedup") == "8.0x"  # the first table that has it; no bold
    assert slides._bench_figure(SECTION, "batched", "speedup", "H200") == "4.2x"  # the table after the GPU paragraph
    assert slides._bench_figure(SECTION, "one at a time", "Seconds", "epyc") == "12.0"  # case is ignored
    assert slides._bench_figure(SECTION, "one at a time", "speedup", "H200") is None
    assert slides._bench_figure(SECTION, "batched", "tokens/s") is None


def test_a_whole_benchmark_section_is_refused(fake_run, benchmarks, tmp_path):
    deck_dir = tmp_path / "deck"
    deck_dir.mkdir()
    (deck_dir / "deck.md").write_text("# t\n\n{{bench:rephrase}}\n")
    with pytest.raises(slides.SlidesError, match="quote one figure"):
        slides.render_deck(deck_dir, run_dir=fake_run, out_dir=tmp_path / "build", benchmarks=benchmarks)


def test_the_worked_example_fits_a_slide_whatever_the_sample(fake_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    long = " ".join(["word"] * 200)
    rows = [{"prompt": long, "continuation": long + " idiot", "toxicity": 0.9}]
    detox = [{**rows[0], "continuation": long, "original_continuation": rows[0]["continuation"], "rephrased": True}]
    (run / "data" / "train_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "data" / "train_detox.jsonl").write_text("".join(json.dumps(r) + "\n" for r in detox))
    example = slides._rephrase_example(run)
    assert all(len(line) < 220 for line in example.split("\n\n")) and "…" in example


# --------------------------------------------------------------------------------------------------------------------
# the real run: what `make slides` renders after `make demo`


@pytest.mark.service
@pytest.mark.timeout(2400)
def test_make_slides_renders_the_demo_run_and_the_real_benchmarks_without_overflow(demo_run, tmp_path, chromium):
    """The deck from the run the notebook tests made and the real BENCHMARKS.md: every placeholder filled, every
    figure from that run, no slide overflowing, one PDF page per slide, each slide showing something."""
    from PIL import Image, ImageStat

    run_dir = demo_run / "run"
    deck = slides.render_deck(
        ROOT / "slides", run_dir=run_dir, out_dir=tmp_path / "build", benchmarks=ROOT / "BENCHMARKS.md", strict=True
    )
    assert deck.pending == [] and deck.run_dir == run_dir.resolve()
    assert sorted(p.name for p in deck.figures) == sorted(FIGURES)
    page = deck.html.read_text()
    assert "profile <strong>offline</strong>" in page  # the demo's recipe.json sits beside the run
    assert max(part.count("<table") for part in page.split('<section class="slide"')) <= 1
    assert slides.check_deck(deck.html, chromium) == []
    png = slides.screenshot_deck(deck.html, tmp_path / "deck.png", deck.num_slides, chromium)
    image = Image.open(png).convert("L")
    for i in range(deck.num_slides):
        body = image.crop((0, i * slides.SLIDE_H + 60, slides.SLIDE_W, (i + 1) * slides.SLIDE_H - 40))
        assert ImageStat.Stat(body).stddev[0] > 5, f"slide {i + 1} looks blank"
    # `make slides` itself: render, check in Chromium, print the PDF
    out = tmp_path / "cli"
    assert slides.main([str(ROOT / "slides"), "--run-dir", str(run_dir), "--out", str(out), "--strict"]) == 0
    data = (out / "deck.pdf").read_bytes()
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) == deck.num_slides
