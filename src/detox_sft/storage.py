"""S3 storage for the exported model: upload a directory, download a prefix, list; checksummed and resumable.

The connection comes from explicit arguments that default to the data-connection variables OpenShift AI puts in a
workbench or a pod: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_S3_ENDPOINT, AWS_S3_BUCKET, AWS_DEFAULT_REGION
(read when :meth:`S3Settings.from_env` is called, never at import). Secrets are never printed: the settings' repr
masks them and error messages are built here without them.

What an upload guarantees:

* Every object carries the SHA-256 of its content in its metadata (``x-amz-meta-sha256``). A rerun skips a file when
  the object under its key has the same size and the same SHA-256, so an interrupted upload resumes and an
  unchanged directory transfers nothing. Local checksums are cached per (path, size, mtime, ctime, inode), so a
  rerun does not re-read the files either.
* Every upload sends the full-object CRC32 of each file, computed locally in the hashing pass, as the object's
  checksum (botocore's ``ChecksumCRC32``; for a multipart upload s3transfer makes it a ``FULL_OBJECT`` checksum and
  botocore adds each part's CRC32). The server computes the CRC32 of the bytes it received and refuses the object
  (BadDigest) when they differ, so a file rewritten during its upload is never stored under its old SHA-256.
* After the transfers, every uploaded object is checked with a HEAD request: size, the SHA-256 metadata, and the
  CRC32 the server stored for it (``ChecksumMode="ENABLED"``). A server that keeps no checksum is checked with its
  MD5 ETag instead (the file is read again for the MD5). CRC32 detects accidental change (corruption, a rewritten
  file), not tampering; the SHA-256 is what downloads verify.
  An unchanged object skipped on a rerun is not checked again: the listing shows the size and ETag it had when the
  last completed upload verified it, and that upload's manifest the SHA-256 the file still has. The report counts
  those apart (``skipped_unchanged``) from the objects checked on the server in this run (``verified``).
* A completion marker ``<prefix>/.detox-sft-upload.json`` (the manifest: every file's size, SHA-256, ETag) is written
  LAST, after the checks, and deleted FIRST when an upload starts. A failed or interrupted upload therefore never
  looks done, and :func:`download_prefix` refuses a prefix without it unless told otherwise. A marker that is not a
  valid manifest counts as absent: the next upload checks every object again (with a warning) and rewrites it.
* One writer per prefix: an upload first creates a lock object ``<prefix>/.detox-sft-upload.lock.<n>`` with a
  conditional PUT (``If-None-Match: *``), renews it while it runs and deletes it at the end; a second upload to the
  prefix is refused with :class:`PrefixLockedError`. A lock left by a killed run is taken over once it has not been
  renewed for ``storage.lock_ttl`` seconds (on the server's clock), at once when its process is known to have exited
  (same machine), or with ``force_lock``. The lock holder then aborts the multipart uploads a dead run left open
  under the prefix (their parts stay stored, and billed, until they are aborted).

A download writes each file to a temporary name beside it, checks its SHA-256 against the manifest (or the object's
metadata), then renames it into place, so a file is either complete and verified or absent. A full disk (or a
file-size limit) stops it with :class:`DiskFullError`; a rerun with room fetches only what is missing.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any

from detox_sft.config import Recipe, StorageConfig
from detox_sft.files import NO_ROOM, atomic_write_text, no_room_hint, read_json_or_none

__all__ = [
    "StorageError",
    "S3ConfigError",
    "S3AuthError",
    "S3UnavailableError",
    "BucketNotFoundError",
    "IncompleteUploadError",
    "ChecksumMismatchError",
    "PrefixLockedError",
    "DiskFullError",
    "S3Settings",
    "S3Object",
    "UploadReport",
    "DownloadReport",
    "MARKER_NAME",
    "LOCK_NAME",
    "DEFAULT_PREFIX",
    "model_prefixes",
    "ensure_bucket",
    "list_prefix",
    "upload_dir",
    "download_prefix",
    "upload_export",
    "upload_prefix",
]

MARKER_NAME = ".detox-sft-upload.json"
LOCK_NAME = ".detox-sft-upload.lock"  # the upload lock's objects are <prefix>/.detox-sft-upload.lock.<n>
DEFAULT_PREFIX = "models/opt-350m-detox"  # = StorageConfig.prefix; the manifests reference it
_SHA_META = "sha256"  # object metadata key (sent as x-amz-meta-sha256)
_MULTIPART_THRESHOLD = 8 * 1024 * 1024
_MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
_READ_SIZE = 4 * 1024 * 1024
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-\d+)?$")
_CACHE_FORMAT = "sha256+crc32-full"  # what a hash-cache entry holds; entries of another format are recomputed
_PRECONDITION = {"PreconditionFailed", "412"}  # a conditional write refused: the object is not as expected
_CONDITIONAL_CONFLICT = {"ConditionalRequestConflict", "409"}  # AWS: another conditional write to it in flight
_SESSION_LOCK = threading.Lock()
_SESSION = None  # a boto3 Session, made on first use (never at import)


# ------------------------------------------------------------------------------------------------------ errors
class StorageError(RuntimeError):
    """An S3 operation failed; the message says what to do."""


class S3ConfigError(StorageError):
    """The connection settings are missing or malformed."""


class S3AuthError(StorageError):
    """The server refused the credentials, or they lack a permission."""


class S3UnavailableError(StorageError):
    """The S3 endpoint cannot be reached (down, wrong address, network)."""


class BucketNotFoundError(StorageError):
    """The bucket does not exist."""


class IncompleteUploadError(StorageError):
    """The prefix has no completion marker, or the marker does not match the objects."""


class ChecksumMismatchError(StorageError):
    """An object's content does not match its recorded checksum."""


class PrefixLockedError(StorageError):
    """Another upload holds the prefix's lock, or took it over from this one."""


class DiskFullError(StorageError):
    """The local disk (or a file-size limit) has no room for a downloaded file."""


# ---------------------------------------------------------------------------------------------------- settings
def _mask(value: str | None, keep: int = 0) -> str:
    if not value:
        return "None"
    return (value[:keep] if keep and len(value) > 2 * keep else "") + "****"


