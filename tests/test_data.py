"""Data loading: formatting, nulls, filters, split sizes, determinism, clear errors (local files; no zoo needed)."""

from __future__ import annotations

import json

import pytest

from detox_sft.config import DataConfig
from detox_sft.data import (
    DataError,
    load_eval_prompts,
    load_rows,
    load_train_dataset,
)
from detox_sft.prompts import format_sample


def _rtp_row(i: int, tox: float | None, cont: str = "and then it ended.") -> dict:
    return {
        "filename": f"{i:07d}.txt",
        "begin": 0,
        "end": 10,
        "challenging": False,
        "prompt": {"text": f"Prompt number {i} says", "toxicity": tox, "profanity": tox},
        "continuation": {"text": cont, "toxicity": 0.1, "profanity": 0.1},
    }


@pytest.fixture
def rtp_file(tmp_path):
    rows = [_rtp_row(i, None if i % 5 == 0 else i / 100) for i in range(100)]
    rows.append(_rtp_row(100, 0.9, cont="x" * 600))  # too long for max_chars=512
    path = tmp_path / "rtp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def wiki_dir(tmp_path):
    root = tmp_path / "wiki"
    root.mkdir()
    for split, n in (("train", 10), ("test", 40)):
        rows = [
            {"id": f"{split}{i}", "comment_text": f"comment {i} has one two three four five six seven", "label": i % 2}
            for i in range(n)
        ]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_train_dataset_columns_nulls_filter_and_split(rtp_file):
    cfg = DataConfig(train_dataset=str(rtp_file), num_train_samples=None, test_size=0.2, max_chars=512)
    ds = load_train_dataset(cfg, seed=0)
    assert set(ds) == {"train", "test"}
    assert {"prompt", "continuation", "toxicity", "toxicity_missing", "text"} <= set(ds["train"].column_names)
    assert len(ds["train"]) + len(ds["test"]) == 100  # the 600-char sample is dropped by max_chars
    assert len(ds["test"]) == 20
    rows = list(ds["train"]) + list(ds["test"])
    missing = [r for r in rows if r["toxicity_missing"]]
    assert len(missing) == 20 and all(r["toxicity"] == 0.0 for r in missing)
    assert all(r["text"] == format_sample(r["prompt"], r["continuation"]) for r in rows)


def test_min_toxicity_and_num_samples(rtp_file):
    cfg = DataConfig(train_dataset=str(rtp_file), num_train_samples=30, test_size=0.1, min_toxicity=0.5)
    ds = load_train_dataset(cfg, seed=1)
    rows = list(ds["train"]) + list(ds["test"])
    assert len(rows) == 30 and len(ds["test"]) == 3
    assert min(r["toxicity"] for r in rows) >= 0.5  # nulls count as 0 and are filtered out


def test_train_dataset_is_deterministic(rtp_file):
    cfg = DataConfig(train_dataset=str(rtp_file), num_train_samples=50)
    a, b = load_train_dataset(cfg, seed=7), load_train_dataset(cfg, seed=7)
    c = load_train_dataset(cfg, seed=8)
    assert a["train"]["text"] == b["train"]["text"] and a["test"]["text"] == b["test"]["text"]
    assert a["train"]["text"] != c["train"]["text"]


def test_saved_dataset_dir_is_accepted(tmp_path, rtp_file):
    from datasets import DatasetDict

    DatasetDict({"train": load_rows(str(rtp_file), "train")}).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(train_dataset=str(tmp_path / "saved"), num_train_samples=10)
    assert len(load_train_dataset(cfg, seed=0)["train"]) == 9


def test_eval_prompts(wiki_dir):
    cfg = DataConfig(eval_dataset=str(wiki_dir), eval_split="test", num_eval_prompts=5, eval_prompt_words=4)
    prompts = load_eval_prompts(cfg, seed=3)
    assert len(prompts) == 5 and all(len(p.split()) == 4 for p in prompts)
    odd = {f"comment {i} has one" for i in range(1, 40, 2)}
    assert set(prompts) <= odd  # label 1 rows only
    assert prompts == load_eval_prompts(cfg, seed=3)
    with pytest.warns(UserWarning, match="only 20 prompts"):
        assert len(load_eval_prompts(DataConfig(eval_dataset=str(wiki_dir), num_eval_prompts=500), seed=0)) == 20


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"not found.*Fix"):
        load_train_dataset(DataConfig(train_dataset=str(tmp_path / "nope.jsonl")), seed=0)
    with pytest.raises(DataError, match=r"no validation.jsonl"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "test.jsonl").write_text("{}\n")
        load_rows(str(tmp_path / "d"), "validation")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"allenai/no-such-dataset.*zoo:rtp"):
        load_rows("allenai/no-such-dataset", "train")


def test_missing_field_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": {"text": "a"}, "other": 1}) + "\n")
    with pytest.raises(DataError, match=r"continuation\.text"):
        load_train_dataset(DataConfig(train_dataset=str(path)), seed=0)
    wiki = tmp_path / "w.jsonl"
    wiki.write_text(json.dumps({"id": "1", "text": "x", "label": 1}) + "\n")
    with pytest.raises(DataError, match=r"comment_text"):
        load_eval_prompts(DataConfig(eval_dataset=str(wiki)), seed=0)


def test_zoo_corpora_load(zoo, offline_recipe):
    """The bundled corpora load through zoo: references with the offline recipe's settings."""
    ds = load_train_dataset(offline_recipe.data, offline_recipe.seed)
    n = offline_recipe.data.num_train_samples
    assert len(ds["train"]) + len(ds["test"]) == n
    toxic_share = sum(t >= 0.5 for t in ds["train"]["continuation_toxicity"]) / len(ds["train"])
    print(f"share of training continuations the offline scorer calls toxic: {toxic_share:.2f}")
    assert 0.35 <= toxic_share <= 0.55
    prompts = load_eval_prompts(offline_recipe.data, offline_recipe.seed)
    assert len(prompts) == offline_recipe.data.num_eval_prompts
    assert all(len(p.split()) <= offline_recipe.data.eval_prompt_words for p in prompts)
