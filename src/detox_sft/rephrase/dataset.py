"""The rephrase step: :func:`detoxify_training_set` (the detox arm's training set) on :func:`rephrase_dataset`
(gate -> engine -> cache, batch by batch, so a killed run resumes; ``executor: ray`` runs blocks on Ray actors)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.config import Recipe, RephraseConfig
from detox_sft.data import read_jsonl, write_jsonl_atomic
from detox_sft.devices import resolve_device
from detox_sft.prompts import format_sample
from detox_sft.rephrase.cache import CACHE_VERSION, Cache, RephraseError, key
from detox_sft.rephrase.engines import TMaRCoEngine, identity, load_engine
from detox_sft.rephrase.survival import survival_means
from detox_sft.scale import BlockStore, content_key, map_blocks
from detox_sft.toxicity import load_scorer

# fields every record gains (original fields are kept as they are)
ADDED_FIELDS = ("masked_text", "rephrased_text", "rephrased", "toxicity_before", "toxicity_after", "rephrase_status")
ADDED_FIELDS += ("rephrase_truncated", "rephrase_error")
# gated samples whose rewrite the training set does not use (detoxify_training_set): kept as they were
_KEPT_ORIGINAL = ("empty_continuation", "unchanged_continuation")


@dataclass
class RephraseSummary:
    """Counts and means counted from a run's records (``computed`` / ``cached``: distinct gated texts; ``unchanged``
    includes a training-set rewrite that left the continuation as it was)."""

    total: int = 0
    missing: int = 0
    empty: int = 0
    scored: int = 0
    gated: int = 0
    rephrased: int = 0
    unchanged: int = 0
    truncated: int = 0
    errors: int = 0
    computed: int = 0
    cached: int = 0
    gate_threshold: float = 0.0
    mask_threshold: float = 0.0
    engine: str = ""
    mean_toxicity_before: float | None = None
    mean_toxicity_after: float | None = None
    gated_toxicity_before: float | None = None
    gated_toxicity_after: float | None = None
    mean_chrf: float | None = None
    mean_changed_word_share: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)

    def _repr_html_(self) -> str:
        """A two-column table (what Jupyter shows for a summary)."""
        import html

        cell = lambda v: html.escape(f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        rows = "".join(f"<tr><th>{k.replace('_', ' ')}</th><td>{cell(v)}</td></tr>" for k, v in self.to_dict().items())
        return f'<table class="detox-rephrase-summary" style="text-align:left">{rows}</table>'


@dataclass
class RephraseResult:
    """Records (original fields + :data:`ADDED_FIELDS`, input order) and the run's :class:`RephraseSummary`."""

    records: list[dict[str, Any]]
    summary: RephraseSummary
    field: str = "text"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # executor ray: blocks, reused blocks, actors


def detoxify_training_set(
    recipe: Recipe,
    train_dataset: Any,
    progress: bool = True,
    engine: TMaRCoEngine | str | None = None,
    scorer: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> tuple[Any, RephraseSummary]:
    """Rephrase the toxic samples of the training set; write ``data/train_raw.jsonl`` and ``data/train_detox.jsonl``.

    Only the rewritten continuation is kept; returns the detoxified Dataset (the input's columns) and the summary.
    """
    from datasets import Dataset, DatasetDict

    if isinstance(train_dataset, DatasetDict):  # (a DatasetDict is a dict: test its class, not its keys)
        if "train" not in train_dataset:
            raise RephraseError(
                f"no 'train' split (splits: {list(train_dataset)}). Fix: pass one, e.g. dataset['train']."
            )
        train_dataset = train_dataset["train"]
    columns = list(train_dataset.column_names)
    missing = [c for c in ("prompt", "continuation", "text") if c not in columns]
    if missing:
        raise RephraseError(
            f"training set lacks column(s) {missing}. Fix: load it with data.load_train_dataset(recipe.data, seed)."
        )
    rows = train_dataset.to_list()
    write_jsonl_atomic(rows, recipe.paths.train_set("raw"))
    # TMaRCo sees the whole sample: alone, a continuation's first masked word has no context and is filled with
    # whatever starts sentences most often.
    samples = [
        {**row, "sample": f"{(row['prompt'] or '').strip()} {(row['continuation'] or '').strip()}".strip()}
        for row in rows
    ]
    result = rephrase_dataset(
        samples,
        recipe.rephrase,
        field="sample",
        cache_dir=recipe.paths.rephrase_cache,
        progress=progress,
        engine=engine,
        scorer=scorer,
    )
    detox_rows = []
    for row, rec in zip(rows, result.records, strict=True):
        new = {**rec, "original_continuation": row["continuation"]}
        if rec["rephrased"]:
            continuation = continuation_of(rec["sample"], rec["rephrased_text"], len(row["prompt"].strip()))
            # nothing left, or only the prompt or whitespace changed (Python 3.12's tokenization): keep the sample
            kept = "empty_continuation" if not continuation else None
            kept = "unchanged_continuation" if continuation and continuation == row["continuation"].strip() else kept
            if kept:
                new.update(rephrased=False, rephrase_status=kept, toxicity_after=new["toxicity_before"])
            else:
                new["continuation"] = continuation
                new["text"] = format_sample(row["prompt"], continuation)
        detox_rows.append(new)
    # the summary counts what the training set holds, and its means are over what training reads
    summary = _summarize(detox_rows, "sample", result.summary)
    write_jsonl_atomic(detox_rows, recipe.paths.train_set("detox"))
    write_jsonl_atomic([summary.to_dict()], recipe.paths.data / "rephrase_summary.jsonl")
    return Dataset.from_list([{c: r[c] for c in columns} for r in detox_rows]), summary


def continuation_of(original: str, rephrased: str, boundary: int) -> str:
    """The part of ``rephrased`` aligned with ``original[boundary:]``; a rewrite straddling the boundary goes to it."""
    import difflib

    matcher = difflib.SequenceMatcher(a=original, b=rephrased, autojunk=False)
    for tag, i1, i2, j1, _j2 in matcher.get_opcodes():
        if tag == "insert" and i1 == boundary:
            return rephrased[j1:].strip()
        if i1 <= boundary < i2:
            start = j1 + (boundary - i1) if tag == "equal" else j1
            return rephrased[start:].strip()
    return ""


def rephrase_dataset(
    dataset_or_records: Any,
    cfg: RephraseConfig,
    field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    engine: TMaRCoEngine | str | None = None,
    scorer: Callable[[Sequence[str]], np.ndarray] | None = None,
    device: str | None = None,
) -> RephraseResult:
    """Gate, mask and rephrase the ``field`` of every record (a Dataset, a JSONL path or dicts); cached, resumable.

    Records come back in input order with :data:`ADDED_FIELDS`; ``rephrase_status`` is ``rephrased``, ``unchanged``,
    ``below_gate``, ``empty``, ``missing`` or ``error`` (not cached). ``engine`` loads only when the cache lacks a text.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    records = _as_records(dataset_or_records)
    if cfg.executor == "ray":
        out, summary, extra = _rephrase_on_ray(records, cfg, field, cache_dir, progress, engine, scorer, device)
        return _finish(out, field, summary, started, extra)
    device = resolve_device(device or cfg.device, "rephrase.device")
    engine_name = engine if isinstance(engine, str) else (engine.name if engine is not None else cfg.engine)
    with Cache(cache_dir) as cache:
        if scorer is None:
            scorer = load_scorer(cfg.scorer, device=device, batch_size=cfg.batch_size, revision=cfg.scorer_revision)
        pinned = {"revision": cfg.scorer_revision} if cfg.scorer_revision else {}  # unpinned keys stay as they were
        scorer_key = json.dumps(
            {"scorer": cfg.scorer, "name": getattr(scorer, "name", None), "v": CACHE_VERSION, **pinned}
        )
        texts = [v if isinstance(v := r.get(field), str) or v is None else str(v) for r in records]
        present = [t for t in texts if t is not None]
        # 1. the gate
        tox = _scores(present, scorer, scorer_key, cache)
        gated = Counter(t for t in present if t.strip() and tox[t] >= cfg.gate_threshold)  # records per text
        # 2. the engine, on the gated texts the cache lacks
        engine_key = key({"v": CACHE_VERSION, **identity(cfg, engine, device)})
        keys = {t: key([engine_key, t]) for t in gated}
        found = cache.get_many("out", list(keys.values()))
        outputs: dict[str, dict[str, Any]] = {t: found[k] for t, k in keys.items() if k in found}
        todo = [t for t in gated if t not in outputs]
        # the bar counts gated records, as the summary does
        done = sum(gated[t] for t in outputs)
        with tqdm(total=gated.total(), initial=done, desc="rephrase", unit="sample", disable=not progress) as bar:
            if todo and (engine is None or isinstance(engine, str)):
                bar.set_postfix_str(f"TMaRCo ({engine_name}): loading the models")
                engine = load_engine(cfg, engine_name, device)
            bar.set_postfix_str(f"TMaRCo ({engine_name})")
            for i in range(0, len(todo), cfg.batch_size):
                part = todo[i : i + cfg.batch_size]
                fresh = {t: _jsonable(o) for t, o in zip(part, engine.rephrase(part), strict=True)}
                # 3. the cache, committed per batch so a rerun resumes; a failed text is not cached: a rerun retries it
                cache.put_many("out", {keys[t]: v for t, v in fresh.items() if v["error"] is None})
                outputs.update(fresh)
                bar.update(sum(gated[t] for t in part))
            bar.set_postfix_str("scoring the rewrites")
            changed = [outputs[t]["rephrased"] for t in gated if outputs[t]["changed"]]
            tox_after = _scores(changed, scorer, scorer_key, cache)
            bar.set_postfix_str("done")
    # 4. the records
    out = [_record(r, t, cfg.gate_threshold, tox, tox_after, outputs) for r, t in zip(records, texts, strict=True)]
    return _finish(out, field, _summary(cfg, engine_name, len(todo), len(gated) - len(todo)), started)


def _summary(cfg: RephraseConfig, engine: str, computed: int, cached: int) -> RephraseSummary:
    thresholds = {"gate_threshold": float(cfg.gate_threshold), "mask_threshold": float(cfg.mask_threshold)}
    return RephraseSummary(**thresholds, engine=engine, computed=computed, cached=cached)


def _finish(
    records: list[dict[str, Any]], field: str, summary: RephraseSummary, started: float, extra: dict | None = None
) -> RephraseResult:
    """The run's result: its summary counted from the records, and a warning for what went wrong."""
    summary = _summarize(records, field, summary)
    summary.seconds = time.perf_counter() - started
    if summary.truncated:
        why = "were longer than the TMaRCo models' context and were truncated before rephrasing"
        warnings.warn(f"{summary.truncated} text(s) {why} (see rephrase_truncated in the records).", stacklevel=3)
    if summary.errors:
        what = f"{summary.errors} of {summary.gated} gated text(s) could not be rephrased"
        why = "were kept unchanged (rephrase_status 'error', the reason in rephrase_error); they are not cached, so"
        warnings.warn(f"{what} and {why} a rerun tries them again.", stacklevel=3)
    return RephraseResult(records=records, summary=summary, field=field, extra=extra or {})


def _as_records(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, str | os.PathLike):
        return read_jsonl(data)
    if isinstance(data, dict):  # a DatasetDict is a dict: test its class, not its keys
        from datasets import DatasetDict, IterableDatasetDict

        if isinstance(data, DatasetDict | IterableDatasetDict):
            raise RephraseError(
                f"got a DatasetDict (splits: {list(data)}). Fix: pass one split, e.g. dataset['train']."
            )
    if hasattr(data, "to_list"):
        return data.to_list()
    records = list(data)
    if any(not isinstance(r, dict) for r in records):
        raise RephraseError("records must be dicts (or give a datasets.Dataset or a JSONL path).")
    return [dict(r) for r in records]


def _scores(texts: Sequence[str], scorer: Callable, scorer_key: str, cache: Cache) -> dict[str, float]:
    """Toxicity of each distinct text: cached ones first, the rest scored and committed 256 at a time."""
    unique = list(dict.fromkeys(texts))
    keys = {t: key([scorer_key, t]) for t in unique}
    found = cache.get_many("tox", list(keys.values()))
    result = {t: float(found[k]) for t, k in keys.items() if k in found}
    todo = [t for t in unique if t not in result]
    for i in range(0, len(todo), 256):
        part = todo[i : i + 256]
        fresh = {t: float(v) for t, v in zip(part, np.asarray(scorer(part), dtype=np.float64), strict=True)}
        cache.put_many("tox", {keys[t]: v for t, v in fresh.items()})
        result.update(fresh)
    return result


def _jsonable(output: Any) -> dict[str, Any]:
    # JSON has no infinity (only min_gap and min_margin are floats)
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in asdict(output).items()}


