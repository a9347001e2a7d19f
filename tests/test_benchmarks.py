"""The rephrase benchmark's arithmetic count, checked against torch's own FLOP counter on real model calls."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "rephrase.py"


def _provenance():
    """benchmarks/provenance.py, under the name the benchmarks import it by."""
    if "provenance" not in sys.modules:
        path = _BENCH.with_name("provenance.py")
        spec = importlib.util.spec_from_file_location("provenance", path)
        sys.modules["provenance"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["provenance"])
    return sys.modules["provenance"]


def _bench_module():
    _provenance()
    spec = importlib.util.spec_from_file_location("bench_rephrase", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_rephrase"] = module
    spec.loader.exec_module(module)
    return module


def _matmul_flops(run) -> int:
    """FLOPs of the matrix products (linear layers, LM head) that ``run()`` performs, as torch counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        run()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))


def test_scoring_arithmetic_matches_torch_flop_counter(zoo):
    from detox_sft.compat import load_tmarco
    from detox_sft.config import RephraseConfig
    from detox_sft.rephrase import BatchedEngine

    bench = _bench_module()
    texts = ["you are a stupid idiot and everyone knows it", "thanks, that helps a lot", "ok"]
    cfg = RephraseConfig(base_model=str(zoo.bart_base), expert=str(zoo.expert), anti_expert=str(zoo.anti_expert))
    tmarco = load_tmarco(cfg.base_model, cfg.expert, cfg.anti_expert, device="cpu")
    work = bench.arithmetic(tmarco, texts)
    assert work["variants"] == sum(len(tmarco.tokenizer.tokenize(t)) for t in texts)

    # the reference: TrustyAI's own scoring, both experts, every variant through the whole model
    reference = _matmul_flops(lambda: tmarco.score(texts))
    assert reference == pytest.approx(2 * work["reference_gmac"] * 1e9, rel=1e-9)

    # the batched engine without padding (one row per encoder call, each decoder call stopping at its own row's
    # mask) does the least work plus the first layers' query/key/value projections it does not share
    engine = BatchedEngine.from_tmarco(tmarco, cfg)
    engine.max_batch_tokens, engine.call_tokens = 1, 0
    batched = _matmul_flops(lambda: engine.score(texts))
    config = tmarco.experts[0].config
    shared = 0
    for text in texts:
        for variant in engine._mask_variants(text):
            ids = tmarco.tokenizer(variant)["input_ids"]
            shared += 3 * config.d_model**2 * (len(ids) + ids.index(tmarco.tokenizer.mask_token_id) + 1)
    assert batched == pytest.approx(2 * (work["least_gmac"] * 1e9 + 2 * shared), rel=1e-9)
    assert batched < reference


def test_gemm_rate_is_a_positive_rate(zoo):
    from transformers import AutoConfig

    bench = _bench_module()
    rate = bench.gemm_rate(AutoConfig.from_pretrained(str(zoo.expert)), rows=256, repeats=2)
    assert 0.1 < rate < 1e5  # GFLOP/s: a real measurement, neither zero nor absurd


# --- BENCHMARKS.md: every section's figures trace to a committed result JSON -------------------------------------------

_ROOT = Path(__file__).resolve().parents[1]
_BOLD_NUMBER = __import__("re").compile(r"\*\*(\d+(?:\.\d+)?)(x|%| s| MiB)?\*\*")


