"""Your own data: the recipe's data section maps a user's columns (prompt + continuation, or one text split by words,
optional toxicity) from JSONL, Parquet, CSV or a datasets directory; a missing or wrongly typed column is an error
naming the mapping field and the columns there are; examples/my_data.jsonl runs through `detox-sft rephrase` and
`detox-sft train` with the mapping given as flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detox_sft.cli import main
from detox_sft.config import DataConfig, RecipeError, load_recipe
from detox_sft.data import DataError, load_eval_prompts, load_train_dataset, read_jsonl
from detox_sft.prompts import format_sample

ROOT = Path(__file__).resolve().parents[1]
MY_DATA = ROOT / "examples" / "my_data.jsonl"
MY_RECIPE = ROOT / "examples" / "my_recipe.yaml"
MAPPING = {"prompt_field": "question", "continuation_field": "answer", "toxicity_field": "tox_score"}


def _all(**kwargs) -> DataConfig:
    return DataConfig(num_train_samples=None, test_size=0.25, **kwargs)


def test_question_answer_columns_become_samples():
    rows = read_jsonl(MY_DATA)
    ds = load_train_dataset(_all(train_dataset=str(MY_DATA), **MAPPING), seed=0)
    samples = [*ds["train"], *ds["test"]]
    assert len(samples) == len(rows) == 48
    by_prompt = {r["question"]: r for r in rows}
    for sample in samples:
        row = by_prompt[sample["prompt"]]
        assert sample["continuation"] == row["answer"] and sample["toxicity"] == row["tox_score"]
        assert sample["text"] == format_sample(row["question"], row["answer"]) and not sample["toxicity_missing"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_text_column_from_csv_or_parquet_is_split_by_words(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"text": [f"{r['question']} {r['answer']}" for r in read_jsonl(MY_DATA)]})
    path = tmp_path / f"texts{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    ds = load_train_dataset(_all(train_dataset=str(path), text_field="text", text_prompt_words=5), seed=0)
    for sample in ds["train"]:
        assert len(sample["prompt"].split()) == 5 and sample["continuation"] and sample["toxicity_missing"]
        assert f"{sample['prompt']} {sample['continuation']}" in set(frame["text"])
    # the format is the recipe's, whatever the file is called
    renamed = path.rename(tmp_path / "texts.data")
    cfg = _all(train_dataset=str(renamed), text_field="text", format=suffix[1:])
    assert len(load_train_dataset(cfg, seed=0)["train"]) == len(ds["train"])
    with pytest.raises(DataError, match="data.format"):
        load_train_dataset(_all(train_dataset=str(renamed), text_field="text"), seed=0)


def test_a_datasets_directory_loads_with_format_hub(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.jsonl").write_text(MY_DATA.read_text())
    ds = load_train_dataset(_all(train_dataset=str(tmp_path / "mine"), format="hub", **MAPPING), seed=0)
    assert len(ds["train"]) + len(ds["test"]) == 48


def test_eval_prompts_from_mapped_columns():
    cfg = DataConfig(
        eval_dataset=str(MY_DATA), eval_text_field="answer", eval_label=None, eval_prompt_words=3, num_eval_prompts=48
    )
    prompts = load_eval_prompts(cfg, seed=0)
    assert len(prompts) == 48 and all(len(p.split()) == 3 for p in prompts)


def test_missing_or_wrongly_typed_columns_name_the_mapping_field_and_the_columns():
    columns = "columns: id, question, answer, tox_score"
    cases = [
        ({**MAPPING, "prompt_field": "query"}, rf"data\.prompt_field: 'query' is not a column .*\({columns}\)"),
        ({**MAPPING, "toxicity_field": "toxicity"}, rf"data\.toxicity_field: 'toxicity' is not a column .*{columns}"),
        ({**MAPPING, "prompt_field": "tox_score"}, r"data\.prompt_field: column 'tox_score' holds float .*not text"),
        ({**MAPPING, "toxicity_field": "answer"}, r"data\.toxicity_field: column 'answer' holds 'Trim.*\[0, 1\]"),
        ({}, rf"has no field 'prompt' \({columns}\).*data\.prompt_field"),  # the default schema names the mapping
    ]
    for mapping, message in cases:
        with pytest.raises(DataError, match=message):
            load_train_dataset(_all(train_dataset=str(MY_DATA), **mapping), seed=0)
    with pytest.raises(DataError, match=r"data\.eval_text_field: 'comment_text' is not a column .*question"):
        load_eval_prompts(DataConfig(eval_dataset=str(MY_DATA)), seed=0)


def test_a_mapping_is_checked_when_the_recipe_loads():
    bad = [
        ({"data.prompt_field": "question"}, r"data\.continuation_field: is unset while data\.prompt_field"),
        ({"data.text_field": "t", "data.prompt_field": "q", "data.continuation_field": "a"}, r"data\.text_field"),
        ({"data.format": "xlsx"}, r"data\.format: got 'xlsx'.*parquet, csv or hub"),
        ({"data.eval_text_field": ""}, r"data\.eval_text_field"),
    ]
    for dotted, message in bad:
        with pytest.raises(RecipeError, match=message):
            load_recipe("offline", dotted=dotted)
    recipe = load_recipe(MY_RECIPE)  # the committed example
    assert (recipe.data.prompt_field, recipe.data.continuation_field) == ("question", "answer")


def test_my_data_runs_through_rephrase_and_train_from_the_command_line(zoo, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [
        "--recipe",
        "offline",
        "--run-dir",
        str(run),
        "--data.train_dataset",
        str(MY_DATA),
        "--data.prompt_field",
        "question",
        "--data.continuation_field",
        "answer",
        "--data.toxicity_field",
        "tox_score",
        "--data.num_train_samples",
        "16",
        "--data.test_size",
        "0.25",
    ]
    # a JSONL of your own, one field rephrased
    out = tmp_path / "answers.jsonl"
    assert main(["rephrase", "--input", str(MY_DATA), "--output", str(out), "--field", "answer", *flags]) == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [r["id"] for r in read_jsonl(MY_DATA)]
    assert all(r["rephrase_status"] for r in records)
    # the recipe's training set, mapped from your columns: both arms' files for `detox-sft train`
    assert main(["rephrase", "--no-progress", *flags]) == 0
    raw, detox = (read_jsonl(run / "data" / f"train_{arm}.jsonl") for arm in ("raw", "detox"))
    assert len(raw) == len(detox) == 12 and {r["prompt"] for r in raw} <= {r["question"] for r in read_jsonl(MY_DATA)}
    assert "12 training samples ->" in capsys.readouterr().out
    sft = ["--training.sft.max_steps", "2", "--training.sft.per_device_train_batch_size", "8"]
    assert main(["train", *flags, *sft]) == 0
    for arm in ("raw", "detox"):
        metrics = json.loads((run / "adapters" / arm / "metrics.json").read_text())
        assert metrics["num_train_samples"] == 12 and metrics["global_step"] == 2
    assert main(["rephrase", "--output", str(out), *flags]) == 2  # --output goes with --input