def _record(record: dict, text: str | None, gate: float, tox: dict, tox_after: dict, outputs: dict) -> dict[str, Any]:
    """``record`` with :data:`ADDED_FIELDS` filled in for its text."""
    new = dict(record)
    new.update(dict.fromkeys(ADDED_FIELDS), rephrased_text=text, rephrased=False, rephrase_truncated=False)
    if text is None:
        new["rephrase_status"] = "missing"
        return new
    new["toxicity_before"] = new["toxicity_after"] = tox[text]
    if not text.strip():
        new["rephrase_status"] = "empty"
    elif tox[text] < gate:
        new["rephrase_status"] = "below_gate"
    else:
        result = outputs[text]
        new["masked_text"] = result["masked"]
        new["rephrase_truncated"] = bool(result.get("truncated"))
        if result.get("error"):
            new.update(rephrase_status="error", rephrase_error=result["error"])
        elif result["changed"]:
            after = tox_after[result["rephrased"]]
            new.update(
                rephrased_text=result["rephrased"], rephrased=True, rephrase_status="rephrased", toxicity_after=after
            )
        else:
            new["rephrase_status"] = "unchanged"
    return new


def _summarize(records: list[dict[str, Any]], field: str, summary: RephraseSummary) -> RephraseSummary:
    """``summary`` with the counts and means of ``records`` (what survives the rewrites: of ``field``)."""
    status = Counter(r["rephrase_status"] for r in records)
    kept = sum(status[s] for s in _KEPT_ORIGINAL)
    befores = [r["toxicity_before"] for r in records if r["toxicity_before"] is not None]
    afters = [r["toxicity_after"] for r in records if r["toxicity_after"] is not None]
    gated = ("rephrased", "unchanged", *_KEPT_ORIGINAL)
    g_before = [r["toxicity_before"] for r in records if r["rephrase_status"] in gated]
    g_after = [r["toxicity_after"] for r in records if r["rephrase_status"] in gated]

    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    return dataclasses.replace(
        summary,
        total=len(records),
        missing=status["missing"],
        empty=status["empty"],
        scored=len(befores),
        gated=status["rephrased"] + status["unchanged"] + status["error"] + kept,
        rephrased=status["rephrased"],
        unchanged=status["unchanged"] + kept,
        truncated=sum(bool(r["rephrase_truncated"]) for r in records),
        errors=status["error"],
        mean_toxicity_before=mean(befores),
        mean_toxicity_after=mean(afters),
        gated_toxicity_before=mean(g_before),
        gated_toxicity_after=mean(g_after),
        **survival_means(records, field),
    )


