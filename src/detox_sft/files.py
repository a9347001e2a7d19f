"""Files a rerun trusts, complete or absent: written under a temporary name beside the target, then renamed.

A kill leaves at most a hidden ``.<name>.*.tmp`` beside the target; the next writer ignores (or clears) it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "no_room_hint",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_writer",
    "read_json_or_none",
    "dir_writer",
]

_NO_ROOM_HINT = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the filesystem's maximum",
}


def no_room_hint(exc: OSError) -> str | None:
    """What a write's ``OSError`` means when the disk (or the file-size limit) has no room; `None` for other errors."""
    return _NO_ROOM_HINT.get(exc.errno) if isinstance(exc, OSError) else None


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside ``path``; a clean exit fsyncs it and renames it to ``path``, an error removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    # os.open with 0o666: the process's umask applies, so the file gets the mode a plain open() would give it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # an interrupt included: the temporary file must not stay behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_writer(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], value: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(value, **dumps_kwargs)`` written atomically to ``path``."""
    return atomic_write_text(path, json.dumps(value, **dumps_kwargs))


def read_json_or_none(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``, or `None` when it is missing or damaged: a completion marker that reads as "not done"."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


@contextlib.contextmanager
def dir_writer(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty directory beside ``target`` to build in; a clean exit swaps it in, an error removes it.

    The swap is two renames (old aside, new in place), so ``target`` is always the old or the new directory, or
    absent. What a killed earlier writer left beside ``target`` is removed first (one writer at a time).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield built
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(built, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # an interrupt included: no half-built directory stays behind
        shutil.rmtree(built, ignore_errors=True)
        raise
