"""Training samples and evaluation prompts from a hub id, a local path (JSONL, Parquet, CSV, a directory of
``<split>.<ext>`` files, a ``save_to_disk`` directory) or ``zoo:rtp`` / ``zoo:wiki_toxic``, in the schemas of
allenai/real-toxicity-prompts and OxAISH-AL-LLM/wiki_toxic unless the recipe's ``data.*_field`` map your columns."""

from __future__ import annotations

import io
import json
import math
import os
import random
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from detox_sft.files import atomic_write_text
from detox_sft.prompts import format_sample
from detox_sft.refs import resolve_ref, revision_kwargs


class DataError(ValueError):
    """A dataset or a field is missing; the message names it and the fix."""


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file of objects (blank lines skipped); a bad line raises :class:`DataError` with its number."""
    with open(path, "rb") as fh:  # decoded line by line, so that a bad byte is reported with its line
        return _jsonl_records(fh, path)


def _jsonl_records(lines: Iterable[bytes], path: Any) -> list[dict[str, Any]]:
    records = []
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            value = json.loads(line)
            why = None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
        except UnicodeDecodeError as exc:
            why = f"not UTF-8 (byte {exc.start + 1}: {exc.reason})"
        except json.JSONDecodeError as exc:
            why = f"not valid JSON ({exc.msg} at column {exc.colno})"
        except RecursionError:
            why = "nested too deep"
        if why:
            raise DataError(f"{path}: line {number} is {why}. Fix: save it as UTF-8, one JSON object per line.")
        records.append(value)
    return records


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSONL or Parquet file, local or ``s3://bucket/key`` (pyarrow, with the ``AWS_*`` variables)."""
    import pyarrow.parquet as pq

    text = str(path)
    filesystem = _s3_filesystem() if text.startswith("s3://") else None
    if text.endswith(".parquet"):
        return pq.read_table(text.removeprefix("s3://"), filesystem=filesystem).to_pylist()
    if filesystem is None:
        return read_jsonl(path)
    with filesystem.open_input_stream(text.removeprefix("s3://")) as stream:
        return _jsonl_records(io.BytesIO(stream.read()), text)  # split as a local file is: at newlines only


def _s3_filesystem() -> Any:
    from pyarrow import fs

    endpoint = urlparse(os.environ["AWS_S3_ENDPOINT"]) if os.environ.get("AWS_S3_ENDPOINT") else None
    return fs.S3FileSystem(
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        endpoint_override=endpoint.netloc if endpoint else None,
        scheme=endpoint.scheme if endpoint else "https",
    )


def write_jsonl_atomic(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path | str:
    """Write records as JSONL, complete or absent: locally through a rename, to ``s3://bucket/key`` as one object."""
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if not str(path).startswith("s3://"):
        return atomic_write_text(path, data)
    try:
        # the finished bytes in one write: pyarrow sends one PUT below its part size (10 MiB), else a multipart
        # upload it completes at close only once every part is stored, so S3 never shows a partial object
        with _s3_filesystem().open_output_stream(str(path).removeprefix("s3://")) as out:
            out.write(data.encode())
    except OSError as exc:
        raise DataError(f"Cannot write {path} ({exc}). {_S3_FIX}") from None
    return str(path)


_S3_FIX = (
    "Fix: check the data connection's AWS_S3_ENDPOINT (the server is running), AWS_ACCESS_KEY_ID / "
    "AWS_SECRET_ACCESS_KEY and the bucket in the s3:// path, then rerun (the rephrase cache keeps the finished rows)."
)


def check_output(path: str | os.PathLike[str]) -> None:
    """Before a long step, raise :class:`DataError` unless an ``s3://`` output's bucket is reachable."""
    if not str(path).startswith("s3://"):
        return
    from pyarrow import fs

    bucket = str(path).removeprefix("s3://").partition("/")[0]
    try:
        found = _s3_filesystem().get_file_info(bucket).type != fs.FileType.NotFound
    except OSError as exc:
        raise DataError(f"Cannot write {path} ({exc}). {_S3_FIX}") from None
    if not found:
        raise DataError(f"Cannot write {path}: bucket {bucket!r} does not exist. {_S3_FIX}")


_FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def _read_file(path: Path, kind: str) -> Any:
    from datasets import Dataset

    if kind == "jsonl":
        return Dataset.from_list(read_jsonl(path))
    try:
        return Dataset.from_parquet(str(path)) if kind == "parquet" else Dataset.from_csv(str(path))
    except Exception as exc:  # pyarrow and pandas raise many kinds for a malformed file
        raise DataError(f"{path}: not readable as {kind} ({exc!r}). Fix: check it, or set data.format.") from exc


def load_rows(ref: str, split: str, format: str = "auto", revision: str | None = None) -> Any:
    """One split of a dataset reference (see the module; a single file is the split) as a :class:`datasets.Dataset`,
    read as ``format`` says (``auto``: by the name); ``revision`` pins a hub dataset."""
    from datasets import DatasetDict, load_from_disk

    resolved = resolve_ref(ref)
    path = Path(resolved)
    if format == "hub":
        return _load_hub(ref, resolved, split, revision)
    if path.is_file():
        kind = _FILE_FORMATS.get(path.suffix.lower()) if format == "auto" else format
        if kind is None:
            raise DataError(f"dataset {ref!r}: {path} is not .jsonl, .parquet or .csv. Fix: set data.format.")
        return _read_file(path, kind)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            saved = load_from_disk(str(path))
            if isinstance(saved, DatasetDict) and split not in saved:
                raise DataError(
                    f"dataset {ref!r} has no split {split!r} (has {sorted(saved)}). "
                    "Fix: set the split in the recipe's data section."
                )
            return saved[split] if isinstance(saved, DatasetDict) else saved
        for suffix, kind in _FILE_FORMATS.items():
            candidate = path / f"{split}{suffix}"
            if candidate.is_file() and format in ("auto", kind):
                return _read_file(candidate, kind)
        have = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _FILE_FORMATS)
        raise DataError(
            f"dataset {ref!r}: no {split}.jsonl (or .parquet, .csv) in {path} (found: {have or 'nothing'}). Fix: set "
            "the split in the recipe's data section or add the file."
        )
    if ref.startswith((".", "/", "~")) or Path(ref).suffix.lower() in _FILE_FORMATS or ref.count("/") != 1:
        raise DataError(
            f"dataset {ref!r} not found. Fix: give an existing path, a hub id, or zoo:rtp / zoo:wiki_toxic."
        )
    return _load_hub(ref, resolved, split, revision)