@dataclass(frozen=True, repr=False)
class S3Settings:
    """Where and how to reach S3: an OpenShift AI data connection, or explicit values.

    Attributes:
        endpoint (`str` or `None`): endpoint URL (``AWS_S3_ENDPOINT``); `None` means AWS itself.
        bucket (`str` or `None`): bucket name (``AWS_S3_BUCKET``).
        access_key (`str` or `None`): ``AWS_ACCESS_KEY_ID``; `None` lets boto3 look elsewhere (profile, role).
        secret_key (`str` or `None`): ``AWS_SECRET_ACCESS_KEY``; never printed.
        region (`str`, defaults to ``"us-east-1"``): ``AWS_DEFAULT_REGION``.
        connect_timeout (`float`, defaults to 10): seconds to open a connection.
        read_timeout (`float`, defaults to 60): seconds to wait for a response.
        max_attempts (`int`, defaults to 5): attempts per request (botocore "standard" retries: throttling,
            5xx, connection errors).
        verify_tls (`bool` or `str`, defaults to `True`): verify the endpoint's certificate; a path is a CA bundle.
    """

    endpoint: str | None = None
    bucket: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 5
    verify_tls: bool | str = True

    def __post_init__(self) -> None:
        if self.endpoint is not None and not re.match(r"^https?://[^/\s]+", self.endpoint):
            raise S3ConfigError(
                f"S3 endpoint {self.endpoint!r} is not a URL. Fix: set AWS_S3_ENDPOINT (or --endpoint) to "
                "http(s)://host[:port]."
            )
        if (self.access_key is None) != (self.secret_key is None):
            missing = "AWS_SECRET_ACCESS_KEY" if self.secret_key is None else "AWS_ACCESS_KEY_ID"
            raise S3ConfigError(
                f"S3 credentials incomplete: {missing} is not set. Fix: set both keys (the data connection)."
            )
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise S3ConfigError(f"max_attempts must be a positive integer, got {self.max_attempts!r}.")

    def __repr__(self) -> str:
        return (
            f"S3Settings(endpoint={self.endpoint!r}, bucket={self.bucket!r}, "
            f"access_key={_mask(self.access_key, 4)}, secret_key={_mask(self.secret_key)}, region={self.region!r})"
        )

    __str__ = __repr__

    @classmethod
    def from_env(
        cls,
        endpoint: str | None = None,
        bucket: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        env: dict[str, str] | None = None,
        **options: Any,
    ) -> S3Settings:
        """Explicit values first, then the data-connection variables in ``env`` (default ``os.environ``, read now).

        Args:
            endpoint, bucket, access_key, secret_key, region: explicit values; `None` falls back to the variable.
            env: a mapping to read instead of ``os.environ``.
            **options: the other fields (``connect_timeout``, ``max_attempts``, ``verify_tls``...).
        """
        env = os.environ if env is None else env

        def pick(value: str | None, name: str) -> str | None:
            return value if value is not None else (env.get(name) or None)

        return cls(
            endpoint=pick(endpoint, "AWS_S3_ENDPOINT"),
            bucket=pick(bucket, "AWS_S3_BUCKET"),
            access_key=pick(access_key, "AWS_ACCESS_KEY_ID"),
            secret_key=pick(secret_key, "AWS_SECRET_ACCESS_KEY"),
            region=pick(region, "AWS_DEFAULT_REGION") or "us-east-1",
            **options,
        )

    def replace(self, **changes: Any) -> S3Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def require_bucket(self) -> str:
        """The bucket name, or a :class:`S3ConfigError` that says how to set it."""
        if not self.bucket:
            raise S3ConfigError("No S3 bucket given. Fix: set AWS_S3_BUCKET (the data connection) or pass --bucket.")
        return self.bucket

    def client(self, max_pool_connections: int = 10):
        """A boto3 S3 client for these settings.

        Path-style addressing is used with a custom endpoint: MinIO, Ceph/ODF, SeaweedFS and most in-cluster
        endpoints do not resolve ``<bucket>.<host>`` names.
        """
        global _SESSION
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if self.endpoint else "auto"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            max_pool_connections=max_pool_connections,
        )
        with _SESSION_LOCK:  # one session: it caches the service model, which a new session reloads (~0.1 s)
            if _SESSION is None:
                _SESSION = boto3.session.Session()
            session = _SESSION
            return session.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                verify=self.verify_tls,
                config=config,
            )


def _settings(settings: S3Settings | None, bucket: str | None) -> S3Settings:
    settings = settings if settings is not None else S3Settings.from_env()
    if bucket is not None:
        settings = settings.replace(bucket=bucket)
    settings.require_bucket()
    return settings


# ---------------------------------------------------------------------------------------------- error mapping
_AUTH_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
}
_BUCKET_CHECK = "S3 access check"
_CREDS_FIX = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of the data connection"


def _scrub(text: str, settings: S3Settings) -> str:
    for secret in (settings.secret_key, settings.access_key):
        if secret:
            text = text.replace(secret, "****")
    return text


def _translate(exc: BaseException, settings: S3Settings, what: str) -> StorageError | None:
    """Map a botocore / s3transfer exception to a StorageError with the fix; None if it is not an S3 error."""
    from botocore import exceptions as bexc

    where = f"S3 endpoint {settings.endpoint or 'AWS'}"
    bucket = settings.bucket
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return S3AuthError(
            f"{what}: no S3 credentials found. Fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(the data connection) or pass them to S3Settings."
        )
    if isinstance(exc, _unreachable()):
        return S3UnavailableError(
            f"{what}: cannot reach the {where} ({type(exc).__name__}). Fix: check AWS_S3_ENDPOINT of the data "
            "connection and that the server is running; rerun the same command to resume."
        )
    if isinstance(exc, bexc.SSLError):
        return S3UnavailableError(
            f"{what}: TLS verification failed for the {where}. Fix: pass the CA bundle of the "
            "endpoint (S3Settings(verify_tls='/path/ca.crt'))."
        )
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = _scrub(str(error.get("Message", "")), settings)
        detail = f"{code or status}{': ' + message if message else ''}"
        if code == "BadDigest":
            return ChecksumMismatchError(
                f"{what}: the server refused an object whose bytes do not match the checksum computed from the local "
                f"file ({detail}): was a file changed during the upload? Fix: rerun the upload."
            )
        if code in _AUTH_CODES:
            return S3AuthError(f"{what}: the {where} refused the credentials ({detail}). Fix: {_CREDS_FIX}.")
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and what == _BUCKET_CHECK):
            return BucketNotFoundError(
                f"Bucket {bucket!r} does not exist at the {where}. Fix: check AWS_S3_BUCKET of the data "
                "connection, or create it (--create-bucket, ensure_bucket(create=True))."
            )
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return S3AuthError(
                f"{what}: access denied to bucket {bucket!r} at the {where} ({detail}). Fix: {_CREDS_FIX}, and that "
                "this user may read and write the bucket."
            )
        if isinstance(status, int) and status >= 500:
            return S3UnavailableError(
                f"{what}: the {where} failed ({detail}). Fix: check that the server at AWS_S3_ENDPOINT is healthy; "
                "rerun the same command to resume."
            )
        return StorageError(f"{what}: S3 error {detail}.")
    # s3transfer wraps some failures in its own exception types; look at the cause
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return _translate(cause, settings, what)
    return None


def _code(exc) -> str:
    """The error code of a botocore ClientError ("PreconditionFailed", "NoSuchKey", or the HTTP status)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _unreachable():
    """The botocore exceptions that mean "no answer from the endpoint" (imported when needed, not at import)."""
    from botocore import exceptions as bexc

    return (
        bexc.EndpointConnectionError,
        bexc.ConnectTimeoutError,
        bexc.ReadTimeoutError,
        bexc.ConnectionClosedError,
        ConnectionError,
    )


@contextlib.contextmanager
def _s3_errors(settings: S3Settings, what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # every error is offered to _translate; what it does not know is re-raised as it was
        mapped = _translate(exc, settings, what)
        if mapped is None or mapped is exc:
            raise
        raise mapped from None  # the botocore chain can carry request details; the mapped message is enough


# ------------------------------------------------------------------------------------------------------ helpers
def model_prefixes(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """Where the two exports go: ``{"caikit": "<prefix>/caikit", "hf": "<prefix>/hf"}``."""
    prefix = _norm_prefix(prefix)
    return {"caikit": _join(prefix, "caikit"), "hf": _join(prefix, "hf")}


def _norm_prefix(prefix: str | None) -> str:
    return (prefix or "").strip().strip("/")


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _marker_key(prefix: str) -> str:
    return _join(prefix, MARKER_NAME)


def _is_lock_name(name: str) -> bool:
    """Whether a file or key name is one of the upload lock's objects (``.detox-sft-upload.lock.<n>``)."""
    return name.startswith(f"{LOCK_NAME}.") and name[len(LOCK_NAME) + 1 :].isdigit()


def _is_own_lock(key: str, prefix: str) -> bool:
    """Whether ``key`` is a lock object of ``prefix`` itself (not of a sub-prefix)."""
    parent, _, name = key.rpartition("/")
    return parent == prefix and _is_lock_name(name)


def _transfer_config(max_concurrency: int, max_bandwidth: int | None = None):
    from s3transfer.manager import TransferConfig

    return TransferConfig(
        multipart_threshold=_MULTIPART_THRESHOLD,
        multipart_chunksize=_MULTIPART_CHUNKSIZE,
        max_request_concurrency=max_concurrency,
        max_bandwidth=max_bandwidth,
    )


