"""Training samples and evaluation prompts, for both profiles, from a hub id or a local path.

Training data follows allenai/real-toxicity-prompts (``prompt.text``, ``continuation.text``, ``prompt.toxicity``
with some nulls); evaluation prompts follow OxAISH-AL-LLM/wiki_toxic (``comment_text``, ``label``). A reference is a
hub id, a local path (a JSONL file, a directory of ``<split>.jsonl`` files, or a directory written by
``datasets.save_to_disk``) or ``zoo:rtp`` / ``zoo:wiki_toxic`` for the bundled synthetic corpora.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "PROMPT_TEMPLATE",
    "RESPONSE_MARKER",
    "DataError",
    "format_sample",
    "load_rows",
    "load_train_dataset",
    "load_eval_prompts",
]

PROMPT_TEMPLATE = "Prompt: {prompt}\nContinuation: {continuation}"
RESPONSE_MARKER = "\nContinuation: "


class DataError(ValueError):
    """A dataset or a field is missing; the message names it and the fix."""


def format_sample(prompt: str, continuation: str) -> str:
    """The SFT text of one sample: ``"Prompt: {prompt}\\nContinuation: {continuation}"``.

    A generation prompt is ``format_sample(prompt, "")``, which ends with :data:`RESPONSE_MARKER`'s ``": "``.
    """
    return PROMPT_TEMPLATE.format(prompt=prompt.strip(), continuation=continuation.strip())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not valid JSON ({exc}). Fix: one JSON object per line.") from exc
    return rows


def load_rows(ref: str, split: str) -> Any:
    """Load one split of a dataset as a :class:`datasets.Dataset`.

    Args:
        ref: hub id, local path (JSONL file, directory of ``<split>.jsonl``, ``save_to_disk`` directory) or
            ``zoo:<name>``.
        split: the split to read (a single JSONL file is taken as the requested split).

    Raises:
        DataError: the dataset or the split cannot be found; the message says what to do.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    from detox_sft.config import resolve_ref

    resolved = resolve_ref(ref)
    path = Path(resolved)
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise DataError(
                f"dataset {ref!r}: {path} is not a JSONL file. Fix: give a .jsonl file, a directory of "
                "<split>.jsonl files or a datasets.save_to_disk directory."
            )
        return Dataset.from_list(_read_jsonl(path))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            saved = load_from_disk(str(path))
            if isinstance(saved, DatasetDict):
                if split not in saved:
                    raise DataError(
                        f"dataset {ref!r} has no split {split!r} (has {sorted(saved)}). "
                        "Fix: set the split in the recipe's data section."
                    )
                return saved[split]
            return saved
        for candidate in (path / f"{split}.jsonl", path / f"{split}.json"):
            if candidate.is_file():
                return Dataset.from_list(_read_jsonl(candidate))
        have = sorted(p.stem for p in path.glob("*.json*"))
        raise DataError(
            f"dataset {ref!r}: no {split}.jsonl in {path} (found: {have or 'nothing'}). Fix: set the "
            "split in the recipe's data section or add the file."
        )
    looks_local = ref.startswith((".", "/", "~")) or ref.endswith((".jsonl", ".json")) or ref.count("/") != 1
    if looks_local:
        raise DataError(
            f"dataset {ref!r} not found (no such file or directory). Fix: give an existing path, a hub "
            "id such as allenai/real-toxicity-prompts, or zoo:rtp / zoo:wiki_toxic."
        )
    try:
        from datasets import load_dataset

        return load_dataset(ref, split=split)
    except Exception as exc:  # the hub raises many kinds (offline, missing repo, missing split)
        raise DataError(
            f"cannot load dataset {ref!r} split {split!r} from the Hugging Face hub ({type(exc).__name__}:"
            f" {exc}). Fix: reach the hub, or use a local copy (path) or the offline profile's "
            "zoo:rtp / zoo:wiki_toxic (--recipe offline)."
        ) from exc