def _load_hub(ref: str, resolved: str, split: str, revision: str | None) -> Any:
    from datasets import load_dataset

    try:
        pinned = revision_kwargs(ref, revision, "the dataset's revision")
    except ValueError as exc:
        raise DataError(str(exc)) from None
    try:
        return load_dataset(resolved, split=split, **pinned)
    except Exception as exc:  # the hub raises many kinds (offline, missing repo, missing split)
        at = f" at revision {revision}" if revision else ""
        raise DataError(
            f"cannot load dataset {ref!r} split {split!r}{at} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). Fix: reach the hub, or use a local copy (path) or the offline profile's "
            "zoo:rtp / zoo:wiki_toxic (--recipe offline)."
        ) from exc


def _has(row: dict[str, Any], dotted: str) -> bool:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def _fields_of(row: dict[str, Any], prefix: str = "") -> list[str]:
    """A row's field names, nested ones dotted (``prompt.text``)."""
    nested = {k: _fields_of(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [prefix + k] for k, v in row.items()}
    return [name for names in nested.values() for name in names]


def _column(ds: Any, dotted: str) -> list[Any]:
    top, _, rest = dotted.partition(".")
    values = list(ds[top])
    for part in rest.split(".") if rest else []:
        values = [value.get(part) if isinstance(value, dict) else None for value in values]
    return values


def _require_mapped(first: dict[str, Any], field: str, column: str, ref: str) -> None:
    if not _has(first, column):
        raise DataError(
            f"{field}: {column!r} is not a column of {ref!r} (columns: {', '.join(_fields_of(first))}). "
            f"Fix: set {field} to one of them (dots reach nested fields)."
        )


def _texts(values: list[Any], field: str, column: str) -> list[str | None]:
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"{field}: column {column!r} holds {type(value).__name__} values (row {i}: {str(value)[:60]!r}), "
                f"not text. Fix: set {field} to a column of strings."
            )
    return values


def _scores(values: list[Any], field: str, column: str) -> list[float | None]:
    """A toxicity column as floats (null and NaN -> `None`); a value outside [0, 1] is an error."""
    out: list[float | None] = []
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise DataError(
                f"{field}: column {column!r} holds {value!r} (row {i}), not a toxicity in [0, 1] or null. Fix: set "
                f"{field} to a column of scores in [0, 1], or to null (every sample counts as 0)."
            )
        out.append(float(value))
    return out


