"""The rephrase step's store: SQLite tables of values by key, committed batch by batch, so a killed run resumes
(the bottom of :mod:`detox_sft.rephrase`, so its error types live here)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CACHE_VERSION = 1  # bump when the algorithm or the cached record layout changes


class RephraseError(ValueError):
    """Bad input or setup for rephrasing; the message says what to do."""


class CacheWriteError(RephraseError):
    """The rephrase cache could not be written (a failed step: the disk is full, or the directory not writable)."""


def key(obj: Any) -> str:
    """The cache key of a JSON-serialisable object (a text with the settings that produced its value)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
    """Tables ``tox`` (key -> float) and ``out`` (key -> JSON) in ``<directory>/rephrase.sqlite``, or in memory when
    ``directory`` is `None`. Each :meth:`put_many` is one transaction: committed whole or not at all."""

    def __init__(self, directory: str | Path | None):
        self.path = ":memory:" if directory is None else Path(directory) / "rephrase.sqlite"
        with self._writing():
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=60)
            with self.conn:
                self.conn.execute("CREATE TABLE IF NOT EXISTS tox (k TEXT PRIMARY KEY, v REAL)")
                self.conn.execute("CREATE TABLE IF NOT EXISTS out (k TEXT PRIMARY KEY, v TEXT)")

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """SQLite's write errors ("disk I/O error", "database or disk is full") as a :class:`CacheWriteError`."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise CacheWriteError(
                f"could not write the rephrase cache {self.path} ({exc}): the disk is full or past a file-size limit "
                "(ulimit -f), or the directory is not writable. The outputs cached before are kept. Fix: free disk "
                "space (or fix the directory), then rerun the same command: only the missing texts are computed."
            ) from exc

    def get_many(self, table: str, keys: Sequence[str]) -> dict[str, Any]:
        """The stored values of those ``keys`` that are in ``table``."""
        found: dict[str, Any] = {}
        for i in range(0, len(keys), 500):  # SQLite bounds the number of parameters of one statement
            part = list(keys[i : i + 500])
            marks = ",".join("?" * len(part))
            for k, v in self.conn.execute(f"SELECT k, v FROM {table} WHERE k IN ({marks})", part):  # noqa: S608
                found[k] = json.loads(v) if table == "out" else v
        return found

    def put_many(self, table: str, items: dict[str, Any]) -> None:
        """Store ``items`` in ``table`` in one transaction."""
        rows = [(k, json.dumps(v, ensure_ascii=False) if table == "out" else v) for k, v in items.items()]
        with self._writing(), self.conn:
            self.conn.executemany(f"INSERT OR REPLACE INTO {table} (k, v) VALUES (?, ?)", rows)  # noqa: S608
