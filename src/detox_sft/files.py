"""Files a rerun trusts, complete or absent: written under a temporary name beside the target, then renamed; a kill
leaves at most a hidden ``.<name>.*.tmp`` beside the target, which the next writer ignores (or clears).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_NO_ROOM_HINT = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the filesystem's maximum",
}
# Full disks reported without an errno: safetensors and tokenizers (Rust) write "(os error 28)" in their text, torch's
# zip writer has no errno at all, SQLite says SQLITE_FULL for ENOSPC (past a file-size limit, only an I/O error).
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITE_TEXT = re.compile(r"PytorchStreamWriter failed writing|inline_container\.cc.*unexpected pos \d+ vs \d+")


class NoRoomError(OSError):
    """A write found no room (``errno`` ENOSPC, EDQUOT or EFBIG); freeing space and rerunning the command resumes."""


def _no_room_errno(exc: BaseException) -> int | None:
    from safetensors import SafetensorError

    if isinstance(exc, OSError):
        return exc.errno if exc.errno in _NO_ROOM_HINT else None
    rust = isinstance(exc, SafetensorError) or type(exc) is Exception  # tokenizers raises a bare Exception
    if rust and (found := _OS_ERROR_TEXT.search(str(exc))):
        return int(found.group(1)) if int(found.group(1)) in _NO_ROOM_HINT else None
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_TEXT.search(str(exc)):
        return errno.ENOSPC  # torch gives no errno: a write that fell short is the disk (or the limit) full
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", None) == "SQLITE_FULL":
        return errno.ENOSPC
    return None


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, as a traceback prints them (bounded)."""
    for _ in range(32):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def no_room(exc: BaseException) -> NoRoomError | None:
    """The :class:`NoRoomError` behind ``exc`` (itself or a cause) when a write found no room; `None` otherwise."""
    for cause in causes(exc):
        if isinstance(cause, NoRoomError):
            return cause
        if (number := _no_room_errno(cause)) is not None:
            error = NoRoomError(
                number, f"{os.strerror(number)}: {_NO_ROOM_HINT[number]}", getattr(cause, "filename", None)
            )
            error.__cause__ = cause
            return error
    return None


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
    """Yield an empty directory beside ``target`` to build in; a clean exit swaps it in, an error removes it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a killed earlier writer's (one writer at a time)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield built
        # two renames, the old aside then the new in place: ``target`` is always the old, the new, or absent
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent))
        if target.exists():
            os.replace(target, old / target.name)
        os.replace(built, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # an interrupt included: no half-built directory stays behind
        shutil.rmtree(built, ignore_errors=True)
        raise