def _sections() -> dict[str, str]:
    import re

    text = (_ROOT / "BENCHMARKS.md").read_text()
    parts = re.split(r"^## (\w+) — .*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def test_every_benchmark_section_names_a_committed_json_holding_its_headline_figures():
    """BENCHMARKS.md's sections: each names benchmarks/results/<name>.json, git tracks it, and every bold figure
    (the headlines: **9.2x**, **7.67 s**) is a value of that JSON at the precision shown (percentages also as
    fractions)."""
    import json
    import subprocess

    sections = _sections()
    assert {"s3", "generation", "rephrase", "training", "scale"} <= set(sections)
    tracked = subprocess.run(
        ["git", "ls-files", "benchmarks/results"], cwd=_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name, body in sections.items():
        record = f"benchmarks/results/{name}.json"
        assert record in body, f"section {name} does not name {record}"
        assert record in tracked, f"{record} is not committed"
        values = _numbers(json.loads((_ROOT / record).read_text()))
        for match in _BOLD_NUMBER.finditer(body):
            text, unit = match.group(1), match.group(2)
            decimals = len(text.partition(".")[2])
            wanted = float(text)
            candidates = values + ([v * 100 for v in values] if unit == "%" else [])
            assert any(round(v, decimals) == wanted for v in candidates), (
                f"{name}: **{match.group(0)}** not in {record}"
            )


# --- records tied to the code they measured (benchmarks/provenance.py) ------------------------------------------------


def _git(*args: str) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_every_record_was_measured_on_an_ancestor_of_head_or_says_re_measure():
    """Every record (benchmarks/results, its faults/, results/) with provenance names a commit that HEAD descends from
    (a record from a rebased-away or foreign commit cannot say what it measured); one without is reported "no
    provenance: re-measure", never passed as fresh."""
    import json

    prov = _provenance()
    paths = prov.records()
    assert {"benchmarks/results/s3.json", "results/offline/record.json"} <= {
        p.relative_to(_ROOT).as_posix() for p in paths
    }
    assert any("/faults/" in p.as_posix() for p in paths)
    for path in paths:
        record = json.loads(path.read_text())
        text = prov.status(record)
        if "provenance" not in record:
            assert text == "no provenance: re-measure"
            continue
        commit = record["provenance"]["commit"]
        assert not text.startswith("foreign"), f"{path}: commit {commit} is not an ancestor of HEAD; re-measure"
        assert text == "fresh" or text.startswith("stale since "), text


def _commit_labels_hidden(text: str) -> str:
    import re

    return re.sub(r"stale since [0-9a-f]{7,}( \(uncommitted changes\))?", "stale since <commit>", text)


def test_benchmarks_md_shows_each_records_computed_status():
    """BENCHMARKS.md's record-status block is what `provenance.py --pages` writes now: each record, fresh or stale, and
    the files that changed. The commit named in "stale since" is not compared: the commit that makes a record stale
    cannot be named in its own page (before it, the page says "(uncommitted changes)")."""
    prov = _provenance()
    page = (_ROOT / "BENCHMARKS.md").read_text()
    block = prov.BLOCK.search(page).group(0)
    assert _commit_labels_hidden(block) == _commit_labels_hidden(prov.BLOCK.search(prov.render_pages()).group(0)), (
        "BENCHMARKS.md's record status is out of date: run `.venv/bin/python benchmarks/provenance.py --pages`"
    )


def test_capture_names_the_commit_command_and_the_imported_modules_with_their_blobs():
    """The s3 benchmark measures its own script, the storage module it imports and what that imports, found from the
    import graph; each file's hash is git's blob hash of the file as it is now."""
    prov = _provenance()
    captured = prov.capture(_ROOT / "benchmarks" / "s3.py")
    assert captured["commit"] == _git("rev-parse", "HEAD")
    assert captured["clean"] == (_git("status", "--porcelain", "--untracked-files=no") == "")
    assert captured["command"][1:] == sys.argv[1:]
    files = captured["files"]
    assert {"benchmarks/s3.py", "src/detox_sft/storage.py", "src/detox_sft/__init__.py", "src/detox_sft_dev/s3.py"} <= (
        set(files)
    )
    assert "src/detox_sft/training.py" not in files  # not imported by the s3 benchmark
    for path, blob in files.items():
        assert blob == _git("hash-object", path)


def test_the_demo_measures_its_notebooks_their_imports_the_recipe_and_the_zoo():
    """A notebook's code cells count as a script (magics skipped); the zoo, reached through an entry point, is named."""
    from detox_sft_dev.provenance import measured_files

    files = measured_files(
        _ROOT / "notebooks" / "1-sft.ipynb", _ROOT / "recipes" / "offline.yaml", modules=["detox_sft_dev.zoo"]
    )
    assert {
        "notebooks/1-sft.ipynb",
        "recipes/offline.yaml",
        "src/detox_sft/training.py",
        "src/detox_sft_dev/zoo/build.py",
    } <= set(files)
    assert "src/detox_sft_dev/demo.py" not in files


def _repo(tmp_path):
    """A git repository with one measured module, a benchmark record of it and a page with a status block."""
    import json
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "m.py").write_text("x = 1\n")
    git("add", "m.py")
    git("commit", "-qm", "m")
    prov = {
        "commit": git("rev-parse", "HEAD"),
        "clean": True,
        "command": ["b.py"],
        "files": {"m.py": git("hash-object", "m.py")},
    }
    record = tmp_path / "benchmarks" / "results" / "b.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"provenance": prov}))
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# B\n\n<!-- record status: generated -->\n- old line\n<!-- end record status -->\n\n## b\n")
    return git, {"provenance": prov}, page


def test_a_record_whose_measured_file_changed_since_is_flagged_stale_on_the_page(tmp_path):
    """Status compares each measured file with the tree: unchanged is fresh; an uncommitted change is "stale since
    <commit> (uncommitted changes)"; once committed, "stale since <that commit>"; the page's block says so, bold."""
    prov = _provenance()
    git, record, page = _repo(tmp_path)
    measured_at = record["provenance"]["commit"][:7]
    assert prov.status(record, tmp_path) == "fresh"
    assert "- `benchmarks/results/b.json`: fresh (measured at" in prov.render_pages(page, tmp_path)
    (tmp_path / "m.py").write_text("x = 2\n")
    assert prov.status(record, tmp_path) == f"stale since {measured_at} (uncommitted changes): m.py"
    git("commit", "-qam", "change m")
    changed = git("rev-parse", "--short=7", "HEAD")
    assert prov.status(record, tmp_path) == f"stale since {changed}: m.py"
    rendered = prov.render_pages(page, tmp_path)
    assert (
        f"- `benchmarks/results/b.json`: **stale since {changed}**: m.py (measured at {measured_at}, clean tree)"
        in rendered
    )
    assert "old line" not in rendered and rendered.endswith("<!-- end record status -->\n\n## b\n")


def test_a_record_whose_commit_is_not_an_ancestor_of_head_is_foreign(tmp_path):
    """A record measured on a commit HEAD does not descend from (another branch, a rewritten history) is "foreign",
    which the record test above fails on, even when its files match."""
    prov = _provenance()
    git, record, _ = _repo(tmp_path)
    git("checkout", "-q", "-b", "side")
    git("commit", "-q", "--allow-empty", "-m", "side")
    side = git("rev-parse", "HEAD")
    git("checkout", "-q", "main")
    record["provenance"]["commit"] = side
    assert prov.status(record, tmp_path) == f"foreign commit {side[:7]} (not an ancestor of HEAD): re-measure"
    assert prov.page_line(record, tmp_path).startswith("**foreign commit")


def test_record_run_takes_the_demos_start_provenance_and_each_kernels_cpu(tmp_path):
    """record_run copies what the demo wrote as it ran (provenance.json, kernels/<notebook>.json), never the git state
    at recording time; a run without them gets neither key."""
    import json

    spec = importlib.util.spec_from_file_location("record_run", _BENCH.with_name("record_run.py"))
    record_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record_run)
    demo = tmp_path / "20270101-000000"
    (demo / "kernels").mkdir(parents=True)
    prov = {"commit": "0" * 40, "clean": True, "command": ["detox-sft-dev", "demo"], "files": {}}
    (demo / "provenance.json").write_text(json.dumps(prov))
    cpu = {"torch_cpu_capability": "AVX2", "env": {"ATEN_CPU_CAPABILITY": "avx2"}}
    (demo / "kernels" / "2-eval.json").write_text(json.dumps(cpu))
    assert record_run.run_provenance(demo / "run") == {"provenance": prov, "cpu": {"2-eval": cpu}}
    assert record_run.run_provenance(tmp_path / "other" / "run") == {}


