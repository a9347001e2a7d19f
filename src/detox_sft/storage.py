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
* After the transfers, every uploaded object is checked with a HEAD request: size, the SHA-256 metadata, and a
  checksum the *server* holds for the bytes it received: the CRC32 that botocore sends with every PUT and part,
  which the server validates on receipt (a wrong one is refused with BadDigest; composite "CRC of part CRCs" for a
  multipart upload). We compute the same CRC32 locally in the hashing pass, with the same part split, so a match
  shows the server holds the bytes we hashed, without downloading them. A server that keeps no CRC32 is checked
  with its MD5 ETag instead (the file is read again for the MD5). CRC32 detects accidental change (a file
  rewritten during the upload, corruption), not tampering; the SHA-256 is what downloads verify.
  An unchanged object skipped on a rerun is checked through the manifest instead: the listing shows the ETag it had
  when the last completed upload verified it, and the manifest the SHA-256 the file still has.
* A completion marker ``<prefix>/.detox-sft-upload.json`` (the manifest: every file's size, SHA-256, ETag) is written
  LAST, after the checks, and deleted FIRST when an upload starts. A failed or interrupted upload therefore never
  looks done, and :func:`download_prefix` refuses a prefix without it unless told otherwise.
* The multipart uploads a killed run left open under the prefix (their parts stay stored, and billed, until they are
  aborted) are aborted when the next upload to that prefix starts: one writer per prefix.

A download writes each file to a temporary name beside it, checks its SHA-256 against the manifest (or the object's
metadata), then renames it into place, so a file is either complete and verified or absent.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detox_sft.config import Recipe

__all__ = [
    "StorageError",
    "S3ConfigError",
    "S3AuthError",
    "S3UnavailableError",
    "BucketNotFoundError",
    "IncompleteUploadError",
    "ChecksumMismatchError",
    "S3Settings",
    "S3Object",
    "UploadReport",
    "DownloadReport",
    "MARKER_NAME",
    "DEFAULT_PREFIX",
    "model_prefixes",
    "ensure_bucket",
    "list_prefix",
    "upload_dir",
    "download_prefix",
    "upload_export",
    "add_upload_arguments",
    "upload_main",
    "add_download_arguments",
    "download_main",
]

MARKER_NAME = ".detox-sft-upload.json"
DEFAULT_PREFIX = "models/opt-350m-detox"  # = StorageConfig.prefix; the manifests reference it
_SHA_META = "sha256"  # object metadata key (sent as x-amz-meta-sha256)
_MULTIPART_THRESHOLD = 8 * 1024 * 1024
_MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
_READ_SIZE = 4 * 1024 * 1024
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-\d+)?$")
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
    unreachable = (
        bexc.EndpointConnectionError | bexc.ConnectTimeoutError | bexc.ReadTimeoutError | bexc.ConnectionClosedError
    )
    if isinstance(exc, unreachable | ConnectionError):
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


