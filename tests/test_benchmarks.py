"""The rephrase benchmark's arithmetic count, checked against torch's own FLOP counter on real model calls."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "rephrase.py"


def _bench_module():
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