def _train_columns(data_cfg: Any, first: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Role -> (the recipe field naming it, the dotted column): the recipe's mapping, else the RTP schema."""
    ref = data_cfg.train_dataset
    mapped = {
        role: (f"data.{role}_field", column)
        for role in ("prompt", "continuation", "text", "toxicity")
        if (column := getattr(data_cfg, f"{role}_field")) is not None
    }
    for field, column in mapped.values():
        _require_mapped(first, field, column, ref)
    nested = isinstance(first.get("prompt"), dict)
    prompt, continuation = ("prompt.text", "continuation.text") if nested else ("prompt", "continuation")
    if not {"prompt", "text"} & set(mapped):
        for name in (prompt, continuation):
            if not _has(first, name):
                raise DataError(
                    f"dataset {ref!r} has no field {name!r} (columns: {', '.join(_fields_of(first))}). Fix: map your "
                    "columns (data.prompt_field and data.continuation_field, or data.text_field; "
                    "data.toxicity_field), or use the allenai/real-toxicity-prompts schema."
                )
        mapped |= {"prompt": ("data.prompt_field", prompt), "continuation": ("data.continuation_field", continuation)}
    if "toxicity" not in mapped and (found := [c for c in ("prompt.toxicity", "toxicity") if _has(first, c)]):
        mapped["toxicity"] = ("data.toxicity_field", found[0])
    if "text" not in mapped and data_cfg.prompt_field is None:  # the schema's continuation toxicity, when present
        column = "continuation.toxicity" if nested else "continuation_toxicity"
        if _has(first, column):
            mapped["continuation_toxicity"] = (f"the dataset's {column}", column)
    return mapped


def load_train_dataset(data_cfg: Any, seed: int) -> Any:
    """The SFT samples as ``DatasetDict(train, test)``, filtered, drawn with ``seed`` and split as ``data_cfg`` says;
    columns ``prompt``, ``continuation``, ``toxicity``, ``toxicity_missing``, ``continuation_toxicity``, ``text``."""
    from datasets import Dataset, DatasetDict

    ds = load_rows(data_cfg.train_dataset, data_cfg.train_split, data_cfg.format, data_cfg.train_revision)
    if len(ds) == 0:
        raise DataError(f"dataset {data_cfg.train_dataset!r} split {data_cfg.train_split!r} is empty.")
    columns = _train_columns(data_cfg, ds[0])
    values: dict[str, list[Any]] = {}
    for role, (field, column) in columns.items():
        check = _scores if role.endswith("toxicity") else _texts
        values[role] = check(_column(ds, column), field, column)
    none = [None] * len(ds)
    if "text" in values:
        n = data_cfg.text_prompt_words
        words = [t.split() if t else [] for t in values["text"]]
        prompts = [" ".join(w[:n]) if len(w) > n else None for w in words]
        continuations = [" ".join(w[n:]) if len(w) > n else None for w in words]
    else:
        prompts, continuations = values["prompt"], values["continuation"]

    records = []
    for prompt, cont, tox, ctox in zip(
        prompts, continuations, values.get("toxicity", none), values.get("continuation_toxicity", none), strict=True
    ):
        if prompt is None or cont is None or not prompt.strip() or not cont.strip():
            continue
        text = format_sample(prompt, cont)
        if len(text) > data_cfg.max_chars or (tox or 0.0) < (data_cfg.min_toxicity or 0.0):
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
        words = f", text_prompt_words={data_cfg.text_prompt_words}" if "text" in values else ""
        raise DataError(
            f"only {len(records)} samples of {data_cfg.train_dataset!r} pass the filters (min_toxicity="
            f"{data_cfg.min_toxicity}, max_chars={data_cfg.max_chars}{words}). Fix: relax data.min_toxicity or "
            "raise data.max_chars" + (" or lower data.text_prompt_words." if words else ".")
        )
    random.Random(seed).shuffle(records)
    if (wanted := data_cfg.num_train_samples) is not None:
        if wanted > len(records):
            warnings.warn(
                f"data.num_train_samples={wanted}, but only {len(records)} samples pass the filters", stacklevel=2
            )
        records = records[:wanted]
    n_test = max(1, round(len(records) * data_cfg.test_size))
    if n_test >= len(records):
        raise DataError(
            f"data.test_size={data_cfg.test_size} leaves no training samples out of {len(records)}. "
            "Fix: lower data.test_size or raise data.num_train_samples."
        )
    return DatasetDict({"train": Dataset.from_list(records[n_test:]), "test": Dataset.from_list(records[:n_test])})


def load_eval_prompts(data_cfg: Any, seed: int) -> list[str]:
    """``num_eval_prompts`` prompts drawn with ``seed``: the first ``eval_prompt_words`` words of the comments
    labelled ``eval_label``."""
    ds = load_rows(data_cfg.eval_dataset, data_cfg.eval_split, data_cfg.eval_format, data_cfg.eval_revision)
    if len(ds) == 0:
        raise DataError(f"dataset {data_cfg.eval_dataset!r} split {data_cfg.eval_split!r} is empty.")
    text_field, label_field = data_cfg.eval_text_field, data_cfg.eval_label_field
    _require_mapped(ds[0], "data.eval_text_field", text_field, data_cfg.eval_dataset)
    texts = _texts(_column(ds, text_field), "data.eval_text_field", text_field)
    if data_cfg.eval_label is not None:
        _require_mapped(ds[0], "data.eval_label_field", label_field, data_cfg.eval_dataset)
        labels = _column(ds, label_field)
        texts = [t for t, lab in zip(texts, labels, strict=True) if lab == data_cfg.eval_label]
    prompts = [" ".join(t.split()[: data_cfg.eval_prompt_words]) for t in texts if isinstance(t, str) and t.strip()]
    if not prompts:
        raise DataError(
            f"dataset {data_cfg.eval_dataset!r} split {data_cfg.eval_split!r} has no comment with label "
            f"{data_cfg.eval_label}. Fix: set data.eval_label (1 = toxic) or data.eval_split."
        )
    if data_cfg.num_eval_prompts > len(prompts):
        warnings.warn(
            f"data.num_eval_prompts={data_cfg.num_eval_prompts} but only {len(prompts)} prompts", stacklevel=2
        )
    random.Random(seed).shuffle(prompts)  # the permutation depends only on the seed and the length
    return prompts[: data_cfg.num_eval_prompts]