@contextlib.contextmanager
def _s3_errors(settings: S3Settings, what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
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
    crc32: str  # the CRC32 an S3 server stores for our upload: base64, "-<parts>" appended for multipart
    etag: str | None = None  # the MD5 ETag it computes (plain or MD5 of part MD5s); only when asked (costly)


def _b64_crc(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def _hash_file(path: Path, size: int, md5: bool = False) -> _Digest:
    """SHA-256, the expected CRC32 checksum and (if ``md5``) the expected ETag, in one read, part by part.

    Parts follow s3transfer's split (8 MiB from 8 MiB on), so the composite values match what the server computes.
    """
    sha = hashlib.sha256()
    part = _part_size(size) or max(size, 1)
    crcs, md5s = [], []
    with open(path, "rb") as handle:
        while True:
            crc, part_md5 = 0, hashlib.md5(usedforsecurity=False) if md5 else None
            remaining, got = part, 0
            while remaining and (chunk := handle.read(min(_READ_SIZE, remaining))):
                sha.update(chunk)
                crc = zlib.crc32(chunk, crc)
                if part_md5 is not None:
                    part_md5.update(chunk)
                remaining -= len(chunk)
                got += len(chunk)
            if not got and crcs:
                break
            crcs.append(crc)
            md5s.append(part_md5)
            if not got:
                break
    if _part_size(size) is None:
        crc32, etag = _b64_crc(crcs[0]), (md5s[0].hexdigest() if md5 else None)
    else:
        joined = b"".join(c.to_bytes(4, "big") for c in crcs)
        crc32 = f"{_b64_crc(zlib.crc32(joined))}-{len(crcs)}"
        etag = None
        if md5:
            etag = f"{hashlib.md5(b''.join(m.digest() for m in md5s), usedforsecurity=False).hexdigest()}-{len(md5s)}"
    return _Digest(size, sha.hexdigest(), crc32, etag)


def _cache_root() -> Path:
    base = os.environ.get("DETOX_SFT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "detox-sft"


class _HashCache:
    """Local checksums of one directory, keyed by (size, mtime, ctime, inode): a rerun does not re-read files.

    ctime cannot be set by a program, so any write to a file invalidates its entry.
    """

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        key = hashlib.sha1(str(directory.resolve()).encode(), usedforsecurity=False).hexdigest()[:16]
        self.path = _cache_root() / "checksums" / f"{key}.json"
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}
        if enabled:
            with contextlib.suppress(OSError, ValueError):
                self._entries = json.loads(self.path.read_text())

    @staticmethod
    def _stamp(stat: os.stat_result) -> list:
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]

    def digest(self, path: Path, rel: str) -> _Digest:
        stat = path.stat()
        stamp = self._stamp(stat)
        with self._lock:
            entry = self._entries.get(rel)
        if self.enabled and entry and len(entry) == 7 and entry[:4] == stamp and entry[6] == _MULTIPART_CHUNKSIZE:
            return _Digest(stat.st_size, entry[4], entry[5])  # the ETag is not cached: computed when needed
        digest = _hash_file(path, stat.st_size)
        self.record(path, rel, digest)
        return digest

    def record(self, path: Path, rel: str, digest: _Digest) -> None:
        stamp = self._stamp(path.stat())
        with self._lock:
            self._entries[rel] = [*stamp, digest.sha256, digest.crc32, _MULTIPART_CHUNKSIZE]

    def save(self) -> None:
        if not self.enabled:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self._entries))
            os.replace(tmp, self.path)


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    files = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and path.name != MARKER_NAME:  # is_file follows symlinks (HF cache snapshots use them)
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
        verified: objects whose size and SHA-256 metadata were checked by HEAD after the upload (all of them).
        server_verified: of those, objects whose server-side checksum matched the one computed locally: the CRC32
            the server validated on receipt (or its MD5 ETag where it keeps no CRC32); for an unchanged object,
            its ETag is the one recorded when the last completed upload verified it.
        extra_keys: objects under the prefix that are not in the directory (left alone unless ``delete_extra``).
        aborted_uploads: keys of unfinished multipart uploads under the prefix (a killed earlier run's parts, which
            the server keeps, and bills, until they are aborted) that this run aborted before starting.
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
    extra_keys: list[str] = field(default_factory=list)
    aborted_uploads: list[str] = field(default_factory=list)
    marker_key: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        aborted = f", {len(self.aborted_uploads)} unfinished earlier upload(s) aborted" if self.aborted_uploads else ""
        return (
            f"s3://{self.bucket}/{self.prefix}: {len(self.uploaded)} uploaded ({self.bytes_uploaded / 2**20:.1f} MiB), "
            f"{len(self.skipped)} unchanged ({self.bytes_skipped / 2**20:.1f} MiB), {self.verified}/{self.files} "
            f"verified (size + SHA-256; server-side checksum: {self.server_verified}){aborted}, {self.seconds:.1f} s"
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


def _abort_unfinished_uploads(client, bucket: str, prefix: str) -> list[str]:
    """Abort the multipart uploads left open under ``prefix/`` (a run killed mid-transfer leaves its parts stored).

    Best effort: a server or a policy that does not allow listing them leaves them as they are. At the bucket's root
    (no prefix) nothing is aborted: every other prefix's uploads, live ones included, would be under it.
    """
    from botocore.exceptions import ClientError

    if not prefix:
        return []
    aborted = []
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(upload["Key"])
    except ClientError:
        pass  # not allowed or not implemented there: the parts stay, nothing else changes
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
    # ChecksumMode makes the server return the CRC32 it validated when it received the object
    return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")


def _check_object(head: dict, digest: _Digest, key: str, path: Path, server_check: bool) -> bool:
    """Raise ChecksumMismatchError unless ``head`` describes the local file; return whether a server checksum matched.

    Size and the SHA-256 metadata always; then, with ``server_check``, the CRC32 the server validated on receipt
    (cheap to compute locally), or, for servers that keep no CRC32, the MD5 ETag it computed (the file is read
    again for the MD5).
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
    if crc:
        if crc.partition("-")[2] != digest.crc32.partition("-")[2]:
            return False  # uploaded with another part size (another tool): the composite cannot be recomputed
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
) -> UploadReport:
    """Upload a directory under a prefix: parallel multipart transfers, unchanged files skipped, all verified.

    Args:
        local_dir: the directory (e.g. ``runs/offline/export/hf``); its relative paths become keys under ``prefix``.
        prefix: key prefix; default ``recipe.storage.prefix`` (``models/opt-350m-detox``). Use
            :func:`model_prefixes` for the ``/caikit`` and ``/hf`` sub-prefixes.
        settings: connection; default :meth:`S3Settings.from_env` (the data connection).
        bucket: overrides ``settings.bucket``.
        client: a boto3 client to reuse (its pool should hold ``max_concurrency`` connections).
        recipe: supplies the default prefix and ``max_concurrency``.
        max_concurrency: parallel requests (files and parts); default ``recipe.storage.max_concurrency`` or 8.
        create_bucket: create the bucket if it is missing (otherwise that is an error).
        progress: show a tqdm bar (bytes; unchanged files count as done).
        verify_server_checksum: also compare the checksum the server computed (CRC32, else MD5 ETag) with ours.
        delete_extra: delete objects under the prefix that are not in the directory (a stale shard, say).
        max_bandwidth: cap in bytes per second (s3transfer's limiter), for shared links.
        use_hash_cache: reuse local SHA-256s of files unchanged since the last run (size, mtime, ctime, inode).

    Returns:
        An :class:`UploadReport`.

    Raises:
        FileNotFoundError: ``local_dir`` is missing or empty.
        BucketNotFoundError, S3AuthError, S3UnavailableError: the bucket, the credentials, the endpoint.
        ChecksumMismatchError: an object does not match its file after the upload.
        In every failure case the completion marker is absent: rerun to resume.
    """
    from s3transfer.manager import TransferManager

    start = time.perf_counter()
    local = Path(local_dir)
    if not local.is_dir():
        raise FileNotFoundError(
            f"Nothing to upload: {local} is not a directory. Fix: run `detox-sft export` first "
            "(notebooks/3-save_convert_model.ipynb) or give the right directory."
        )
    files = _local_files(local)
    if not files:
        raise FileNotFoundError(f"Nothing to upload: {local} has no files.")
    storage = recipe.storage if recipe is not None else None
    prefix = _norm_prefix(prefix if prefix is not None else (storage.prefix if storage else DEFAULT_PREFIX))
    concurrency = max_concurrency or (storage.max_concurrency if storage else 8)
    settings = _settings(settings, bucket)
    name = settings.require_bucket()
    client = client or settings.client(max_pool_connections=2 * concurrency + 2)
    ensure_bucket(create_bucket, settings=settings, client=client)
    report = UploadReport(bucket=name, prefix=prefix, files=len(files), marker_key=_marker_key(prefix))
    cache = _HashCache(local, use_hash_cache)
    what = f"upload {local} to s3://{name}/{prefix}"
    bar = _Bar(sum(p.stat().st_size for _, p in files), f"upload s3://{name}/{prefix}", progress)
    try:
        with _s3_errors(settings, what):
            existing = {o.key: o for o in _list(client, name, prefix)}
            # one writer per prefix (the marker protocol): anything still open here is a dead run's
            report.aborted_uploads = _abort_unfinished_uploads(client, name, prefix)
            previous: dict[str, dict] = {}  # path -> entry of the last completed upload's manifest
            if report.marker_key in existing:
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    old = _read_manifest(client, name, report.marker_key) or {}
                    previous = {f["path"]: f for f in old.get("files", [])}
                # the old marker goes first: from now until the new one is written, the prefix is "in progress"
                client.delete_object(Bucket=name, Key=report.marker_key)
            keys = {_join(prefix, rel) for rel, _ in files}
            report.extra_keys = sorted(k for k in existing if k not in keys and k != report.marker_key)

            def plan(rel: str, path: Path) -> tuple[str, Path, _Digest, dict | bool]:
                """(key, path, digest, how to skip): True = listing + manifest, a HEAD dict = metadata, False = upload."""
                key = _join(prefix, rel)
                digest = cache.digest(path, rel)
                remote = existing.get(key)
                if remote is None or remote.size != digest.size:
                    return key, path, digest, False
                last = previous.get(rel, {})
                if remote.etag and last.get("etag") == remote.etag and last.get("sha256") == digest.sha256:
                    # the object has the ETag it had when the last upload verified it, and that upload recorded the
                    # SHA-256 the file still has: same content, no request needed
                    return key, path, digest, True
                head = _head(client, name, key)
                if head.get("Metadata", {}).get(_SHA_META) == digest.sha256:
                    return key, path, digest, head
                return key, path, digest, False

            digests: dict[str, _Digest] = {}
            etags: dict[str, str] = {}  # the ETag each verified object has, recorded in the manifest
            transfers: dict[Future, str] = {}
            config = _transfer_config(concurrency, max_bandwidth)
            with ThreadPoolExecutor(max_workers=min(concurrency, 4)) as planner, TransferManager(client, config) as tm:
                # plans (hash + HEAD) and transfers overlap: an upload starts as soon as its file is hashed
                pending = {planner.submit(plan, rel, path) for rel, path in files}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        key, path, digest, skip = fut.result()
                        digests[key] = digest
                        if skip is not False:
                            report.verified += 1
                            report.server_verified += skip is True or _check_object(
                                skip, digest, key, path, verify_server_checksum
                            )
                            etags[key] = existing[key].etag
                            report.skipped.append(key)
                            report.bytes_skipped += digest.size
                            bar.update(digest.size)
                            continue
                        extra = {"Metadata": {_SHA_META: digest.sha256}}
                        future = tm.upload(str(path), name, key, extra_args=extra, subscribers=[_subscriber(bar)])
                        transfers[future] = key
                for future, key in transfers.items():
                    future.result()
                    report.uploaded.append(key)
                    report.bytes_uploaded += digests[key].size

            # the check after the transfers: one HEAD per uploaded object, compared with the local file
            paths = {_join(prefix, rel): path for rel, path in files}

            def check(key: str) -> tuple[str, bool, str]:
                head = _head(client, name, key)
                return key, _check_object(head, digests[key], key, paths[key], verify_server_checksum), _etag_of(head)

            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                for key, server_ok, etag in pool.map(check, report.uploaded):
                    report.verified += 1
                    report.server_verified += server_ok
                    etags[key] = etag

            if delete_extra and report.extra_keys:
                for i in range(0, len(report.extra_keys), 1000):
                    batch = [{"Key": k} for k in report.extra_keys[i : i + 1000]]
                    client.delete_objects(Bucket=name, Delete={"Objects": batch, "Quiet": True})

            manifest = {
                "tool": "detox-sft",
                "version": 1,
                "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "prefix": prefix,
                "files": [
                    {
                        "path": rel,
                        "size": digests[_join(prefix, rel)].size,
                        "sha256": digests[_join(prefix, rel)].sha256,
                        "etag": etags[_join(prefix, rel)],
                    }
                    for rel, _ in files
                ],
            }
            client.put_object(
                Bucket=name,
                Key=report.marker_key,
                Body=json.dumps(manifest, indent=1).encode(),
                ContentType="application/json",
            )
    finally:
        bar.close()
        cache.save()
    report.uploaded.sort()
    report.skipped.sort()
    report.seconds = time.perf_counter() - start
    return report


def _safe_dest(root: Path, rel: str) -> Path:
    dest = (root / rel).resolve()
    if rel.startswith("/") or ".." in PurePosixPath(rel).parts or not dest.is_relative_to(root.resolve()):
        raise StorageError(f"refusing object {rel!r}: it would be written outside {root}.")
    return dest


def _read_manifest(client, bucket: str, key: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    return json.loads(body)


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
        BucketNotFoundError, S3AuthError, S3UnavailableError: as :func:`ensure_bucket`.
    """
    from s3transfer.manager import TransferManager

    start = time.perf_counter()
    prefix = _norm_prefix(prefix)
    settings = _settings(settings, bucket)
    name = settings.require_bucket()
    client = client or settings.client(max_pool_connections=2 * max_concurrency + 2)
    root = Path(local_dir)
    report = DownloadReport(bucket=name, prefix=prefix, local_dir=str(root))
    what = f"download s3://{name}/{prefix}"
    with _s3_errors(settings, what):
        listing = {o.key: o for o in _list(client, name, prefix)}
        marker = _marker_key(prefix)
        manifest = _read_manifest(client, name, marker) if marker in listing else None
        if manifest is None and require_complete:
            hint = "it is empty" if not listing else f"{len(listing)} objects but no {MARKER_NAME}"
            raise IncompleteUploadError(
                f"{what}: not a finished detox-sft upload ({hint}). Fix: rerun `detox-sft upload` for this prefix "
                "until it completes, or pass require_complete=False / --allow-incomplete for objects uploaded by "
                "another tool."
            )
        # (relative path, key, size, expected sha256 or None)
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
                if key != marker:
                    wanted.append((key[len(prefix) + 1 :] if prefix else key, key, obj.size, None))
        if not wanted:
            raise IncompleteUploadError(f"{what}: no objects under this prefix. Fix: check the prefix (and bucket).")
        report.files = len(wanted)
        root.mkdir(parents=True, exist_ok=True)
        cache = _HashCache(root, use_hash_cache)

        def expected_sha(key: str, known: str | None) -> tuple[str | None, str]:
            if known is not None:
                return known, ""
            head = client.head_object(Bucket=name, Key=key)
            return head.get("Metadata", {}).get(_SHA_META), _etag_of(head)

        todo = []
        with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            shas = list(pool.map(lambda w: expected_sha(w[1], w[3]), wanted))
        for (rel, key, size, _), (sha, etag) in zip(wanted, shas, strict=True):
            dest = _safe_dest(root, rel)
            if sha and dest.is_file() and dest.stat().st_size == size and cache.digest(dest, rel).sha256 == sha:
                report.skipped.append(rel)
                report.verified += 1
                continue
            todo.append((rel, key, size, sha, etag, dest))

        bar = _Bar(sum(t[2] for t in todo), f"download s3://{name}/{prefix}", progress)
        tmp_files: list[Path] = []
        lock = threading.Lock()
        try:
            config = _transfer_config(max_concurrency)
            with TransferManager(client, config) as tm, ThreadPoolExecutor(max_workers=2) as hasher:
                futures = {}
                for rel, key, size, sha, etag, dest in todo:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(f".{dest.name}.detox-sft-part")
                    tmp_files.append(tmp)
                    futures[tm.download(name, key, str(tmp), subscribers=[_subscriber(bar)])] = (
                        rel,
                        key,
                        size,
                        sha,
                        etag,
                        dest,
                        tmp,
                    )

                def finish(item) -> None:
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
                    cache.record(dest, rel, digest)
                    with lock:
                        report.verified += sha is not None
                        if sha is None:
                            report.unverified.append(rel)
                        report.downloaded.append(rel)
                        report.bytes_downloaded += size

                checks = []
                for future, item in futures.items():
                    future.result()
                    checks.append(hasher.submit(finish, item))
                for check in checks:
                    check.result()
        finally:
            bar.close()
            cache.save()
            for tmp in tmp_files:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    report.downloaded.sort()
    report.skipped.sort()
    report.seconds = time.perf_counter() - start
    return report


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
    export = recipe.run_path / "export"
    sources = {"caikit": export / "caikit" / recipe.export.model_id, "hf": export / "hf"}
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


# --------------------------------------------------------------------------------------------------------- CLI
def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "connection",
        "default: the data-connection variables AWS_S3_ENDPOINT, AWS_S3_BUCKET, AWS_DEFAULT_REGION; "
        "the keys are read from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY only (never from the command line)",
    )
    group.add_argument("--endpoint", help="S3 endpoint URL (default $AWS_S3_ENDPOINT)")
    group.add_argument("--bucket", help="bucket (default $AWS_S3_BUCKET)")
    group.add_argument("--region", help="region (default $AWS_DEFAULT_REGION or us-east-1)")
    group.add_argument("--ca-bundle", help="CA bundle to verify the endpoint's TLS certificate")
    parser.add_argument("--recipe", help="recipe name or path: default prefix and concurrency (storage section)")
    parser.add_argument("--max-concurrency", type=int, help="parallel requests (default: recipe, else 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cli_settings(args: argparse.Namespace) -> S3Settings:
    return S3Settings.from_env(
        endpoint=args.endpoint,
        bucket=args.bucket,
        region=args.region,
        **({"verify_tls": args.ca_bundle} if args.ca_bundle else {}),
    )


def _cli_recipe(args: argparse.Namespace):
    if not args.recipe:
        return None
    from detox_sft.config import load_recipe

    return load_recipe(args.recipe)


def add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `detox-sft upload`."""
    parser.add_argument("dir", nargs="?", help="directory to upload; omitted: the recipe's export (caikit and hf)")
    parser.add_argument(
        "--prefix", help="key prefix (default: <recipe prefix>/caikit for a Caikit dir, /hf for a Hugging Face dir)"
    )
    parser.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    parser.add_argument("--delete-extra", action="store_true", help="delete objects under the prefix not in DIR")
    parser.add_argument(
        "--no-server-checksum",
        action="store_true",
        help="check size and SHA-256 metadata only, not the server's CRC32/MD5",
    )
    _add_connection_arguments(parser)


def _default_upload_prefix(local: Path, base: str) -> str:
    prefixes = model_prefixes(base)
    if (local / "config.yml").is_file():  # caikit-nlp's saved module
        return prefixes["caikit"]
    if (local / "config.json").is_file():  # a Hugging Face model directory
        return prefixes["hf"]
    return _norm_prefix(base)


def upload_main(args: argparse.Namespace) -> int:
    """Run `detox-sft upload`."""
    try:
        recipe = _cli_recipe(args)
        settings = _cli_settings(args)
        if args.dir is None:
            if recipe is None:
                print("detox-sft upload: give a DIR, or --recipe to upload that run's export.", file=sys.stderr)
                return 2
            for report in upload_export(
                recipe, settings=settings, create_bucket=args.create_bucket, progress=not args.no_progress
            ).values():
                print(report)
            return 0
        base = recipe.storage.prefix if recipe else DEFAULT_PREFIX
        prefix = args.prefix if args.prefix is not None else _default_upload_prefix(Path(args.dir), base)
        report = upload_dir(
            args.dir,
            prefix,
            settings=settings,
            recipe=recipe,
            max_concurrency=args.max_concurrency,
            create_bucket=args.create_bucket,
            progress=not args.no_progress,
            verify_server_checksum=not args.no_server_checksum,
            delete_extra=args.delete_extra,
        )
        print(report)
        if report.extra_keys and not args.delete_extra:
            print(
                f"note: {len(report.extra_keys)} objects under the prefix are not in {args.dir} "
                "(--delete-extra removes them).",
                file=sys.stderr,
            )
        return 0
    except (StorageError, FileNotFoundError) as exc:
        print(f"detox-sft upload: {exc}", file=sys.stderr)
        return 1


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `detox-sft download`."""
    parser.add_argument("prefix", help="key prefix, e.g. models/opt-350m-detox/caikit")
    parser.add_argument("dir", help="destination directory")
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="download even without a completion marker (objects uploaded by another tool)",
    )
    _add_connection_arguments(parser)


def download_main(args: argparse.Namespace) -> int:
    """Run `detox-sft download`."""
    try:
        recipe = _cli_recipe(args)
        concurrency = args.max_concurrency or (recipe.storage.max_concurrency if recipe else 8)
        report = download_prefix(
            args.prefix,
            args.dir,
            settings=_cli_settings(args),
            max_concurrency=concurrency,
            require_complete=not args.allow_incomplete,
            progress=not args.no_progress,
        )
        print(report)
        return 0
    except StorageError as exc:
        print(f"detox-sft download: {exc}", file=sys.stderr)
        return 1
