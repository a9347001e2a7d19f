"""Finished blocks on disk: ``<root>/<job key>/<index>.json``, written atomically, found again by a rerun.

The key hashes the input and every setting that changes the output, so a changed job never reads another's blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from detox_sft.files import atomic_write_bytes


def content_key(*parts: Any) -> str:
    """A short hex digest of JSON-serialisable parts (records, settings): the name of a job's work dir."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:20]


class BlockStore:
    """The finished blocks of job ``key`` under ``root``; ``num_blocks`` is also recorded in ``job.json``."""

    def __init__(self, root: str | os.PathLike[str], key: str, num_blocks: int) -> None:
        self.dir = Path(root) / key
        self.num_blocks = num_blocks
        self.dir.mkdir(parents=True, exist_ok=True)
        job = self.dir / "job.json"
        if not job.is_file():
            atomic_write_bytes(job, json.dumps({"key": key, "num_blocks": num_blocks}).encode())

    def path(self, index: int) -> Path:
        """The file of block ``index``."""
        return self.dir / f"{index:06d}.json"

    def done(self) -> set[int]:
        """Indices of the blocks already written (complete files only: they are renamed into place)."""
        found = {int(path.stem) for path in self.dir.glob("[0-9]*.json") if path.stem.isdecimal()}
        return found & set(range(self.num_blocks))

    def put(self, index: int, data: bytes) -> None:
        """Write block ``index``'s result (JSON bytes) atomically."""
        atomic_write_bytes(self.path(index), data)

    def get(self, index: int) -> Any:
        """Block ``index``'s result, parsed."""
        return json.loads(self.path(index).read_bytes())

    def get_all(self) -> list[Any]:
        """The results of all blocks, in order."""
        return [self.get(i) for i in range(self.num_blocks)]
