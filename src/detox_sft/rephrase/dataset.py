"""Rephrase a dataset (gated, cached, resumable) and build the detox arm's training set."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.config import Recipe, RephraseConfig
from detox_sft.data import read_jsonl, write_jsonl_atomic
from detox_sft.prompts import format_sample
from detox_sft.rephrase.cache import _CACHE_VERSION, _Cache, _key
from detox_sft.rephrase.engines import (
    RephraseError,
    TMaRCoEngine,
    _settings,
    load_engine,
    models_fingerprint,
    resolve_device,
)
from detox_sft.rephrase.survival import survival_means
from detox_sft.scale import BlockStore, content_key, map_blocks
from detox_sft.toxicity import load_scorer

# fields every record gains (original fields are kept as they are)
ADDED_FIELDS = (
    "masked_text",
    "rephrased_text",
    "rephrased",
    "toxicity_before",
    "toxicity_after",
    "rephrase_status",
    "rephrase_truncated",
    "rephrase_error",
)


@dataclass
class RephraseSummary:
    """Counts and means of one rephrasing run.

    Attributes:
        total: records in; missing: field absent or null; empty: empty or whitespace-only text.
        scored: texts scored for gating; gated: records at or above the gate (sent to TMaRCo).
        rephrased: gated records whose text TMaRCo changed; unchanged: gated but nothing masked or changed (in
            :func:`detoxify_training_set`'s summary also the samples whose rewrite left the continuation as it was).
        truncated: texts cut to the models' context; errors: texts TMaRCo could not process (kept unchanged).
        computed: distinct texts the engine processed in this run; cached: distinct gated texts read from the cache.
        gate_threshold, mask_threshold, engine: the settings used.
        mean_toxicity_before / mean_toxicity_after: over the scored records; gated_* over the gated ones.
        mean_chrf: sacrebleu's chrF (0-100) of each rephrased text against its original, averaged over the
            rephrased records (`None` when none was): how much of a sample survives (100 = unchanged).
        mean_changed_word_share: the share of the original's words the rephrased text does not keep, averaged over
            the rephrased records (see :mod:`detox_sft.rephrase.survival`).
        seconds: wall time.
    """

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
        """A two-column table (what Jupyter shows for a summary), the counts in the order the records went."""
        import html

        def num(value: float | None, digits: int = 3) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        rows = [
            ("records", f"{self.total} ({self.missing} missing, {self.empty} empty)"),
            (
                f"at or above the gate ({self.gate_threshold:g}): sent to TMaRCo",
                f"{self.gated} of {self.scored} scored",
            ),
            ("rephrased", str(self.rephrased)),
            ("unchanged / failed / truncated", f"{self.unchanged} / {self.errors} / {self.truncated}"),
            (
                "mean toxicity, all records: before → after",
                f"{num(self.mean_toxicity_before)} → {num(self.mean_toxicity_after)}",
            ),
            (
                "mean toxicity, gated records: before → after",
                f"{num(self.gated_toxicity_before)} → {num(self.gated_toxicity_after)}",
            ),
        ]
        shown = {"total", "missing", "empty", "gate_threshold", "gated", "scored", "rephrased", "unchanged", "errors"}
        shown |= {"truncated", "mean_toxicity_before", "mean_toxicity_after", "gated_toxicity_before"}
        shown |= {"gated_toxicity_after", "engine", "mask_threshold", "computed", "cached", "seconds"}
        for name, value in self.to_dict().items():  # fields added later show as they are
            if name not in shown:
                rows.append(
                    (name.replace("_", " "), num(value, 2) if value is None or isinstance(value, float) else str(value))
                )
        rows += [
            ("engine, mask threshold", f"{self.engine}, {self.mask_threshold:g}"),
            ("computed now / read from the cache", f"{self.computed} / {self.cached}"),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f'<table class="detox-rephrase-summary" style="text-align:left">{body}</table>'


@dataclass
class RephraseResult:
    """Records (original fields + :data:`ADDED_FIELDS`, input order) and the run's :class:`RephraseSummary`."""

    records: list[dict[str, Any]]
    summary: RephraseSummary
    field: str = "text"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dataset(self) -> Any:
        """The records as a :class:`datasets.Dataset`."""
        from datasets import Dataset

        return Dataset.from_list(self.records)


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


def _score_cached(
    texts: Sequence[str],
    scorer: Callable[[Sequence[str]], np.ndarray],
    scorer_key: str,
    cache: _Cache,
    bar: Any,
    stage: str,
) -> dict[str, float]:
    """Toxicity of each text, cached ones first; ``bar`` (the step's one progress bar) gets one step per text."""
    unique = list(dict.fromkeys(texts))
    keys = {t: _key([scorer_key, t]) for t in unique}
    found = cache.get_many("tox", list(keys.values()))
    result = {t: float(found[k]) for t, k in keys.items() if k in found}
    todo = [t for t in unique if t not in result]
    _stage(bar, stage, len(unique), done=len(unique) - len(todo))
    step = 256
    for i in range(0, len(todo), step):
        part = todo[i : i + step]
        values = np.asarray(scorer(part), dtype=np.float64)
        fresh = {t: float(v) for t, v in zip(part, values, strict=True)}
        cache.put_many("tox", {keys[t]: v for t, v in fresh.items()})
        result.update(fresh)
        bar.update(len(part))
    return result


def _stage(bar: Any, stage: str, texts: int, done: int = 0) -> None:
    """Add a stage's ``texts`` to the step's bar (its cached ``done`` ones at once) and name it in the postfix."""
    n, started = bar.n, getattr(bar, "start_t", None)
    bar.reset(total=bar.total + texts)  # the public call that also resizes tqdm.notebook's widget; it zeroes n
    if started is not None:
        bar.start_t = started  # the step's elapsed time and rate, not the stage's
    bar.set_postfix_str(stage, refresh=False)
    bar.update(n + done)
    bar.refresh()


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
    """Gate, mask and rephrase the ``field`` of every record; cached and resumable.

    Every record comes back in input order with its original fields unchanged plus :data:`ADDED_FIELDS`:
    ``masked_text`` (`None` unless gated), ``rephrased_text`` (the original when not rephrased), ``rephrased``
    (bool), ``toxicity_before`` / ``toxicity_after`` (`None` for a missing field) and ``rephrase_status``
    (``rephrased``, ``unchanged``, ``below_gate``, ``empty``, ``missing``, ``error``), ``rephrase_truncated``
    (the text was cut to the models' context; a warning is issued) and ``rephrase_error`` (why TMaRCo failed).

    Args:
        dataset_or_records: a :class:`datasets.Dataset`, a JSONL path, or a list of dicts.
        cfg: the recipe's rephrase section (gate and mask thresholds, models, weights, engine, batch size).
        field: the text field.
        cache_dir: SQLite cache directory (`None`: no cache). Use ``<run>/rephrase/cache``.
        progress: show one progress bar for the step (in texts: the gate, TMaRCo, the scorer on the rewrites).
        engine: an engine object (its own thresholds / weights apply), an engine name, or `None` for
            ``cfg.engine`` (models load only when some text is not cached).
        scorer: a toxicity scorer; `None` loads ``cfg.scorer``.
        device: overrides ``cfg.device``.

    With ``cfg.executor == "ray"`` the records are cut into blocks of ``cfg.ray_block_size`` and each block goes
    through this same function in one of ``cfg.ray_actors`` Ray actors (:func:`_rephrase_on_ray`): the records that
    come back are the ones the local run gives. Finished blocks are kept under ``<cache_dir>/ray-blocks``, so a rerun
    of an interrupted job only runs the missing ones.

    Raises:
        RephraseError: unreadable input (e.g. a malformed JSONL line: its number is in the message); an engine or
            scorer object with executor ray (each actor loads its own).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    records = _as_records(dataset_or_records)
    if cfg.executor == "ray":
        return _rephrase_on_ray(records, cfg, field, cache_dir, progress, engine, scorer, device, started)
    cache = _Cache(Path(cache_dir) if cache_dir is not None else None)
    try:
        if scorer is None:
            scorer = load_scorer(
                cfg.scorer,
                device=resolve_device(device or cfg.device),
                batch_size=cfg.batch_size,
                revision=cfg.scorer_revision,
            )
        pinned = {"revision": cfg.scorer_revision} if cfg.scorer_revision else {}  # unpinned keys stay as they were
        scorer_key = json.dumps(
            {"scorer": cfg.scorer, "name": getattr(scorer, "name", None), "v": _CACHE_VERSION, **pinned}
        )
        texts = [_text_of(record, field) for record in records]
        present = [t for t in texts if t is not None]
        summary = RephraseSummary(
            total=len(records), gate_threshold=float(cfg.gate_threshold), mask_threshold=float(cfg.mask_threshold)
        )
        # one bar for the step, in texts: the gate, TMaRCo on the gated ones, the scorer again on the rewrites (each
        # stage adds its texts when it starts, cached ones done at once; the postfix names the stage)
        with tqdm(total=0, desc="rephrase", unit="text", disable=not progress) as bar:
            tox = _score_cached(present, scorer, scorer_key, cache, bar, "toxicity (gate)")
            gated = list(dict.fromkeys(t for t in present if t.strip() and tox[t] >= cfg.gate_threshold))
            outputs = _engine_outputs(gated, cfg, engine, device, cache, summary, bar)
            changed = [outputs[t]["rephrased"] for t in gated if outputs[t]["changed"]]
            tox_after = _score_cached(changed, scorer, scorer_key, cache, bar, "toxicity (after)")
            bar.set_postfix_str("done")
    finally:
        cache.close()

    out_records = [
        _output_record(record, text, cfg, tox, tox_after, outputs, summary)
        for record, text in zip(records, texts, strict=True)
    ]
    _finish(summary, out_records, field, started, stacklevel=3)
    return RephraseResult(records=out_records, summary=summary, field=field)


def _finish(
    summary: RephraseSummary, records: list[dict[str, Any]], field: str, started: float, stacklevel: int
) -> None:
    """The end of a rephrase run, local or on Ray: its warnings (``stacklevel`` points at the caller's caller),
    the means, the time."""
    if summary.truncated:
        warnings.warn(
            f"{summary.truncated} text(s) were longer than the TMaRCo models' context and were truncated "
            "before rephrasing (see rephrase_truncated in the records).",
            stacklevel=stacklevel,
        )
    _warn_errors(summary, stacklevel=stacklevel + 1)
    _add_means(summary, records, field)
    summary.seconds = time.perf_counter() - started


def _warn_errors(summary: RephraseSummary, stacklevel: int) -> None:
    if summary.errors:
        warnings.warn(
            f"{summary.errors} of {summary.gated} gated text(s) could not be rephrased and were kept unchanged "
            "(rephrase_status 'error', the reason in rephrase_error); they are not cached, so a rerun tries them again.",
            UserWarning,
            stacklevel=stacklevel,
        )


def _text_of(record: dict[str, Any], field: str) -> str | None:
    value = record.get(field)
    return value if isinstance(value, str) else None if value is None else str(value)


def _engine_outputs(
    gated: list[str],
    cfg: RephraseConfig,
    engine: TMaRCoEngine | str | None,
    device: str | None,
    cache: _Cache,
    summary: RephraseSummary,
    bar: Any,
) -> dict[str, dict[str, Any]]:
    """TMaRCo's output for each gated text: cached ones first; the engine (and its models) only for the rest."""
    engine_name = engine if isinstance(engine, str) else (engine.name if engine is not None else cfg.engine)
    device = resolve_device(device or cfg.device)
    engine_key = _engine_key(cfg, engine if _is_engine(engine) else None, engine_name, device)
    keys = {t: _key([engine_key, t]) for t in gated}
    found = cache.get_many("out", list(keys.values()))
    outputs: dict[str, dict[str, Any]] = {t: found[k] for t, k in keys.items() if k in found}
    todo = [t for t in gated if t not in outputs]
    summary.cached = len(gated) - len(todo)
    summary.computed = len(todo)
    _stage(bar, f"TMaRCo ({engine_name})" + (": loading the models" if todo else ""), len(gated), summary.cached)
    if todo:
        if not _is_engine(engine):
            engine = load_engine(cfg, engine_name, device)
        summary.engine = engine.name
        bar.set_postfix_str(f"TMaRCo ({engine.name})")
        _run_engine(engine, todo, keys, cfg.batch_size, cache, outputs, bar)
    summary.engine = summary.engine or engine_name
    return outputs


def _run_engine(
    engine: TMaRCoEngine,
    todo: list[str],
    keys: dict[str, str],
    batch_size: int,
    cache: _Cache,
    outputs: dict[str, dict[str, Any]],
    bar: Any,
) -> None:
    """Rephrase ``todo`` batch by batch into ``outputs``, committing each batch to the cache (a rerun resumes)."""
    for i in range(0, len(todo), batch_size):
        part = todo[i : i + batch_size]
        fresh = {t: asdict(o) for t, o in zip(part, engine.rephrase(part), strict=True)}
        for value in fresh.values():  # JSON has no infinity
            value["min_gap"] = None if math.isinf(value["min_gap"]) else value["min_gap"]
            value["min_margin"] = None if math.isinf(value["min_margin"]) else value["min_margin"]
        # committed: resumable; a failed text is not cached, so a rerun (after a fix) tries it again
        cache.put_many("out", {keys[t]: v for t, v in fresh.items() if v["error"] is None})
        outputs.update(fresh)
        bar.update(len(part))


def _output_record(
    record: dict[str, Any],
    text: str | None,
    cfg: RephraseConfig,
    tox: dict[str, float],
    tox_after: dict[str, float],
    outputs: dict[str, dict[str, Any]],
    summary: RephraseSummary,
) -> dict[str, Any]:
    """``record`` with :data:`ADDED_FIELDS` filled in for its text; counts it in ``summary``."""
    new = dict(record)
    new.update(
        {
            "masked_text": None,
            "rephrased_text": text,
            "rephrased": False,
            "toxicity_before": None,
            "toxicity_after": None,
            "rephrase_status": None,
            "rephrase_truncated": False,
            "rephrase_error": None,
        }
    )
    if text is None:
        new["rephrase_status"] = "missing"
        summary.missing += 1
        return new
    before = tox[text]
    new["toxicity_before"] = new["toxicity_after"] = before
    summary.scored += 1
    if not text.strip():
        new["rephrase_status"] = "empty"
        summary.empty += 1
    elif before < cfg.gate_threshold:
        new["rephrase_status"] = "below_gate"
    else:
        summary.gated += 1
        _apply_output(new, outputs[text], tox_after, summary)
    return new


def _apply_output(
    new: dict[str, Any], result: dict[str, Any], tox_after: dict[str, float], summary: RephraseSummary
) -> None:
    """Fill a gated record from the engine's output: masked, truncated, and rephrased, unchanged or failed."""
    new["masked_text"] = result["masked"]
    if result.get("truncated"):
        new["rephrase_truncated"] = True
        summary.truncated += 1
    if result.get("error"):
        new["rephrase_status"] = "error"
        new["rephrase_error"] = result["error"]
        summary.errors += 1
    elif result["changed"]:
        new.update(
            rephrased_text=result["rephrased"],
            rephrased=True,
            rephrase_status="rephrased",
            toxicity_after=tox_after[result["rephrased"]],
        )
        summary.rephrased += 1
    else:
        new["rephrase_status"] = "unchanged"
        summary.unchanged += 1


# gated samples whose rewrite the training set does not use (detoxify_training_set): kept as they were
_KEPT_ORIGINAL = ("empty_continuation", "unchanged_continuation")


def _add_means(summary: RephraseSummary, records: list[dict[str, Any]], field: str) -> None:
    """Mean toxicity before / after over the scored records, and over the gated ones; what survives the rewrites."""
    befores = [r["toxicity_before"] for r in records if r["toxicity_before"] is not None]
    afters = [r["toxicity_after"] for r in records if r["toxicity_after"] is not None]
    gated = ("rephrased", "unchanged", *_KEPT_ORIGINAL)
    g_before = [r["toxicity_before"] for r in records if r["rephrase_status"] in gated]
    g_after = [r["toxicity_after"] for r in records if r["rephrase_status"] in gated]
    summary.mean_toxicity_before = float(np.mean(befores)) if befores else None
    summary.mean_toxicity_after = float(np.mean(afters)) if afters else None
    summary.gated_toxicity_before = float(np.mean(g_before)) if g_before else None
    summary.gated_toxicity_after = float(np.mean(g_after)) if g_after else None
    survived = survival_means(records, field)
    summary.mean_chrf, summary.mean_changed_word_share = survived["mean_chrf"], survived["mean_changed_word_share"]


def _is_engine(engine: Any) -> bool:
    # duck-typed: anything with rephrase(), fingerprint() and model_identity() (tests wrap engines to count calls)
    return engine is not None and not isinstance(engine, str) and hasattr(engine, "rephrase")


def _engine_key(cfg: RephraseConfig, engine: TMaRCoEngine | None, name: str, device: str) -> str:
    """Cache key of an engine's outputs: its settings and the models it holds.

    An engine given by the caller reports the models it really holds (it may hold others than the recipe names);
    otherwise the recipe's models are identified without loading them, the same way (:func:`models_fingerprint`).
    """
    if engine is not None:
        settings = engine.fingerprint()
        models = engine.model_identity()
    else:
        dtype = "float16" if name == "batched" and device == "cuda" else "float32"
        settings = _settings(cfg, name, dtype)
        models = models_fingerprint(cfg)
    return _key({"v": _CACHE_VERSION, "settings": settings, "models": models})


# --------------------------------------------------------------------------------------------------------------------
# executor ray: the same per-record code, block by block, on a Ray Data actor pool
# --------------------------------------------------------------------------------------------------------------------

# summary counts that add up over blocks (the means are recomputed over all records, as the local run does)
_BLOCK_COUNTS = ("missing", "empty", "scored", "gated", "rephrased", "unchanged", "truncated", "errors", "computed")


def _rephrase_on_ray(
    records: list[dict[str, Any]],
    cfg: RephraseConfig,
    field: str,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
    engine: TMaRCoEngine | str | None,
    scorer: Callable[[Sequence[str]], np.ndarray] | None,
    device: str | None,
    started: float,
) -> RephraseResult:
    """:func:`rephrase_dataset` with executor ray: blocks of records through :func:`rephrase_dataset` in actors.

    Each record's output depends only on its own text (the gate score, TMaRCo's output), so cutting the input into
    blocks changes nothing; the blocks come back in input order. That is exact with a row-wise gate scorer (the
    offline profile's; tested byte for byte); a transformer classifier pads each batch to its longest text, and its
    batches here hold other texts than in one process, so its scores may differ in the last float bits. The work
    dir's key covers the records and every setting that changes the output, so a changed input or recipe never
    reuses another job's blocks.
    """
    if _is_engine(engine) or scorer is not None:
        raise RephraseError(
            "rephrase.executor is 'ray': each actor loads its own engine and scorer, so they cannot be passed in. "
            "Fix: pass an engine name (or None), or set rephrase.executor: local."
        )
    engine_name = engine or cfg.engine
    setting = device or cfg.device  # resolved by each actor: a RayJob's driver may have no GPU where its workers do
    local = dataclasses.replace(cfg, executor="local")
    blocks = [records[i : i + cfg.ray_block_size] for i in range(0, len(records), cfg.ray_block_size)]
    store = None
    reused: set[int] = set()
    if cache_dir is not None:
        output_settings = {k: v for k, v in asdict(cfg).items() if k not in ("executor", "ray_actors")}
        key = content_key(
            records, field, engine_name, setting, output_settings, models_fingerprint(cfg), _CACHE_VERSION
        )
        store = BlockStore(Path(cache_dir) / "ray-blocks", key, num_blocks=len(blocks))
        reused = store.done()
    results = map_blocks(
        blocks,
        _ray_setup,
        _ray_block,
        setup_args=(local, engine_name, setting, field),
        actors=cfg.ray_actors,
        device=setting,
        store=store,
        desc=f"rephrase on ray ({engine_name})",
        progress=progress,
    )
    out_records = [record for block in results for record in block["records"]]
    summary = RephraseSummary(
        total=len(out_records),
        gate_threshold=float(cfg.gate_threshold),
        mask_threshold=float(cfg.mask_threshold),
        engine=results[0]["summary"]["engine"] if results else engine_name,
    )
    for index, block in enumerate(results):
        for name in _BLOCK_COUNTS:
            setattr(summary, name, getattr(summary, name) + block["summary"][name])
        # a block finished by an earlier run was computed then: here it counts as cached
        summary.cached += block["summary"]["cached"] + (block["summary"]["computed"] if index in reused else 0)
        summary.computed -= block["summary"]["computed"] if index in reused else 0
    _finish(summary, out_records, field, started, stacklevel=4)
    extra = {"ray": {"blocks": len(blocks), "reused_blocks": len(reused), "actors": cfg.ray_actors}}
    return RephraseResult(records=out_records, summary=summary, field=field, extra=extra)


def _ray_setup(cfg: RephraseConfig, engine_name: str, device: str, field: str) -> dict[str, Any]:
    """An actor's state: the scorer and the engine, loaded once."""
    device = resolve_device(device)
    scorer = load_scorer(cfg.scorer, device=device, batch_size=cfg.batch_size, revision=cfg.scorer_revision)
    engine = load_engine(cfg, engine_name, device)
    return {"cfg": cfg, "engine": engine, "scorer": scorer, "device": device, "field": field}


def _ray_block(state: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """One block through :func:`rephrase_dataset` (no cache: the block store keeps finished blocks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the driver warns once, for every block
        result = rephrase_dataset(
            records,
            state["cfg"],
            field=state["field"],
            progress=False,
            engine=state["engine"],
            scorer=state["scorer"],
            device=state["device"],
        )
    return {"records": result.records, "summary": result.summary.to_dict()}


# --------------------------------------------------------------------------------------------------------------------
# pipeline step: the training set
# --------------------------------------------------------------------------------------------------------------------


def _join_sample(prompt: str, continuation: str) -> str:
    return f"{(prompt or '').strip()} {(continuation or '').strip()}".strip()


def continuation_of(original: str, rephrased: str, boundary: int) -> str:
    """The part of ``rephrased`` that corresponds to ``original[boundary:]`` (the continuation after the prompt).

    The two texts are aligned character by character; a rewritten span that straddles the boundary goes to the
    continuation, so a masked word right after the prompt is kept in it.
    """
    import difflib

    matcher = difflib.SequenceMatcher(a=original, b=rephrased, autojunk=False)
    for tag, i1, i2, j1, _j2 in matcher.get_opcodes():
        if tag == "insert" and i1 == boundary:
            return rephrased[j1:].strip()
        if i1 <= boundary < i2:
            start = j1 + (boundary - i1) if tag == "equal" else j1
            return rephrased[start:].strip()
    return ""


def detoxify_training_set(
    recipe: Recipe,
    train_dataset: Any,
    progress: bool = True,
    engine: TMaRCoEngine | str | None = None,
    scorer: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> tuple[Any, RephraseSummary]:
    """Rephrase the toxic continuations of the SFT training set; write ``data/train_raw.jsonl`` and
    ``data/train_detox.jsonl`` in the run directory.

    Each sample (prompt and continuation joined, column ``sample``) is gated and rephrased, so that TMaRCo fills masked
    words in context; only the rewritten *continuation* is kept (it is what the model learns to generate: the loss is
    completion-only), the prompt stays identical, and ``text`` is re-formatted with
    :func:`detox_sft.prompts.format_sample`, keeping the training template. Both files have the same rows in the same order;
    ``train_detox.jsonl`` adds ``original_continuation`` and the rephrase fields (:data:`ADDED_FIELDS`). A sample whose
    rewrite leaves nothing after the prompt (status ``empty_continuation``) or the same continuation
    (``unchanged_continuation``: only the prompt or whitespace changed) is kept as it was, not counted as rephrased.

    Args:
        recipe: the run recipe (``rephrase`` section, ``run_path``).
        train_dataset: a :class:`datasets.Dataset` with columns ``prompt``, ``continuation``, ``text`` (a
            DatasetDict's ``train`` split is taken).
        progress: show progress bars.
        engine, scorer: override the recipe's (tests, benchmarks).

    Returns:
        (the detoxified Dataset, with the input's columns only; the :class:`RephraseSummary`).
    """
    from datasets import Dataset, DatasetDict

    if isinstance(train_dataset, DatasetDict):  # (a DatasetDict is a dict: test its class, not its keys)
        if "train" not in train_dataset:
            raise RephraseError(
                f"the DatasetDict has no 'train' split (splits: {list(train_dataset)}). Fix: pass the split to "
                "detoxify, e.g. dataset['train']."
            )
        train_dataset = train_dataset["train"]
    columns = list(train_dataset.column_names)
    missing = [c for c in ("prompt", "continuation", "text") if c not in columns]
    if missing:
        raise RephraseError(
            f"training set lacks column(s) {missing}. Fix: load it with "
            "detox_sft.data.load_train_dataset(recipe.data, recipe.seed)."
        )
    data_dir = recipe.paths.data
    rows = train_dataset.to_list()
    write_jsonl_atomic(rows, recipe.paths.train_set("raw"))
    # TMaRCo sees the whole sample: with the prompt as context the experts and BART fill a masked word the way the
    # sentence needs it; alone, a continuation's first word has no context and is filled with whatever starts
    # sentences most often. Only the continuation part of the result is kept; the prompt stays as it was.
    samples = [{**row, "sample": _join_sample(row["prompt"], row["continuation"])} for row in rows]
    result = rephrase_dataset(
        samples,
        recipe.rephrase,
        field="sample",
        cache_dir=recipe.paths.rephrase_cache,
        progress=progress,
        engine=engine,
        scorer=scorer,
    )
    detox_rows, clean_rows = [], []
    for row, rec in zip(rows, result.records, strict=True):
        new = dict(rec)
        new["original_continuation"] = row["continuation"]
        if rec["rephrased"]:
            continuation = continuation_of(rec["sample"], rec["rephrased_text"], len(row["prompt"].strip()))
            if not continuation:  # TMaRCo rewrote nothing after the prompt into words: keep the sample as it was
                _keep_original(new, "empty_continuation")
            elif continuation == row["continuation"].strip():
                # the rewrite touched only the prompt (which training keeps as it was) or whitespace: the training
                # sample is unchanged, so it is not counted as rephrased (seen on Python 3.12's tokenization)
                _keep_original(new, "unchanged_continuation")
            else:
                new["continuation"] = continuation
                new["text"] = format_sample(row["prompt"], continuation)
        detox_rows.append(new)
        clean_rows.append({c: new[c] for c in columns})
    summary = _training_set_summary(result.summary, detox_rows)
    write_jsonl_atomic(detox_rows, recipe.paths.train_set("detox"))
    write_jsonl_atomic([summary.to_dict()], data_dir / "rephrase_summary.jsonl")
    return Dataset.from_list(clean_rows), summary


def _keep_original(record: dict[str, Any], status: str) -> None:
    """A gated sample whose rewrite the training set does not use: not rephrased, its toxicity the original's
    (``rephrased_text`` keeps what TMaRCo wrote, for the reader)."""
    record.update(rephrased=False, rephrase_status=status, toxicity_after=record["toxicity_before"])


def _training_set_summary(summary: RephraseSummary, records: list[dict[str, Any]]) -> RephraseSummary:
    """The step's summary as the training set has it: samples kept as they were (:func:`_keep_original`) count as
    unchanged, not rephrased, and the means are over what training reads."""
    kept = sum(r["rephrase_status"] in _KEPT_ORIGINAL for r in records)
    summary = dataclasses.replace(summary, rephrased=summary.rephrased - kept, unchanged=summary.unchanged + kept)
    _add_means(summary, records, "sample")
    return summary
