"""The rephrase cache: SQLite tables of toxicity per (scorer, text) and engine output per (settings, text)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from detox_sft.rephrase.engines import RephraseError

_CACHE_VERSION = 1  # bump when the algorithm or the cached record layout changes


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CacheWriteError(RephraseError):
    """The rephrase cache could not be written (a failed step: the disk is full, or the directory not writable)."""


class _Cache:
    """SQLite cache: toxicity per (scorer, text) and engine output per (engine settings, text). Commits per batch."""

    def __init__(self, directory: Path | None):
        self.conn = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "rephrase.sqlite"
        with self._writing():
            self.conn = sqlite3.connect(self.path, timeout=60)
            with self.conn:
                self.conn.execute("CREATE TABLE IF NOT EXISTS tox (k TEXT PRIMARY KEY, v REAL)")
                self.conn.execute("CREATE TABLE IF NOT EXISTS out (k TEXT PRIMARY KEY, v TEXT)")

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
        if self.conn is None or not keys:
            return {}
        found: dict[str, Any] = {}
        for i in range(0, len(keys), 500):
            part = list(keys[i : i + 500])
            marks = ",".join("?" * len(part))
            for k, v in self.conn.execute(f"SELECT k, v FROM {table} WHERE k IN ({marks})", part):  # noqa: S608
                found[k] = json.loads(v) if table == "out" else v
        return found

    def put_many(self, table: str, items: dict[str, Any]) -> None:
        if self.conn is None or not items:
            return
        rows = [(k, json.dumps(v, ensure_ascii=False) if table == "out" else v) for k, v in items.items()]
        with self._writing(), self.conn:  # one transaction: committed whole or rolled back
            self.conn.executemany(f"INSERT OR REPLACE INTO {table} (k, v) VALUES (?, ?)", rows)  # noqa: S608

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# --------------------------------------------------------------------------------------------------------------------
# dataset level
# --------------------------------------------------------------------------------------------------------------------