def _field(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _require(columns: list[str], first: dict[str, Any], names: list[str], ref: str) -> None:
    for name in names:
        try:
            _field(first, name)
        except KeyError:
            raise DataError(
                f"dataset {ref!r} has no field {name!r} (columns: {columns}). Fix: use a dataset in the "
                "allenai/real-toxicity-prompts schema (prompt.text, continuation.text, prompt.toxicity) "
                "or OxAISH-AL-LLM/wiki_toxic (comment_text, label)."
            ) from None


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def load_train_dataset(data_cfg: Any, seed: int) -> Any:
    """The SFT samples as ``DatasetDict(train, test)``.

    Columns: ``prompt``, ``continuation``, ``toxicity`` (the prompt's, nulls -> 0.0), ``toxicity_missing`` (was it
    null), ``continuation_toxicity`` (nulls -> 0.0) and ``text`` (:func:`format_sample`). Samples below
    ``data_cfg.min_toxicity`` or with a text longer than ``data_cfg.max_chars`` are dropped, then
    ``num_train_samples`` are drawn with ``seed`` and ``test_size`` of them held out.

    Args:
        data_cfg: a :class:`detox_sft.config.DataConfig`.
        seed: the recipe's seed (same seed, same samples and split).

    Raises:
        DataError: the dataset or a field is missing, or no sample survives the filters.
    """
    from datasets import Dataset, DatasetDict

    ds = load_rows(data_cfg.train_dataset, data_cfg.train_split)
    if len(ds) == 0:
        raise DataError(f"dataset {data_cfg.train_dataset!r} split {data_cfg.train_split!r} is empty.")
    first = ds[0]
    nested = isinstance(first.get("prompt"), dict)
    if nested:
        _require(ds.column_names, first, ["prompt.text", "continuation.text"], data_cfg.train_dataset)
    else:  # flat files: prompt / continuation strings, optional toxicity
        _require(ds.column_names, first, ["prompt", "continuation"], data_cfg.train_dataset)

    records = []
    for row in ds:
        if nested:
            prompt, cont = row["prompt"].get("text"), row["continuation"].get("text")
            tox, ctox = _num(row["prompt"].get("toxicity")), _num(row["continuation"].get("toxicity"))
        else:
            prompt, cont = row.get("prompt"), row.get("continuation")
            tox, ctox = _num(row.get("toxicity")), _num(row.get("continuation_toxicity"))
        if not isinstance(prompt, str) or not isinstance(cont, str) or not prompt.strip() or not cont.strip():
            continue
        text = format_sample(prompt, cont)
        if len(text) > data_cfg.max_chars:
            continue
        if data_cfg.min_toxicity is not None and (tox or 0.0) < data_cfg.min_toxicity:
            continue
        records.append(
            {
                "prompt": prompt.strip(),
                "continuation": cont.strip(),
                "toxicity": tox or 0.0,
                "toxicity_missing": tox is None,
                "continuation_toxicity": ctox or 0.0,
                "text": text,
            }
        )
    if len(records) < 2:
        raise DataError(
            f"only {len(records)} samples of {data_cfg.train_dataset!r} pass the filters (min_toxicity="
            f"{data_cfg.min_toxicity}, max_chars={data_cfg.max_chars}). Fix: relax data.min_toxicity or "
            "raise data.max_chars."
        )
    random.Random(seed).shuffle(records)
    if data_cfg.num_train_samples is not None:
        if data_cfg.num_train_samples > len(records):
            warnings.warn(
                f"data.num_train_samples={data_cfg.num_train_samples} but only {len(records)} samples pass "
                "the filters; using all of them",
                stacklevel=2,
            )
        records = records[: data_cfg.num_train_samples]
    n_test = max(1, round(len(records) * data_cfg.test_size))
    if n_test >= len(records):
        raise DataError(
            f"data.test_size={data_cfg.test_size} leaves no training samples out of {len(records)}. "
            "Fix: lower data.test_size or raise data.num_train_samples."
        )
    return DatasetDict({"train": Dataset.from_list(records[n_test:]), "test": Dataset.from_list(records[:n_test])})


def load_eval_prompts(data_cfg: Any, seed: int) -> list[str]:
    """The evaluation prompts: the first ``eval_prompt_words`` words of comments with label ``eval_label``.

    ``num_eval_prompts`` comments are drawn with ``seed`` (same seed, same prompts, same order); fewer when the split
    has fewer.

    Args:
        data_cfg: a :class:`detox_sft.config.DataConfig`.
        seed: the recipe's seed.

    Raises:
        DataError: the dataset or a field is missing, or no comment has the label.
    """
    ds = load_rows(data_cfg.eval_dataset, data_cfg.eval_split)
    if len(ds) == 0:
        raise DataError(f"dataset {data_cfg.eval_dataset!r} split {data_cfg.eval_split!r} is empty.")
    needed = ["comment_text"] + (["label"] if data_cfg.eval_label is not None else [])
    _require(ds.column_names, ds[0], needed, data_cfg.eval_dataset)
    texts = ds["comment_text"]
    if data_cfg.eval_label is not None:
        texts = [t for t, lab in zip(texts, ds["label"], strict=True) if lab == data_cfg.eval_label]
    prompts = [" ".join(t.split()[: data_cfg.eval_prompt_words]) for t in texts if isinstance(t, str) and t.strip()]
    if not prompts:
        raise DataError(
            f"dataset {data_cfg.eval_dataset!r} split {data_cfg.eval_split!r} has no comment with label "
            f"{data_cfg.eval_label}. Fix: set data.eval_label (1 = toxic) or data.eval_split."
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    if data_cfg.num_eval_prompts > len(prompts):
        warnings.warn(
            f"data.num_eval_prompts={data_cfg.num_eval_prompts} but only {len(prompts)} prompts; using all",
            stacklevel=2,
        )
    return [prompts[i] for i in order[: data_cfg.num_eval_prompts]]
