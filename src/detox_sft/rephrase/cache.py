"""The rephrase cache: SQLite tables of toxicity per (scorer, text) and engine output per (settings, text)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CACHE_VERSION = 1  # bump when the algorithm or the cached record layout changes


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class _Cache:
    """SQLite cache: toxicity per (scorer, text) and engine output per (engine settings, text). Commits per batch."""

    def __init__(self, directory: Path | None):
        self.conn = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(directory / "rephrase.sqlite", timeout=60)
        self.conn.execute("CREATE TABLE IF NOT EXISTS tox (k TEXT PRIMARY KEY, v REAL)")
        self.conn.execute("CREATE TABLE IF NOT EXISTS out (k TEXT PRIMARY KEY, v TEXT)")
        self.conn.commit()

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
        self.conn.executemany(f"INSERT OR REPLACE INTO {table} (k, v) VALUES (?, ?)", rows)  # noqa: S608
        self.conn.commit()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# --------------------------------------------------------------------------------------------------------------------
# dataset level
# --------------------------------------------------------------------------------------------------------------------