def _rephrase_on_ray(records, cfg, field, cache_dir, progress, engine, scorer, device) -> tuple[list, Any, dict]:
    """Blocks of records through :func:`rephrase_dataset` on Ray actors, back in input order (a record's output
    depends only on its text; the job key covers the records and every output setting)."""
    if (engine is not None and not isinstance(engine, str)) or scorer is not None:
        raise RephraseError(
            "rephrase.executor is 'ray': each actor loads its own engine and scorer, so they cannot be passed in. "
            "Fix: pass an engine name (or None), or set rephrase.executor: local."
        )
    engine_name = engine or cfg.engine
    setting = device or cfg.device  # resolved by each actor: a RayJob's driver may have no GPU where its workers do
    blocks = [records[i : i + cfg.ray_block_size] for i in range(0, len(records), cfg.ray_block_size)]
    store, reused = None, set()
    if cache_dir is not None:
        output_settings = {k: v for k, v in asdict(cfg).items() if k not in ("executor", "ray_actors")}
        models = identity(cfg, engine_name)["models"]
        job = content_key(records, field, engine_name, setting, output_settings, models, CACHE_VERSION)
        store = BlockStore(Path(cache_dir) / "ray-blocks", job, num_blocks=len(blocks))
        reused = store.done()
    results = map_blocks(
        blocks,
        _ray_setup,
        _ray_block,
        setup_args=(dataclasses.replace(cfg, executor="local"), engine_name, setting, field),
        actors=cfg.ray_actors,
        device=setting,
        store=store,
        desc=f"rephrase on ray ({engine_name})",
        progress=progress,
    )
    # a block finished by an earlier run was computed then: here it counts as cached
    computed = [0 if i in reused else block["summary"]["computed"] for i, block in enumerate(results)]
    cached = sum(b["summary"]["cached"] + b["summary"]["computed"] - c for b, c in zip(results, computed, strict=True))
    summary = _summary(cfg, engine_name, sum(computed), cached)
    extra = {"ray": {"blocks": len(blocks), "reused_blocks": len(reused), "actors": cfg.ray_actors}}
    return [record for block in results for record in block["records"]], summary, extra


def _ray_setup(cfg: RephraseConfig, engine_name: str, device: str, field: str) -> dict[str, Any]:
    """An actor's state: the scorer and the engine, loaded once."""
    device = resolve_device(device, "rephrase.device")
    scorer = load_scorer(cfg.scorer, device=device, batch_size=cfg.batch_size, revision=cfg.scorer_revision)
    engine = load_engine(cfg, engine_name, device)
    return {"cfg": cfg, "engine": engine, "scorer": scorer, "device": device, "field": field}


def _ray_block(state: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """One block through :func:`rephrase_dataset` (no cache: the block store keeps finished blocks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the driver warns once, for every block
        result = rephrase_dataset(records, progress=False, **state)  # state: rephrase_dataset's keyword arguments
    return {"records": result.records, "summary": result.summary.to_dict()}
