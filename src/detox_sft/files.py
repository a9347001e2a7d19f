"""Files a rerun trusts, written so that they are complete or absent: temporary name beside the target, then rename.

Use :func:`atomic_write_text` / :func:`atomic_write_json` for a single file, :func:`dir_writer` to build a directory
beside its target and swap it in (:func:`replace_dir`), and :func:`read_json_or_none` to read a completion marker back: a
truncated or unreadable one counts as absent, so the caller redoes the step (and warns) instead of crashing.

A kill (SIGKILL, out of memory) leaves at most a hidden ``.<name>.*.tmp`` file or directory beside the target; the
next writer ignores it, and :func:`remove_stale_temps` clears those of a directory.
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
    "NO_ROOM",
    "no_room_hint",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_writer",
    "read_json_or_none",
    "temp_dir_beside",
    "replace_dir",
    "dir_writer",
    "remove_stale_temps",
]

NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # disk full, quota, file-size limit
_NO_ROOM_HINT = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the filesystem's maximum",
}


def no_room_hint(exc: OSError) -> str | None:
    """What a write's ``OSError`` means when the disk (or the file-size limit) has no room; `None` for other errors."""
    return _NO_ROOM_HINT.get(exc.errno) if isinstance(exc, OSError) else None


_TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the target file (its directory is created).
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: text encoding (ignored for bytes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TMP_SUFFIX}"
    # os.open with 0o666: the process's umask applies, so the file gets the mode a plain open() would give it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # any failure, an interrupt included: the temporary file must not stay behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: the file is complete or absent."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: the file is complete or absent."""
    with atomic_writer(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], value: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(value, **dumps_kwargs)`` written atomically to ``path``."""
    return atomic_write_text(path, json.dumps(value, **dumps_kwargs))


def read_json_or_none(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``, or `None` when it is missing or unreadable (truncated, not UTF-8, not JSON).

    For completion markers and caches: a damaged one means "not done", so the caller redoes the step (and says so:
    ``path.exists()`` tells a damaged file from a missing one).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def temp_dir_beside(target: str | os.PathLike[str]) -> Path:
    """A new empty hidden directory next to ``target`` (same filesystem, so :func:`replace_dir` can rename it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=target.parent))


def replace_dir(built: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Put the finished directory ``built`` at ``target``, replacing what was there.

    Two renames: the old directory is moved aside (a hidden temporary name), the new one renamed into place, then the
    old one deleted. At every moment ``target`` is the old complete directory, absent, or the new complete one, never
    a mix.

    Returns:
        ``target``.
    """
    built, target = Path(built), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=_TMP_SUFFIX, dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def dir_writer(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory in a temporary one beside ``target``; a clean exit swaps it in (:func:`replace_dir`).

    On an exception the temporary directory is removed and ``target`` is left as it was. The temporary directories a
    killed earlier writer of ``target`` left are removed first (one writer of ``target`` at a time).

    Yields:
        The empty temporary directory to build into.
    """
    target = Path(target)
    remove_stale_temps(target.parent, target.name)
    built = temp_dir_beside(target)
    try:
        yield built
        replace_dir(built, target)
    except BaseException:  # any failure, an interrupt included: no half-built directory stays behind
        shutil.rmtree(built, ignore_errors=True)
        raise


def remove_stale_temps(directory: str | os.PathLike[str], name: str) -> list[Path]:
    """Delete the temporary files and directories that an interrupted writer of ``directory/name`` left behind.

    Only call it where one writer at a time works on ``name`` (a step's own output).

    Returns:
        What was removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.glob(f".{name}.*{_TMP_SUFFIX}"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed
