"""Shared fixtures: the offline recipe in a temporary run directory, and the offline zoo (built once, cached)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def zoo():
    """The offline zoo (small OPT, BART base, expert / anti-expert, corpora), built on first use and cached."""
    from detox_sft import offline

    return offline.ensure_zoo()


@pytest.fixture
def offline_recipe(tmp_path):
    """The offline recipe with its run directory in a temporary folder."""
    from detox_sft.config import load_recipe

    return load_recipe("offline", run_dir=str(tmp_path / "run"))
