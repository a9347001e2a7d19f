"""Upstream noise is silenced where it arises and nowhere else: importing the package changes no global setting, and
each silencer in detox_sft.compat drops only its own message and puts everything back afterwards."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from detox_sft import compat

IMPORT_EVERYTHING = """
import ast, importlib, json, pathlib, pkgutil, warnings
import datasets, matplotlib, transformers
from transformers.utils import logging as tf_logging
import detox_sft

# the third-party modules the package imports at module level (their own import-time filters are theirs): first
root = pathlib.Path(detox_sft.__file__).parent
for path in root.rglob("*.py"):
    for node in ast.parse(path.read_text()).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from scipy import stats`
        for name in names:
            if not name.startswith(("detox_sft", "__future__")):
                try:
                    importlib.import_module(name)
                except ModuleNotFoundError:  # `from X import name` of a class or function, not a module
                    pass

def state():
    return {
        "warnings": [repr(f) for f in warnings.filters],
        "transformers": tf_logging.get_verbosity(),
        "transformers_bars": tf_logging.is_progress_bar_enabled(),
        "datasets_bars": datasets.are_progress_bars_disabled(),
        "backend": matplotlib.get_backend(),
        "root_level": __import__("logging").getLogger().level,
    }

before = state()
names = [m.name for m in pkgutil.walk_packages(detox_sft.__path__, "detox_sft.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": len(names), "before": before, "after": state()}))
"""


def test_importing_every_module_changes_no_global_setting():
    """warnings filters, transformers' log level and bars, datasets' bars, matplotlib's backend, the root logger."""
    import json

    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] > 20
    assert result["after"] == result["before"]


def test_no_module_switches_matplotlib_backend():
    from pathlib import Path

    src = Path(compat.__file__).parent
    assert [p.name for p in src.rglob("*.py") if "matplotlib.use(" in p.read_text()] == []


def test_a_dropped_log_message_is_dropped_on_its_logger_only(caplog):
    log = logging.getLogger("detox_sft.tests.noisy")
    other = logging.getLogger("detox_sft.tests.other")
    with caplog.at_level(logging.WARNING), compat.drop_log_messages(log.name, r"known upstream notice"):
        log.warning("a known upstream notice, with details")
        log.warning("something else")
        other.warning("a known upstream notice on another logger")
    log.warning("a known upstream notice, after the block")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "something else",
        "a known upstream notice on another logger",
        "a known upstream notice, after the block",
    ]
    assert log.filters == []


def test_ignored_warnings_are_exactly_the_named_ones_and_the_filters_come_back():
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with compat.ignore_warnings(compat.PEFT_READS_IS_GRADIENT_CHECKPOINTING):
            warnings.warn(
                "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=2
            )
            warnings.warn(
                "`is_gradient_checkpointing` is deprecated", UserWarning, stacklevel=2
            )  # another category passes
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["`is_gradient_checkpointing` is deprecated", "another FutureWarning"]
    assert warnings.filters == before


def test_the_peft_warning_is_still_raised_upstream():
    """If transformers stops warning on ``is_gradient_checkpointing`` (or peft stops reading it), the filter can go."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
        )
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert any("is_gradient_checkpointing" in str(w.message) for w in seen)


@pytest.mark.parametrize("forced", [False, True])
def test_library_bars_go_off_inside_the_block_and_come_back(forced, monkeypatch):
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as tf_logging

    if forced:  # the user's own choice stays: nothing was on, nothing is turned on afterwards
        datasets.disable_progress_bars()
        tf_logging.disable_progress_bar()
    try:
        before = (
            datasets.are_progress_bars_disabled(),
            tf_logging.is_progress_bar_enabled(),
            hub.are_progress_bars_disabled(),
        )
        with compat.library_progress_bars_off():
            assert datasets.are_progress_bars_disabled()
            assert not tf_logging.is_progress_bar_enabled()
            assert hub.are_progress_bars_disabled()
        after = (
            datasets.are_progress_bars_disabled(),
            tf_logging.is_progress_bar_enabled(),
            hub.are_progress_bars_disabled(),
        )
        assert after == before
    finally:
        datasets.enable_progress_bars()
        tf_logging.enable_progress_bar()


def test_tmarco_rephrase_keeps_its_output_without_the_decoding_notice(tiny_bart):
    """TMaRCo.rephrase runs inside the drop of transformers' BPE clean-up notice, on this object only, same texts."""
    tmarco = compat.load_tmarco(str(tiny_bart.bart_base), str(tiny_bart.expert), str(tiny_bart.anti_expert))
    assert tmarco.rephrase.__wrapped__.__func__ is type(tmarco).rephrase
    text = ["you are a stupid idiot and what lovely day"]
    scores = tmarco.score(text)
    masked = tmarco.mask(text, threshold=1.0, scores=scores)
    out = tmarco.rephrase(text, scores=scores, masked_outputs=masked, threshold=1.0)
    assert out == type(tmarco).rephrase(tmarco, text, scores=scores, masked_outputs=masked, threshold=1.0)
    assert logging.getLogger(compat.BPE_CLEANUP_NOTICE[0]).filters == []