def _part_size(size: int) -> int | None:
    """The part size s3transfer uses for a file of ``size`` bytes, or None for a single PUT."""
    if size < _MULTIPART_THRESHOLD:
        return None
    from s3transfer.utils import ChunksizeAdjuster

    return ChunksizeAdjuster().adjust_chunksize(_MULTIPART_CHUNKSIZE, size)


@dataclass(frozen=True)
class _Digest:
    size: int
    sha256: str
    crc32: str  # full-object CRC32, base64: sent with the upload, validated and stored by the server
    etag: str | None = None  # the MD5 ETag an S3 server computes (plain or MD5 of part MD5s); only when asked


def _b64_crc(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def _hash_file(path: Path, size: int, md5: bool = False) -> _Digest:
    """SHA-256 and full-object CRC32 in one read, plus (if ``md5``) the ETag an S3 server computes without checksums.

    The ETag of a multipart object is the MD5 of its part MD5s, so that one follows s3transfer's part split.
    """
    sha, crc = hashlib.sha256(), 0
    part = _part_size(size) if md5 else None
    whole = hashlib.md5(usedforsecurity=False) if md5 and part is None else None
    current, left, part_md5s = hashlib.md5(usedforsecurity=False), part or 0, []
    with open(path, "rb") as handle:
        while chunk := handle.read(min(_READ_SIZE, left) if part else _READ_SIZE):
            sha.update(chunk)
            crc = zlib.crc32(chunk, crc)
            if whole is not None:
                whole.update(chunk)
            if part:
                current.update(chunk)
                left -= len(chunk)
                if not left:
                    part_md5s.append(current.digest())
                    current, left = hashlib.md5(usedforsecurity=False), part
    etag = whole.hexdigest() if whole is not None else None
    if part:
        if left != part:
            part_md5s.append(current.digest())
        etag = f"{hashlib.md5(b''.join(part_md5s), usedforsecurity=False).hexdigest()}-{len(part_md5s)}"
    return _Digest(size, sha.hexdigest(), _b64_crc(crc), etag)


def _cache_root() -> Path:
    base = os.environ.get("DETOX_SFT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "detox-sft"


class _HashCache:
    """Local checksums of one directory, keyed by (size, mtime, ctime, inode): a rerun does not re-read files.

    ctime cannot be set by a program, so any write to a file invalidates its entry. The cache file is written
    atomically; a damaged one is ignored with a warning (every file is hashed again).
    """

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        key = hashlib.sha1(str(directory.resolve()).encode(), usedforsecurity=False).hexdigest()[:16]
        self.path = _cache_root() / "checksums" / f"{key}.json"
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}
        if enabled and self.path.exists():
            entries = read_json_or_none(self.path)
            if isinstance(entries, dict):
                self._entries = entries
            else:
                warnings.warn(
                    f"The checksum cache {self.path} is damaged; the files of {directory} are hashed again.",
                    UserWarning,
                    stacklevel=3,
                )

    @staticmethod
    def _stamp(stat: os.stat_result) -> list:
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]

    def digest(self, path: Path, rel: str) -> _Digest:
        stat = path.stat()
        stamp = self._stamp(stat)
        with self._lock:
            entry = self._entries.get(rel)
        if (
            self.enabled
            and isinstance(entry, list)
            and len(entry) == 7
            and entry[:4] == stamp
            and entry[6] == _CACHE_FORMAT
        ):
            return _Digest(stat.st_size, entry[4], entry[5])  # the ETag is not cached: computed when needed
        digest = _hash_file(path, stat.st_size)
        self.record(path, rel, digest)
        return digest

    def record(self, path: Path, rel: str, digest: _Digest) -> None:
        stamp = self._stamp(path.stat())
        with self._lock:
            self._entries[rel] = [*stamp, digest.sha256, digest.crc32, _CACHE_FORMAT]

    def save(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            text = json.dumps(self._entries)
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next run a re-read
            atomic_write_text(self.path, text)


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    files = []
    for path in sorted(local_dir.rglob("*")):
        # is_file follows symlinks (HF cache snapshots use them)
        if path.is_file() and path.name != MARKER_NAME and not _is_lock_name(path.name):
            files.append((path.relative_to(local_dir).as_posix(), path))
    return files


def _etag_of(head: dict) -> str:
    return str(head.get("ETag", "")).strip('"')


class _Bar:
    """A thread-safe tqdm byte counter (or nothing)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=True)
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _subscriber(bar: _Bar):
    from s3transfer.subscribers import BaseSubscriber

    class _Progress(BaseSubscriber):
        def on_progress(self, future, bytes_transferred, **kwargs):  # noqa: ARG002 - s3transfer's signature
            bar.update(bytes_transferred)

    return _Progress()


# ------------------------------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class S3Object:
    """One object under a prefix, as listed."""

    key: str
    size: int
    etag: str


@dataclass
class UploadReport:
    """What :func:`upload_dir` did.

    Attributes:
        bucket, prefix: where the files went.
        files: number of local files.
        uploaded / skipped: keys transferred / left as they were (same size and SHA-256 already there).
        bytes_uploaded / bytes_skipped: their sizes.
        verified: objects checked on the server in this run, by a HEAD request: size and SHA-256 metadata. Every
            uploaded object, and every unchanged one the last manifest could not vouch for.
        server_verified: of those, objects whose server-side checksum matched the one computed locally: the
            full-object CRC32 the server validated on receipt (or its MD5 ETag where it keeps no checksum).
        skipped_unchanged: objects skipped without any request: the listing shows the size and ETag recorded in the
            last completed upload's manifest, and the manifest the SHA-256 the file still has. Not checked again in
            this run; ``verified + skipped_unchanged == files``.
        extra_keys: objects under the prefix that are not in the directory (left alone unless ``delete_extra``).
        aborted_uploads: keys of unfinished multipart uploads under the prefix (a killed earlier run's parts, which
            the server keeps, and bills, until they are aborted) that this run aborted before starting.
        lock_taken_over: why this run took over a lock another upload had left on the prefix ("" if none was there).
        marker_key: the completion marker, written last.
        seconds: wall time.
    """

    bucket: str
    prefix: str
    files: int = 0
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    bytes_skipped: int = 0
    verified: int = 0
    server_verified: int = 0
    skipped_unchanged: int = 0
    extra_keys: list[str] = field(default_factory=list)
    aborted_uploads: list[str] = field(default_factory=list)
    lock_taken_over: str = ""
    marker_key: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        aborted = f", {len(self.aborted_uploads)} unfinished earlier upload(s) aborted" if self.aborted_uploads else ""
        if self.lock_taken_over:
            aborted += f", lock taken over ({self.lock_taken_over})"
        return (
            f"s3://{self.bucket}/{self.prefix}: {len(self.uploaded)} uploaded ({self.bytes_uploaded / 2**20:.1f} MiB), "
            f"{len(self.skipped)} unchanged ({self.bytes_skipped / 2**20:.1f} MiB); {self.verified}/{self.files} "
            f"checked on the server (size + SHA-256; server-side checksum: {self.server_verified}), "
            f"{self.skipped_unchanged} unchanged since the last verified upload (not checked again){aborted}, "
            f"{self.seconds:.1f} s"
        )


@dataclass
class DownloadReport:
    """What :func:`download_prefix` did.

    Attributes:
        bucket, prefix, local_dir: source and destination.
        files: number of objects in the prefix (the marker excluded).
        downloaded / skipped: relative paths fetched / already present with the same SHA-256.
        bytes_downloaded: bytes fetched.
        verified: files whose SHA-256 matched the manifest or the object's metadata.
        unverified: files with no recorded SHA-256 (not uploaded by detox-sft); checked by size (and MD5 ETag for
            single-part objects) only.
        complete: whether the prefix had a completion marker.
        seconds: wall time.
    """

    bucket: str
    prefix: str
    local_dir: str
    files: int = 0
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0
    verified: int = 0
    unverified: list[str] = field(default_factory=list)
    complete: bool = False
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"s3://{self.bucket}/{self.prefix} -> {self.local_dir}: {len(self.downloaded)} downloaded "
            f"({self.bytes_downloaded / 2**20:.1f} MiB), {len(self.skipped)} unchanged, {self.verified}/{self.files} "
            f"SHA-256 verified, {self.seconds:.1f} s"
        )


# --------------------------------------------------------------------------------------------------- operations
def ensure_bucket(
    create: bool = False, *, settings: S3Settings | None = None, bucket: str | None = None, client=None
) -> str:
    """Check that the bucket exists (and that the credentials work); create it when asked.

    Args:
        create: create a missing bucket instead of failing.
        settings: connection; default :meth:`S3Settings.from_env`.
        bucket: overrides ``settings.bucket``.
        client: a boto3 client to reuse.

    Returns:
        The bucket name.

    Raises:
        BucketNotFoundError: missing and ``create`` is false.
        S3AuthError, S3UnavailableError: wrong credentials, endpoint down.
    """
    from botocore.exceptions import ClientError

    settings = _settings(settings, bucket)
    name = settings.require_bucket()
    client = client or settings.client()
    with _s3_errors(settings, _BUCKET_CHECK):
        try:
            client.head_bucket(Bucket=name)
            return name
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound", "403", "Forbidden", "400"):
                raise
        # HEAD has no body, so a 403 does not say whether the key, the signature or the policy is wrong;
        # a LIST returns the error code.
        try:
            client.list_objects_v2(Bucket=name, MaxKeys=1)
            return name
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucket" or not create:
                raise
        kwargs: dict[str, Any] = {"Bucket": name}
        if settings.region and settings.region != "us-east-1" and not settings.endpoint:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.region}
        client.create_bucket(**kwargs)
        return name


def _list(client, bucket: str, prefix: str) -> list[S3Object]:
    listing_prefix = f"{prefix}/" if prefix else ""  # "models/x" must not match "models/x-old/..."
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=listing_prefix):
        for item in page.get("Contents", []):
            objects.append(S3Object(item["Key"], int(item["Size"]), str(item.get("ETag", "")).strip('"')))
    return objects


def _abort_unfinished_uploads(client, bucket: str, prefix: str, other_writers: tuple[str, ...] = ()) -> list[str]:
    """Abort the multipart uploads left open under ``prefix/`` (a run killed mid-transfer leaves its parts stored).

    Only for the holder of the prefix's lock: any upload still open there is a dead (or expired) writer's. Uploads
    under ``other_writers`` (sub-prefixes with a lock of their own) are left alone, and so is everything at the
    bucket's root (no prefix): every other prefix's uploads, live ones included, would be under it. A server or a
    policy that does not allow listing or aborting them leaves them as they are (the parts stay, nothing else
    changes).
    """
    from botocore.exceptions import ClientError

    if not prefix:
        return []
    aborted = []
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            for upload in page.get("Uploads", []):
                if any(upload["Key"].startswith(f"{other}/") for other in other_writers):
                    continue
                try:
                    client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                except ClientError as exc:
                    if _code(exc) != "NoSuchUpload":  # completed or aborted meanwhile: nothing left to abort
                        raise
                    continue
                aborted.append(upload["Key"])
    except ClientError as exc:
        if _code(exc) not in ("NotImplemented", "AccessDenied", "MethodNotAllowed"):
            raise
    return sorted(aborted)


def list_prefix(
    prefix: str = DEFAULT_PREFIX, *, settings: S3Settings | None = None, bucket: str | None = None, client=None
) -> list[S3Object]:
    """The objects under ``prefix/`` (the completion marker included), sorted by key.

    Raises:
        BucketNotFoundError, S3AuthError, S3UnavailableError: as :func:`ensure_bucket`.
    """
    settings = _settings(settings, bucket)
    client = client or settings.client()
    with _s3_errors(settings, f"list s3://{settings.bucket}/{_norm_prefix(prefix)}"):
        return sorted(_list(client, settings.require_bucket(), _norm_prefix(prefix)), key=lambda o: o.key)


def _head(client, bucket: str, key: str) -> dict:
    # ChecksumMode makes the server return the checksum it validated when it received the object
    return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")


def _check_object(head: dict, digest: _Digest, key: str, path: Path, server_check: bool) -> bool:
    """Raise ChecksumMismatchError unless ``head`` describes the local file; return whether a server checksum matched.

    Size and the SHA-256 metadata always; then, with ``server_check``, the full-object CRC32 the server validated
    on receipt, or, for objects without one (servers that keep no checksums, objects another tool uploaded with a
    composite "CRC of part CRCs"), the MD5 ETag the server computed (the file is read again for the MD5).
    """
    size = int(head.get("ContentLength", -1))
    sha = head.get("Metadata", {}).get(_SHA_META)
    if size != digest.size:
        raise ChecksumMismatchError(f"{key}: the server has {size} bytes, the local file {digest.size}. Fix: rerun.")
    if sha != digest.sha256:
        raise ChecksumMismatchError(f"{key}: SHA-256 metadata {sha!r} differs from the local file's. Fix: rerun.")
    if not server_check:
        return False
    crc = head.get("ChecksumCRC32")
    if crc and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" and "-" not in crc:
        if crc != digest.crc32:
            raise ChecksumMismatchError(
                f"{key}: the server's CRC32 {crc} differs from the local file's ({digest.crc32}): the stored bytes "
                "are not the local file's (was it changed during the upload?). Fix: rerun the upload."
            )
        return True
    etag = _etag_of(head)
    if not _MD5_ETAG.match(etag):
        return False
    expected = digest.etag or _hash_file(path, digest.size, md5=True).etag
    if etag.partition("-")[2] != str(expected).partition("-")[2]:
        return False
    if etag != expected:
        raise ChecksumMismatchError(
            f"{key}: the server's ETag {etag} differs from the MD5 computed locally ({expected}): the stored bytes "
            "are not the local file's. Fix: rerun the upload. (With SSE-KMS on AWS, ETags are not MD5s: pass "
            "verify_server_checksum=False / --no-server-checksum.)"
        )
    return True


# the locks this process's finished uploads could not delete (the server was down): (endpoint, bucket, stem) ->
# (key, ETag). The next upload from this process to that prefix may take such a lock over at once.
_ABANDONED_LOCKS: dict[tuple[str | None, str, str], tuple[str, str]] = {}
_ABANDONED_GUARD = threading.Lock()


def _process_identity() -> dict[str, Any]:
    """Who holds a lock: host and pid, and on Linux the boot and pid namespace (to tell whether it still runs)."""
    identity: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    with contextlib.suppress(OSError):
        identity["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        identity["pidns"] = os.readlink("/proc/self/ns/pid")
    return identity


def _holder_exited(holder: dict) -> bool:
    """Whether a lock's holder is another process of this machine (same boot and pid namespace) that has exited."""
    mine = _process_identity()
    pid = holder.get("pid")
    if "pidns" not in mine or any(holder.get(k) != mine[k] for k in ("host", "boot", "pidns")):
        return False  # another machine or container: its processes cannot be seen from here
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == mine["pid"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class _PrefixLock:
    """One writer per prefix: numbered lock objects created with a conditional PUT, renewed while the upload runs.

    The lock is the highest of ``<prefix>/.detox-sft-upload.lock.<n>``. A writer creates the next number with
    ``If-None-Match: *``, so of two writers only one can create it; it then renews its own object (nobody else writes
    it) and checks that no higher one exists. A stale lock is taken over by creating the next number, never by
    overwriting it: the pinned SeaweedFS 4.48 honours ``If-None-Match: *`` atomically (8 racing writers, one wins,
    in 100 of 100 rounds) but not ``If-Match`` (two writers won in 11 of 100 rounds), so nothing here depends on
    ``If-Match`` being atomic (tests/test_local_s3.py). Whether a lock expired is judged on the server's clock (its
    LastModified against the Date of the response), so skewed clocks on the writers' machines do not matter.

    Args:
        client, bucket, prefix: where.
        ttl: seconds the lock stays valid without renewal; renewed every third of that.
        force: take over a lock that has not expired.
        endpoint: the endpoint, to recognise a lock this process left behind.
    """

    def __init__(self, client, bucket: str, prefix: str, ttl: float, force: bool, endpoint: str | None) -> None:
        self.client, self.bucket, self.prefix, self.ttl, self.force = client, bucket, prefix, float(ttl), force
        self.stem = _join(prefix, LOCK_NAME)
        self._registry_key = (endpoint, bucket, self.stem)
        self._body = {"tool": "detox-sft", "owner": uuid.uuid4().hex, "ttl": self.ttl, **_process_identity()}
        self.key: str | None = None  # our lock object, once created
        self.etag: str | None = None
        self.lost: str | None = None  # why the lock is no longer ours, found by a renewal
        self._mutex = threading.Lock()  # renewals from the heartbeat and from confirm() must not overlap
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _locks(self) -> list[tuple[int, str]]:
        """(number, key) of the lock objects of this prefix, lowest first."""
        found = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.stem}.")
        for page in pages:
            for item in page.get("Contents", []):
                number = item["Key"][len(self.stem) + 1 :]
                if number.isdigit():
                    found.append((int(number), item["Key"]))
        return sorted(found)

    def _top(self) -> str | None:
        """The key of the lock object that holds the lock now (the highest number), or None."""
        locks = self._locks()
        return locks[-1][1] if locks else None

    def _put(self, key: str, **condition: str) -> None:
        body = {**self._body, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
        response = self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=json.dumps(body).encode(),
            ContentType="application/json",
            **condition,
        )
        self.key, self.etag = key, response["ETag"]

    def acquire(self) -> str:
        """Take the lock, or raise PrefixLockedError; return why a lock left there was taken over ("" if none)."""
        from botocore.exceptions import ClientError

        for _ in range(5):  # a lock can be released or taken over by a third writer between our requests
            locks = self._locks()
            reason, number = "", 0
            if locks:
                found = self._read(locks[-1][1])
                if found is None:
                    continue
                holder, etag, age, ttl = found
                reason = self._takeover_reason(holder, locks[-1][1], etag, age, ttl)
                if not reason:
                    raise PrefixLockedError(self._held_message(holder, locks[-1][1], age, ttl))
                number = locks[-1][0] + 1
            key = f"{self.stem}.{number:06d}"
            try:
                self._put(key, IfNoneMatch="*")
            except ClientError as exc:
                if _code(exc) == "NotImplemented":
                    raise StorageError(
                        f"The S3 server refuses conditional writes (If-None-Match), which the upload's lock on "
                        f"s3://{self.bucket}/{self.prefix} needs (one writer per prefix). Fix: use a server that "
                        "supports them (AWS S3 and the SeaweedFS of the tests do)."
                    ) from None
                if _code(exc) not in _PRECONDITION | _CONDITIONAL_CONFLICT:
                    raise
                continue  # another writer created that number first: look again
            if self._top() != key:  # a writer with an older listing made a higher one meanwhile
                self.client.delete_object(Bucket=self.bucket, Key=key)
                self.key = self.etag = None
                continue
            return self._start(reason)
        raise PrefixLockedError(
            f"s3://{self.bucket}/{self.stem}: other uploads keep taking the lock on this prefix. Fix: run one upload "
            "to a prefix at a time."
        )

    def _read(self, key: str) -> tuple[dict, str, float, float] | None:
        """(holder, ETag, seconds since its last renewal, its ttl) of a lock object, or None if it is gone."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        try:
            holder = json.loads(response["Body"].read())
        except ValueError:
            holder = None
        holder = holder if isinstance(holder, dict) else {}  # an unreadable lock still locks, for its ttl
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        age = (now - response["LastModified"]).total_seconds()
        ttl = holder.get("ttl")
        ttl = float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0 else self.ttl
        return holder, response["ETag"], age, ttl

    def _takeover_reason(self, holder: dict, key: str, etag: str, age: float, ttl: float) -> str:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        with _ABANDONED_GUARD:
            abandoned = _ABANDONED_LOCKS.get(self._registry_key) == (key, etag)
        if abandoned:
            return "left by an earlier upload of this process that could not delete it"
        if age > ttl:
            return f"{who}, not renewed for {age:.0f} s (lock_ttl {ttl:.0f} s)"
        if _holder_exited(holder):
            return f"{who}, which has exited"
        if self.force:
            return f"{who}, renewed {age:.0f} s ago, taken over with force_lock"
        return ""

    def _held_message(self, holder: dict, key: str, age: float, ttl: float) -> str:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "an unreadable lock"
        return (
            f"s3://{self.bucket}/{self.prefix} is being uploaded by another run ({who}; lock {key} renewed "
            f"{max(age, 0):.0f} s ago, expires in {max(ttl - age, 0):.0f} s): two writers on one prefix would mix "
            "their files. Fix: wait for that upload to finish. If it is dead (a killed pod), rerun once the lock has "
            "expired, or now with force_lock=True (recipe storage.force_lock)."
        )

    def _start(self, reason: str) -> str:
        with _ABANDONED_GUARD:
            _ABANDONED_LOCKS.pop(self._registry_key, None)
        self._heartbeat = threading.Thread(target=self._beat, name=f"detox-sft lock {self.stem}", daemon=True)
        self._heartbeat.start()
        return reason

    def _renew(self) -> None:
        """Rewrite our lock object (a new LastModified) and check that no upload has created a higher one."""
        from botocore.exceptions import ClientError

        with self._mutex:
            if self.lost or self.key is None:
                return
            try:
                # If-Match: a lock object that a newer holder has deleted must not come back
                self._put(self.key, IfMatch=str(self.etag))
            except ClientError as exc:
                if _code(exc) not in _PRECONDITION | {"NoSuchKey"}:
                    raise
                self.lost = "another upload took the lock over and removed this one's (it had not renewed in time)"
                return
            if self._top() != self.key:
                self.lost = "another upload took the lock over (this one had not renewed it within lock_ttl)"

    def _beat(self) -> None:
        from botocore.exceptions import ClientError

        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except _unreachable():
                continue  # botocore has retried already; the next beat tries again, confirm() decides
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                if _code(exc) in _CONDITIONAL_CONFLICT or status >= 500:  # busy or failing server: try again later
                    continue
                with self._mutex:
                    self.lost = f"renewing it failed ({_code(exc)})"
            if self.lost:
                return

    def confirm(self) -> None:
        """Renew the lock now; raise PrefixLockedError if it is no longer ours (called before the marker)."""
        self._renew()
        if self.lost:
            raise PrefixLockedError(
                f"s3://{self.bucket}/{self.prefix}: lost the upload lock: {self.lost}. The completion marker was not "
                "written. Fix: rerun the upload once the other one has finished."
            )

    def release(self) -> None:
        """Stop renewing; delete our lock object and the stale ones below it. Never raises: a lock left expires."""
        from botocore.exceptions import ClientError

        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.key is None:
            return
        try:
            mine = int(self.key[len(self.stem) + 1 :])
            for number, key in self._locks():
                if number <= mine:  # ours, and those it superseded; a higher one is a newer holder's
                    self.client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            # any refusal (5xx, a policy without DeleteObject): this runs in upload_dir's `finally`, where raising
            # would hide the upload's own outcome; the lock is left to expire, and the user is told
            self._abandon(_code(exc))
        except _unreachable() as exc:
            self._abandon(type(exc).__name__)

    def _abandon(self, why: str) -> None:
        with _ABANDONED_GUARD:
            _ABANDONED_LOCKS[self._registry_key] = (str(self.key), str(self.etag))
        warnings.warn(
            f"Could not delete the upload lock s3://{self.bucket}/{self.key} ({why}). The next upload from this "
            f"process takes it over; others wait until it expires ({self.ttl:.0f} s) or pass force_lock=True.",
            UserWarning,
            stacklevel=3,
        )


def upload_dir(
    local_dir: str | os.PathLike[str],
    prefix: str | None = None,
    *,
    settings: S3Settings | None = None,
    bucket: str | None = None,
    client=None,
    recipe: Recipe | None = None,
    max_concurrency: int | None = None,
    create_bucket: bool = False,
    progress: bool = True,
    verify_server_checksum: bool = True,
    delete_extra: bool = False,
    max_bandwidth: int | None = None,
    use_hash_cache: bool = True,
    lock_ttl: float | None = None,
    force_lock: bool | None = None,
) -> UploadReport:
    """Upload a directory under a prefix: parallel multipart transfers, unchanged files skipped, all verified.

    Args:
        local_dir: the directory (e.g. ``runs/offline/export/hf``); its relative paths become keys under ``prefix``.
        prefix: key prefix; default ``recipe.storage.prefix`` (``models/opt-350m-detox``). Use
            :func:`model_prefixes` for the ``/caikit`` and ``/hf`` sub-prefixes.
        settings: connection; default :meth:`S3Settings.from_env` (the data connection).
        bucket: overrides ``settings.bucket``.
        client: a boto3 client to reuse (its pool should hold ``max_concurrency`` connections).
        recipe: supplies the defaults of ``prefix``, ``max_concurrency``, ``lock_ttl`` and ``force_lock``.
        max_concurrency: parallel requests (files and parts); default ``recipe.storage.max_concurrency`` or 8.
        create_bucket: create the bucket if it is missing (otherwise that is an error).
        progress: show a tqdm bar (bytes; unchanged files count as done).
        verify_server_checksum: also compare the checksum the server computed (CRC32, else MD5 ETag) with ours.
        delete_extra: delete objects under the prefix that are not in the directory (a stale shard, say).
        max_bandwidth: cap in bytes per second (s3transfer's limiter), for shared links.
        use_hash_cache: reuse local SHA-256s of files unchanged since the last run (size, mtime, ctime, inode).
        lock_ttl: seconds the prefix's lock stays valid without renewal; default ``recipe.storage.lock_ttl`` (300).
        force_lock: take over another upload's lock on the prefix before it expires, for a writer known to be dead;
            default ``recipe.storage.force_lock`` (False).

    Returns:
        An :class:`UploadReport`.

    Raises:
        FileNotFoundError: ``local_dir`` is missing or empty.
        PrefixLockedError: another upload to the prefix is running (or took the lock over from this one).
        BucketNotFoundError, S3AuthError, S3UnavailableError: the bucket, the credentials, the endpoint.
        ChecksumMismatchError: an object does not match its file (the server refused it, or the check after it).
        In every failure case the completion marker is absent: rerun to resume.
    """
    start = time.perf_counter()
    local = Path(local_dir)
    files = _files_to_upload(local)
    storage = recipe.storage if recipe is not None else StorageConfig()
    prefix = _norm_prefix(prefix if prefix is not None else storage.prefix)
    concurrency = max_concurrency or storage.max_concurrency
    settings = _settings(settings, bucket)
    name = settings.require_bucket()
    client = client or settings.client(max_pool_connections=2 * concurrency + 2)
    ensure_bucket(create_bucket, settings=settings, client=client)
    lock = _PrefixLock(
        client,
        name,
        prefix,
        storage.lock_ttl if lock_ttl is None else lock_ttl,
        storage.force_lock if force_lock is None else force_lock,
        settings.endpoint,
    )
    run = _Upload(client, name, prefix, files, _HashCache(local, use_hash_cache), concurrency, verify_server_checksum)
    bar = _Bar(sum(p.stat().st_size for _, p in files), f"upload s3://{name}/{prefix}", progress)
    try:
        with _s3_errors(settings, f"upload {local} to s3://{name}/{prefix}"):
            run.report.lock_taken_over = lock.acquire()
            run.open_prefix()
            run.transfer(bar, max_bandwidth)
            run.verify_uploaded()
            if delete_extra:
                run.delete_extra()
            lock.confirm()
            run.write_marker()
    finally:
        bar.close()
        lock.release()
        run.cache.save()
    report = run.report
    report.uploaded.sort()
    report.skipped.sort()
    report.seconds = time.perf_counter() - start
    return report


def _files_to_upload(local: Path) -> list[tuple[str, Path]]:
    if not local.is_dir():
        raise FileNotFoundError(
            f"Nothing to upload: {local} is not a directory. Fix: run `detox-sft export` first "
            "(notebooks/3-save_convert_model.ipynb) or give the right directory."
        )
    files = _local_files(local)
    if not files:
        raise FileNotFoundError(f"Nothing to upload: {local} has no files.")
    return files


class _Upload:
    """The steps of one :func:`upload_dir` run, in order; they share the listing, the digests and the report."""

    def __init__(
        self,
        client,
        bucket: str,
        prefix: str,
        files: list[tuple[str, Path]],
        cache: _HashCache,
        concurrency: int,
        verify_server: bool,
    ) -> None:
        self.client, self.bucket, self.prefix, self.files = client, bucket, prefix, files
        self.cache, self.concurrency, self.verify_server = cache, concurrency, verify_server
        self.report = UploadReport(bucket=bucket, prefix=prefix, files=len(files), marker_key=_marker_key(prefix))
        self.existing: dict[str, S3Object] = {}
        self.previous: dict[str, dict] = {}  # path -> entry of the last completed upload's manifest
        self.digests: dict[str, _Digest] = {}
        self.etags: dict[str, str] = {}  # the ETag each verified object has, recorded in the manifest

    def open_prefix(self) -> None:
        """List the prefix, abort a dead run's multipart uploads, read the last manifest, delete the marker.

        Called with the prefix's lock held: an upload still open under the prefix is a dead (or expired) writer's.
        """
        client, name, report = self.client, self.bucket, self.report
        self.existing = {o.key: o for o in _list(client, name, self.prefix)}
        # a sub-prefix with a lock of its own is another writer's ground (e.g. <prefix>/hf while this is <prefix>)
        others = tuple(
            {k.rpartition("/")[0] for k in self.existing if _is_lock_name(k.rpartition("/")[2])} - {self.prefix}
        )
        report.aborted_uploads = _abort_unfinished_uploads(client, name, self.prefix, others)
        if report.marker_key in self.existing:
            try:
                old = _read_manifest(client, name, report.marker_key) or {"files": []}
                self.previous = {f["path"]: f for f in old["files"]}
            except ValueError as exc:
                warnings.warn(
                    f"The completion marker s3://{name}/{report.marker_key} is damaged ({exc}); every object is "
                    "checked again on the server and the marker rewritten.",
                    UserWarning,
                    stacklevel=4,
                )
            # the old marker goes first: from now until the new one is written, the prefix is "in progress"
            client.delete_object(Bucket=name, Key=report.marker_key)
        keys = {_join(self.prefix, rel) for rel, _ in self.files}
        report.extra_keys = sorted(
            k for k in self.existing if k not in keys and k != report.marker_key and not _is_own_lock(k, self.prefix)
        )

    def plan(self, rel: str, path: Path) -> tuple[str, Path, _Digest, dict | bool]:
        """(key, path, digest, how to skip): True = listing + manifest, a HEAD dict = metadata, False = upload."""
        key = _join(self.prefix, rel)
        digest = self.cache.digest(path, rel)
        remote = self.existing.get(key)
        if remote is None or remote.size != digest.size:
            return key, path, digest, False
        last = self.previous.get(rel, {})
        if remote.etag and last.get("etag") == remote.etag and last.get("sha256") == digest.sha256:
            # the object has the ETag it had when the last upload verified it, and that upload recorded the
            # SHA-256 the file still has: same content, no request needed
            return key, path, digest, True
        head = _head(self.client, self.bucket, key)
        if head.get("Metadata", {}).get(_SHA_META) == digest.sha256:
            return key, path, digest, head
        return key, path, digest, False

    def transfer(self, bar: _Bar, max_bandwidth: int | None) -> None:
        """Plan every file and upload the changed ones; an upload starts as soon as its file is hashed."""
        from s3transfer.manager import TransferManager

        transfers: dict[Future, str] = {}
        config = _transfer_config(self.concurrency, max_bandwidth)
        with (
            ThreadPoolExecutor(max_workers=min(self.concurrency, 4)) as planner,
            TransferManager(self.client, config) as tm,
        ):
            pending = {planner.submit(self.plan, rel, path) for rel, path in self.files}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    key, path, digest, skip = fut.result()
                    self.digests[key] = digest
                    if skip is not False:
                        self._keep(key, path, digest, skip, bar)
                        continue
                    # our full-object CRC32: the server refuses the object (BadDigest) if the bytes it got differ
                    extra = {"Metadata": {_SHA_META: digest.sha256}, "ChecksumCRC32": digest.crc32}
                    future = tm.upload(str(path), self.bucket, key, extra_args=extra, subscribers=[_subscriber(bar)])
                    transfers[future] = key
            for future, key in transfers.items():
                future.result()
                self.report.uploaded.append(key)
                self.report.bytes_uploaded += self.digests[key].size

    def _keep(self, key: str, path: Path, digest: _Digest, skip: dict | bool, bar: _Bar) -> None:
        """Skip an unchanged object: checked on the server by the HEAD its plan made, or vouched for by the manifest."""
        report = self.report
        if skip is True:
            report.skipped_unchanged += 1  # no request made: the listing and the last manifest agree
        else:
            report.verified += 1
            report.server_verified += _check_object(skip, digest, key, path, self.verify_server)
        self.etags[key] = self.existing[key].etag
        report.skipped.append(key)
        report.bytes_skipped += digest.size
        bar.update(digest.size)

    def verify_uploaded(self) -> None:
        """The check after the transfers: one HEAD per uploaded object, compared with the local file."""
        paths = {_join(self.prefix, rel): path for rel, path in self.files}

        def check(key: str) -> tuple[str, bool, str]:
            head = _head(self.client, self.bucket, key)
            return key, _check_object(head, self.digests[key], key, paths[key], self.verify_server), _etag_of(head)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for key, server_ok, etag in pool.map(check, self.report.uploaded):
                self.report.verified += 1
                self.report.server_verified += server_ok
                self.etags[key] = etag

    def delete_extra(self) -> None:
        """Delete the objects under the prefix that are not in the directory, 1000 per request."""
        extra = self.report.extra_keys
        for i in range(0, len(extra), 1000):
            batch = [{"Key": k} for k in extra[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def write_marker(self) -> None:
        """Write the completion marker (the manifest: every file's size, SHA-256 and ETag), last."""
        manifest = {
            "tool": "detox-sft",
            "version": 1,
            "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "prefix": self.prefix,
            "files": [
                {
                    "path": rel,
                    "size": self.digests[_join(self.prefix, rel)].size,
                    "sha256": self.digests[_join(self.prefix, rel)].sha256,
                    "etag": self.etags[_join(self.prefix, rel)],
                }
                for rel, _ in self.files
            ],
        }
        # one PutObject: S3 makes the object visible whole or not at all, so the marker is never half-written
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.report.marker_key,
            Body=json.dumps(manifest, indent=1).encode(),
            ContentType="application/json",
        )


def _safe_dest(root: Path, rel: str) -> Path:
    dest = (root / rel).resolve()
    if rel.startswith("/") or ".." in PurePosixPath(rel).parts or not dest.is_relative_to(root.resolve()):
        raise StorageError(f"refusing object {rel!r}: it would be written outside {root}.")
    return dest


def _read_manifest(client, bucket: str, key: str) -> dict | None:
    """The manifest in the completion marker ``key``; None if there is none.

    Raises:
        ValueError: the marker is not a detox-sft manifest (truncated, edited by hand, another tool's).
    """
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    manifest = json.loads(body)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    files = manifest.get("files") if isinstance(manifest, dict) else None
    entry_types = {"path": str, "size": int, "sha256": str, "etag": str}
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and all(isinstance(f.get(k), t) for k, t in entry_types.items()) for f in files
    ):
        raise ValueError("not a list of files with path, size, sha256 and etag")
    return manifest


def download_prefix(
    prefix: str,
    local_dir: str | os.PathLike[str],
    *,
    settings: S3Settings | None = None,
    bucket: str | None = None,
    client=None,
    max_concurrency: int = 8,
    require_complete: bool = True,
    progress: bool = True,
    use_hash_cache: bool = True,
) -> DownloadReport:
    """Download the objects under ``prefix/`` into ``local_dir``; verified, atomic per file, unchanged files skipped.

    Args:
        prefix: key prefix, e.g. ``models/opt-350m-detox/caikit``.
        local_dir: destination (created); relative key paths are kept.
        settings, bucket, client: connection, as in :func:`upload_dir`.
        max_concurrency: parallel requests.
        require_complete: refuse a prefix without a completion marker (an upload that did not finish, or one not
            made by detox-sft). With False, every object is fetched and checked against its SHA-256 metadata when
            it has some.
        progress: show a tqdm bar (bytes).
        use_hash_cache: reuse local SHA-256s to recognise files already present.

    Returns:
        A :class:`DownloadReport`.

    Raises:
        IncompleteUploadError: no marker (with ``require_complete``), or an object listed in it is missing.
        ChecksumMismatchError: a downloaded file does not match its recorded SHA-256 (it is not kept).
        DiskFullError: no room for a file (disk full, quota, file-size limit); the verified files are kept.
        BucketNotFoundError, S3AuthError, S3UnavailableError: as :func:`ensure_bucket`.
    """
    start = time.perf_counter()
    prefix = _norm_prefix(prefix)
    settings = _settings(settings, bucket)
    name = settings.require_bucket()
    client = client or settings.client(max_pool_connections=2 * max_concurrency + 2)
    root = Path(local_dir)
    report = DownloadReport(bucket=name, prefix=prefix, local_dir=str(root))
    what = f"download s3://{name}/{prefix}"
    with _s3_errors(settings, what):
        wanted = _wanted_objects(client, name, prefix, what, require_complete, report)
        report.files = len(wanted)
        root.mkdir(parents=True, exist_ok=True)
        run = _Download(client, name, root, report, _HashCache(root, use_hash_cache), max_concurrency)
        todo = run.plan(wanted)
        run.fetch(todo, _Bar(sum(t[2] for t in todo), f"download s3://{name}/{prefix}", progress))
    report.downloaded.sort()
    report.skipped.sort()
    report.seconds = time.perf_counter() - start
    return report


def _wanted_objects(
    client, bucket: str, prefix: str, what: str, require_complete: bool, report: DownloadReport
) -> list[tuple[str, str, int, str | None]]:
    """What to fetch: (relative path, key, size, expected SHA-256 or None) per object.

    The manifest's files, or every listed object when there is no manifest and ``require_complete`` is false.
    """
    listing = {o.key: o for o in _list(client, bucket, prefix)}
    marker = _marker_key(prefix)
    try:
        manifest = _read_manifest(client, bucket, marker) if marker in listing else None
    except ValueError as exc:
        if require_complete:
            raise IncompleteUploadError(
                f"{what}: the completion marker {marker} is damaged ({exc}), so the upload cannot be trusted. Fix: "
                "rerun `detox-sft upload` for this prefix (it checks every object and rewrites the marker), or pass "
                "require_complete=False / --allow-incomplete to fetch the objects checked by their SHA-256 metadata."
            ) from None
        warnings.warn(
            f"{what}: the completion marker {marker} is damaged ({exc}); every object is fetched and checked by "
            "its SHA-256 metadata instead.",
            UserWarning,
            stacklevel=3,
        )
        manifest = None
    if manifest is None and require_complete:
        hint = "it is empty" if not listing else f"{len(listing)} objects but no {MARKER_NAME}"
        raise IncompleteUploadError(
            f"{what}: not a finished detox-sft upload ({hint}). Fix: rerun `detox-sft upload` for this prefix "
            "until it completes, or pass require_complete=False / --allow-incomplete for objects uploaded by "
            "another tool."
        )
    wanted: list[tuple[str, str, int, str | None]] = []
    if manifest is not None:
        report.complete = True
        for entry in manifest["files"]:
            key = _join(prefix, entry["path"])
            obj = listing.get(key)
            if obj is None or obj.size != entry["size"]:
                raise IncompleteUploadError(
                    f"{what}: {key} is {'missing' if obj is None else 'of another size'} although the marker "
                    "lists it: the prefix changed after the upload. Fix: rerun the upload."
                )
            wanted.append((entry["path"], key, entry["size"], entry["sha256"]))
    else:
        for key, obj in sorted(listing.items()):
            if key != marker and not _is_own_lock(key, prefix):
                wanted.append((key[len(prefix) + 1 :] if prefix else key, key, obj.size, None))
    if not wanted:
        raise IncompleteUploadError(f"{what}: no objects under this prefix. Fix: check the prefix (and bucket).")
    return wanted


_PART_SUFFIX = ".detox-sft-part"


def _remove_dead_parts(dest: Path) -> None:
    """Delete the temporary files of ``dest`` that a killed download left (their writer's pid is gone).

    Why by pid: a SIGKILLed download cannot clean up (the fault-injection suite found them), and a live concurrent
    download into the same directory must keep its own. s3transfer writes each of ours through a temporary file of
    its own (``<ours>.<random>``), renamed when complete: those go too.
    """
    for part in dest.parent.glob(f".{glob.escape(dest.name)}.*{_PART_SUFFIX}*"):
        pid = part.name[len(dest.name) + 2 :].partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        except PermissionError:  # another user's live process
            continue


class _Download:
    """The steps of one :func:`download_prefix` run after the listing: what to fetch, then fetch and verify."""

    def __init__(
        self, client, bucket: str, root: Path, report: DownloadReport, cache: _HashCache, concurrency: int
    ) -> None:
        self.client, self.bucket, self.root, self.report = client, bucket, root, report
        self.cache, self.concurrency = cache, concurrency
        self._lock = threading.Lock()

    def _expected_sha(self, key: str, known: str | None) -> tuple[str | None, str]:
        if known is not None:
            return known, ""
        head = self.client.head_object(Bucket=self.bucket, Key=key)
        return head.get("Metadata", {}).get(_SHA_META), _etag_of(head)

    def plan(self, wanted: list[tuple[str, str, int, str | None]]) -> list[tuple]:
        """(rel, key, size, sha, etag, dest) of each object to fetch; a file already there with its SHA-256 is kept."""
        todo = []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            shas = list(pool.map(lambda w: self._expected_sha(w[1], w[3]), wanted))
        for (rel, key, size, _), (sha, etag) in zip(wanted, shas, strict=True):
            dest = _safe_dest(self.root, rel)
            _remove_dead_parts(dest)
            if sha and dest.is_file() and dest.stat().st_size == size and self.cache.digest(dest, rel).sha256 == sha:
                self.report.skipped.append(rel)
                self.report.verified += 1
                continue
            todo.append((rel, key, size, sha, etag, dest))
        return todo

    def fetch(self, todo: list[tuple], bar: _Bar) -> None:
        """Download each object to a temporary file beside its destination, verify it, rename it into place."""
        from s3transfer.manager import TransferManager

        tmp_files: list[Path] = []
        try:
            config = _transfer_config(self.concurrency)
            with TransferManager(self.client, config) as tm, ThreadPoolExecutor(max_workers=2) as hasher:
                futures = {}
                for rel, key, size, sha, etag, dest in todo:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    # a name of its own: two downloads into one directory must not share a temporary file
                    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{_PART_SUFFIX}")
                    tmp_files.append(tmp)
                    future = tm.download(self.bucket, key, str(tmp), subscribers=[_subscriber(bar)])
                    futures[future] = (rel, key, size, sha, etag, dest, tmp)
                checks = []
                for future, item in futures.items():
                    try:
                        future.result()
                    except OSError as exc:
                        if exc.errno not in NO_ROOM:
                            raise
                        raise DiskFullError(
                            f"No room to write {item[5]} ({exc.strerror}: {no_room_hint(exc)}). The "
                            f"files already downloaded to {self.root} are complete and verified; nothing partial "
                            "was kept. Fix: free disk space (or raise the limit, or pick a bigger directory), then "
                            "rerun: only the missing files are fetched."
                        ) from exc
                    checks.append(hasher.submit(self._finish, item))
                for check in checks:
                    check.result()
        finally:
            bar.close()
            self.cache.save()
            for tmp in tmp_files:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _finish(self, item: tuple) -> None:
        """Check a downloaded file against its SHA-256 (or plain MD5 ETag), then move it into place."""
        rel, key, size, sha, etag, dest, tmp = item
        # the MD5 only for objects without a recorded SHA-256 whose ETag is a plain MD5
        plain_md5 = sha is None and "-" not in etag and bool(_MD5_ETAG.match(etag))
        digest = _hash_file(tmp, tmp.stat().st_size, md5=plain_md5)
        if digest.size != size:
            raise ChecksumMismatchError(f"{key}: got {digest.size} bytes, expected {size}. Fix: rerun.")
        if sha is not None:
            if digest.sha256 != sha:
                raise ChecksumMismatchError(
                    f"{key}: downloaded content has SHA-256 {digest.sha256[:12]}..., the upload recorded "
                    f"{sha[:12]}...: the object changed or was corrupted. Fix: rerun the upload."
                )
        elif plain_md5 and etag != digest.etag:
            raise ChecksumMismatchError(f"{key}: MD5 differs from the object's ETag. Fix: rerun.")
        os.replace(tmp, dest)
        self.cache.record(dest, rel, digest)
        with self._lock:
            self.report.verified += sha is not None
            if sha is None:
                self.report.unverified.append(rel)
            self.report.downloaded.append(rel)
            self.report.bytes_downloaded += size


def upload_export(
    recipe: Recipe,
    *,
    settings: S3Settings | None = None,
    create_bucket: bool = False,
    progress: bool = True,
) -> dict[str, UploadReport]:
    """Upload the run's exports: ``export/caikit/<model_id>`` to ``<prefix>/caikit``, ``export/hf`` to ``<prefix>/hf``.

    Returns:
        ``{"caikit": UploadReport, "hf": UploadReport}`` for the directories that exist.

    Raises:
        FileNotFoundError: neither export exists (run the export step first).
    """
    export = recipe.paths.export
    sources = {"caikit": recipe.paths.caikit_export(recipe.export.model_id), "hf": recipe.paths.hf_export}
    present = {kind: path for kind, path in sources.items() if path.is_dir()}
    if not present:
        raise FileNotFoundError(
            f"No export in {export} — run notebooks/3-save_convert_model.ipynb first (or `detox-sft export`)."
        )
    prefixes = model_prefixes(recipe.storage.prefix)
    return {
        kind: upload_dir(
            path, prefixes[kind], settings=settings, recipe=recipe, create_bucket=create_bucket, progress=progress
        )
        for kind, path in present.items()
    }


def upload_prefix(local_dir: str | os.PathLike[str], base: str = DEFAULT_PREFIX) -> str:
    """The key prefix a directory goes under: ``<base>/caikit`` for a Caikit directory, ``<base>/hf`` for a
    Hugging Face one (see :func:`model_prefixes`), ``<base>`` for anything else."""
    local, prefixes = Path(local_dir), model_prefixes(base)
    if (local / "config.yml").is_file():  # caikit-nlp's saved module
        return prefixes["caikit"]
    if (local / "config.json").is_file():  # a Hugging Face model directory
        return prefixes["hf"]
    return _norm_prefix(base)