def test_a_benchmark_refuses_to_overwrite_a_record_made_with_other_parameters(tmp_path):
    """start() names the differing parameter and the fix, and --force (or the same parameters) goes ahead."""
    import argparse
    import json

    import pytest

    prov = _provenance()
    record = tmp_path / "s3.json"
    record.write_text(json.dumps({"provenance": {"command": ["benchmarks/s3.py", "--repeat", "5"]}}))

    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--repeat", type=int, default=3)
        return p

    script = _ROOT / "benchmarks" / "s3.py"
    p = parser()
    with pytest.raises(SystemExit, match=r"made by `benchmarks/s3.py --repeat 5`.*--repeat 5 -> 3.*--force"):
        prov.start(p, prov.parse_args(p, []), record, script)
    p = parser()
    assert prov.start(p, prov.parse_args(p, ["--repeat", "5"]), record, script)["files"]
    p = parser()
    assert prov.start(p, prov.parse_args(p, ["--force"]), record, script)["files"]


# --- the same numbers on any machine: the recipe's cpu_isa pins each kernel's arithmetic ----------------------------


def test_the_avx2_pins_reach_a_child_process_and_its_kernel_record_names_them(tmp_path):
    """A process started with CPU_PINS["avx2"] (as the demo starts its kernels) dispatches torch to AVX2, and
    kernel_setup records that capability and the pins as the kernel saw them."""
    import json
    import os
    import subprocess

    from detox_sft_dev.demo import CPU_PINS

    record = tmp_path / "kernel.json"
    code = f"from detox_sft_dev.demo import kernel_setup; kernel_setup({str(record)!r})"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **CPU_PINS["avx2"]}, check=True, timeout=120)
    seen = json.loads(record.read_text())
    assert seen["torch_cpu_capability"] == "AVX2" and seen["env"] == CPU_PINS["avx2"] and seen["torch_threads"] >= 1
