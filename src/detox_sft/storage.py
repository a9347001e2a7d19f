"""S3 storage for the exported model: :func:`upload_dir`, :func:`download_prefix`, :func:`list_prefix`.

Settings default to the data-connection variables (``AWS_*``). Uploads send each object's CRC32 and skip unchanged
files; the completion marker is deleted first and written last (one writer per prefix: no lock). Downloads need it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from posixpath import join as _join  # S3 keys: "prefix/rel", or "rel" under the empty prefix
from typing import Any

from detox_sft.config import Recipe, StorageConfig

MARKER_NAME = ".detox-sft-upload.json"
DEFAULT_PREFIX = "models/opt-350m-detox"  # = StorageConfig.prefix; the manifests reference it
_PART_SUFFIX = ".detox-sft-part"  # a download's temporary file: .<name>.detox-sft-part (s3transfer adds its own)
_PART_SIZE = 8 * 2**20
_AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "AccessDenied", "403"}
_SERVER_FIX = "Fix: check AWS_S3_ENDPOINT and that the server is running; rerun the same command to resume."


class StorageError(RuntimeError):
    """An S3 operation failed; the message says what to do."""


class S3AuthError(StorageError):
    """The server refused the credentials, or they lack a permission."""


class S3UnavailableError(StorageError):
    """The S3 endpoint cannot be reached (down, wrong address, network)."""


class BucketNotFoundError(StorageError):
    """The bucket does not exist."""


class IncompleteUploadError(StorageError):
    """The prefix has no completion marker, or its objects no longer match it."""


class ChecksumMismatchError(StorageError):
    """An object's bytes do not match their checksum."""


@dataclass(frozen=True, repr=False)
class S3Settings:
    """Where and how to reach S3 (:meth:`from_env`: a data connection); ``verify_tls`` may be a CA bundle path."""

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
            fix = "set AWS_S3_ENDPOINT to http(s)://host[:port]"
            raise StorageError(f"S3 endpoint {self.endpoint!r} is not a URL. Fix: {fix}.")
        if (self.access_key is None) != (self.secret_key is None):
            missing = "AWS_SECRET_ACCESS_KEY" if self.secret_key is None else "AWS_ACCESS_KEY_ID"
            raise StorageError(f"S3 credentials incomplete: {missing} is not set. Fix: set both keys.")

    def __repr__(self) -> str:
        key = f"{self.access_key[:4]}****" if self.access_key else None
        return (
            f"S3Settings(endpoint={self.endpoint!r}, bucket={self.bucket!r}, access_key={key}, "
            f"secret_key={'****' if self.secret_key else None}, region={self.region!r})"
        )

    @classmethod
    def from_env(cls, endpoint=None, bucket=None, access_key=None, secret_key=None, region=None, **options):
        """Explicit values first, then the data-connection variables (read now); ``options``: the other fields."""
        env = os.environ.get
        endpoint, bucket = endpoint or env("AWS_S3_ENDPOINT") or None, bucket or env("AWS_S3_BUCKET") or None
        access_key, secret_key = access_key or env("AWS_ACCESS_KEY_ID"), secret_key or env("AWS_SECRET_ACCESS_KEY")
        region = region or env("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(endpoint, bucket, access_key or None, secret_key or None, region, **options)

    def require_bucket(self) -> str:
        """The bucket name, or a :class:`StorageError` that says how to set it."""
        if not self.bucket:
            raise StorageError("No S3 bucket given. Fix: set AWS_S3_BUCKET (the data connection) or pass --bucket.")
        return self.bucket

    def client(self, max_pool_connections: int = 10) -> Any:
        """A boto3 S3 client; path-style addressing with a custom endpoint (MinIO, Ceph, SeaweedFS)."""
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if self.endpoint else "auto"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            max_pool_connections=max_pool_connections,
        )
        keys = {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key}
        return boto3.session.Session().client(  # a session of its own: sessions are not thread-safe
            "s3", endpoint_url=self.endpoint, region_name=self.region, verify=self.verify_tls, config=config, **keys
        )


def _connect(settings: S3Settings | None, bucket: str | None, concurrency: int = 8) -> tuple[S3Settings, Any]:
    settings = settings if settings is not None else S3Settings.from_env()
    settings = dataclasses.replace(settings, bucket=bucket) if bucket else settings
    settings.require_bucket()
    return settings, settings.client(max_pool_connections=2 * concurrency + 2)


def _translate(exc: BaseException, settings: S3Settings, what: str) -> StorageError | None:
    """A botocore error as a StorageError naming the fix (secrets scrubbed); `None` if it is not one."""
    from botocore import exceptions as bexc

    where = f"the S3 endpoint {settings.endpoint or 'AWS'}"
    if isinstance(exc, bexc.NoCredentialsError):
        return S3AuthError(f"{what}: no S3 credentials. Fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
    if isinstance(exc, bexc.SSLError):
        return S3UnavailableError(f"{what}: TLS verification failed for {where}. Fix: pass its CA (--ca-bundle).")
    if isinstance(exc, bexc.ConnectionError | bexc.HTTPClientError | ConnectionError):
        return S3UnavailableError(f"{what}: cannot reach {where} ({type(exc).__name__}). {_SERVER_FIX}")
    if not isinstance(exc, bexc.ClientError):  # s3transfer wraps some failures: look at the cause
        cause = getattr(exc, "last_exception", None) or exc.__cause__
        return _translate(cause, settings, what) if isinstance(cause, Exception) else None
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    for secret in filter(None, (settings.secret_key, settings.access_key)):
        message = message.replace(secret, "****")
    detail = f"{code}{': ' + message if message else ''}"
    if code == "BadDigest":
        return ChecksumMismatchError(f"{what}: server refused the CRC32 ({detail}): a file changed during the upload?")
    if code in _AUTH_CODES:
        fix = "Fix: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and this user's rights on the bucket)."
        return S3AuthError(f"{what}: {where} refused the credentials ({detail}). {fix}")
    if code in ("NoSuchBucket", "404", "NotFound"):
        fix = "Fix: check AWS_S3_BUCKET, or create it (--create-bucket)."
        return BucketNotFoundError(f"{what}: bucket {settings.bucket!r} does not exist at {where}. {fix}")
    if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
        # a server going away mid-upload answers 5xx as often as it drops the connection: the same fix
        return S3UnavailableError(f"{what}: {where} failed ({detail}). {_SERVER_FIX}")
    return StorageError(f"{what}: S3 error {detail}.")


@contextlib.contextmanager
def _s3_errors(settings: S3Settings, what: str):
    try:
        yield
    except Exception as exc:
        if isinstance(exc, StorageError) or (mapped := _translate(exc, settings, what)) is None:
            raise
        raise mapped from None  # botocore's chain can carry request details; the message is enough


def _norm_prefix(prefix: str | None) -> str:
    return (prefix or "").strip().strip("/")


def model_prefixes(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """Where the two exports go: ``{"caikit": "<prefix>/caikit", "hf": "<prefix>/hf"}``."""
    return {kind: _join(_norm_prefix(prefix), kind) for kind in ("caikit", "hf")}


def _checksums(path: Path, md5: bool = False) -> tuple[str, str | None]:
    """The file's full-object CRC32 (base64, as S3 reports it) and, if asked, its MD5 (a single-part ETag)."""
    crc, digest = 0, hashlib.md5(usedforsecurity=False) if md5 else None
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * 2**20):
            crc = zlib.crc32(chunk, crc)
            if digest is not None:
                digest.update(chunk)
    return base64.b64encode(crc.to_bytes(4, "big")).decode(), digest.hexdigest() if digest else None


def _server_crc(client: Any, bucket: str, key: str) -> str | None:
    """The whole object's CRC32 as S3 reports it, or None (none kept, or a multipart "CRC of part CRCs")."""
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    return head.get("ChecksumCRC32") if head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" else None


def _transfers(client: Any, concurrency: int, total: int, desc: str, progress: bool, max_bandwidth: int | None = None):
    """boto3's transfer manager, a tqdm byte bar and the s3transfer subscribers that feed it."""
    from boto3.s3.transfer import ProgressCallbackInvoker, TransferConfig, create_transfer_manager
    from tqdm.auto import tqdm

    config = TransferConfig(
        multipart_threshold=_PART_SIZE,
        multipart_chunksize=_PART_SIZE,
        max_concurrency=concurrency,
        max_bandwidth=max_bandwidth,
        preferred_transfer_client="classic",
    )
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)
    return create_transfer_manager(client, config), bar, [ProgressCallbackInvoker(bar.update)]


@dataclass(frozen=True)
class S3Object:
    """One object under a prefix, as listed."""

    key: str
    size: int
    etag: str


@dataclass
class UploadReport:
    """What :func:`upload_dir` did; ``extra_keys``: objects under the prefix that are not in the directory."""

    bucket: str
    prefix: str
    files: int = 0
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    bytes_skipped: int = 0
    extra_keys: list[str] = field(default_factory=list)
    marker_key: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"s3://{self.bucket}/{self.prefix}: {len(self.uploaded)} uploaded ({self.bytes_uploaded / 2**20:.1f} MiB, "
            f"CRC32 checked by the server), {len(self.skipped)} unchanged ({self.bytes_skipped / 2**20:.1f} MiB), "
            f"{self.seconds:.1f} s"
        )


@dataclass
class DownloadReport:
    """What :func:`download_prefix` did; ``unverified``: files with no CRC32 known (checked by size)."""

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
            f"CRC32 verified, {self.seconds:.1f} s"
        )


def ensure_bucket(create: bool = False, *, settings: S3Settings | None = None, bucket: str | None = None) -> str:
    """Check the bucket and credentials (a LIST: a HEAD's 403 has no body to say why); ``create`` a missing one."""
    from botocore.exceptions import ClientError

    settings, client = _connect(settings, bucket)
    with _s3_errors(settings, "S3 access check"):
        try:
            client.list_objects_v2(Bucket=settings.bucket, MaxKeys=1)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucket" or not create:
                raise
            where = settings.region if not settings.endpoint and settings.region != "us-east-1" else None
            location = {"CreateBucketConfiguration": {"LocationConstraint": where}} if where else {}
            client.create_bucket(Bucket=settings.bucket, **location)
    return settings.bucket


def _list(client: Any, bucket: str, prefix: str) -> dict[str, S3Object]:
    objects, pages = {}, client.get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):  # not "models/x-old/"
        for item in page.get("Contents", []):
            objects[item["Key"]] = S3Object(item["Key"], int(item["Size"]), str(item.get("ETag", "")).strip('"'))
    return objects


def list_prefix(prefix: str = DEFAULT_PREFIX, *, settings: S3Settings | None = None, bucket: str | None = None):
    """The objects under ``prefix/`` (the completion marker included), sorted by key, as :class:`S3Object`."""
    settings, client = _connect(settings, bucket)
    with _s3_errors(settings, f"list s3://{settings.bucket}/{_norm_prefix(prefix)}"):
        return sorted(_list(client, settings.bucket, _norm_prefix(prefix)).values(), key=lambda o: o.key)


def upload_dir(
    local_dir: str | os.PathLike[str],
    prefix: str | None = None,
    *,
    settings: S3Settings | None = None,
    bucket: str | None = None,
    recipe: Recipe | None = None,
    max_concurrency: int | None = None,
    create_bucket: bool = False,
    progress: bool = True,
    delete_extra: bool = False,
    max_bandwidth: int | None = None,
) -> UploadReport:
    """Upload a directory under ``prefix`` (default ``recipe.storage.prefix``): CRC32-checked, unchanged files skipped;
    ``delete_extra`` deletes objects under the prefix that are not in the directory; ``max_bandwidth`` is in bytes/s."""
    start, local = time.perf_counter(), Path(local_dir)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MARKER_NAME) if local.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"Nothing to upload: {local} is not a directory with files. Fix: run `detox-sft export` first "
            "(notebooks/3-save_convert_model.ipynb) or give the right directory."
        )
    storage = recipe.storage if recipe is not None else StorageConfig()
    prefix = _norm_prefix(prefix if prefix is not None else storage.prefix)
    concurrency = max_concurrency or storage.max_concurrency
    settings, client = _connect(settings, bucket, concurrency)
    name, paths = settings.bucket, {_join(prefix, p.relative_to(local).as_posix()): p for p in files}
    report = UploadReport(bucket=name, prefix=prefix, files=len(files), marker_key=_join(prefix, MARKER_NAME))
    total = sum(p.stat().st_size for p in files)
    tm, bar, subscribers = _transfers(
        client, concurrency, total, f"upload s3://{name}/{prefix}", progress, max_bandwidth
    )
    with _s3_errors(settings, f"upload {local} to s3://{name}/{prefix}"), bar:
        ensure_bucket(create_bucket, settings=settings)
        existing = _list(client, name, prefix)
        # the marker goes first: from now until the new one is written, the prefix is "in progress"
        client.delete_object(Bucket=name, Key=report.marker_key)

        def plan(key: str) -> tuple[str, int, str, bool]:
            """(key, size, CRC32, whether S3 holds these bytes: same size and CRC32, else same plain-MD5 ETag)."""
            path, obj = paths[key], existing.get(key)
            size, crc = path.stat().st_size, _checksums(path)[0]
            if obj is None or obj.size != size:
                return key, size, crc, False
            if (server := _server_crc(client, name, key)) is not None:
                return key, size, crc, server == crc
            return key, size, crc, re.fullmatch(r"[0-9a-f]{32}", obj.etag) and _checksums(path, True)[1] == obj.etag

        sizes, crcs, futures = {}, {}, {}
        with ThreadPoolExecutor(min(concurrency, 8)) as pool, tm:
            for key, size, crc, unchanged in pool.map(plan, paths):  # each upload starts once its file is planned
                sizes[key], crcs[key] = size, crc
                if unchanged:
                    bar.update(size)
                else:  # s3transfer sends our CRC32 as the FULL_OBJECT checksum; the server checks it
                    extra = {"ChecksumCRC32": crc}
                    futures[key] = tm.upload(str(paths[key]), name, key, extra_args=extra, subscribers=subscribers)
            for future in futures.values():
                future.result()
        report.uploaded, report.skipped = sorted(futures), sorted(set(paths) - set(futures))
        report.bytes_uploaded = sum(sizes[key] for key in report.uploaded)
        report.bytes_skipped = sum(sizes[key] for key in report.skipped)
        listed = _list(client, name, prefix)  # every object's size and ETag, one request per 1000 keys
        if missing := [key for key in paths if key not in listed or listed[key].size != sizes[key]]:
            raise IncompleteUploadError(f"{missing[0]}: not on the server with its size after the upload. Fix: rerun.")
        report.extra_keys = sorted(set(listed) - set(paths) - {report.marker_key})
        for i in range(0, len(report.extra_keys) if delete_extra else 0, 1000):
            batch = [{"Key": key} for key in report.extra_keys[i : i + 1000]]
            client.delete_objects(Bucket=name, Delete={"Objects": batch, "Quiet": True})
        rel = len(prefix) + 1 if prefix else 0
        files = [{"path": k[rel:], "size": sizes[k], "crc32": crcs[k], "etag": listed[k].etag} for k in sorted(paths)]
        body = {"tool": "detox-sft", "completed_at": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}
        # last, in one PUT: S3 shows an object whole or not at all
        client.put_object(Bucket=name, Key=report.marker_key, Body=json.dumps(body, indent=1).encode())
    report.seconds = time.perf_counter() - start
    return report


def _safe_dest(root: Path, rel: str) -> Path:
    dest = (root / rel).resolve()
    if rel.startswith("/") or ".." in PurePosixPath(rel).parts or not dest.is_relative_to(root.resolve()):
        raise StorageError(f"refusing object {rel!r}: it would be written outside {root}.")
    return dest


def _wanted(client: Any, bucket: str, prefix: str, what: str, require_complete: bool) -> list[tuple]:
    """(key, size, expected CRC32 or None) per object: the marker's manifest, or every object listed now."""
    listing = _list(client, bucket, prefix)
    marker, fix = listing.pop(_join(prefix, MARKER_NAME), None), "Fix: rerun `detox-sft upload` for this prefix"
    if not require_complete:
        if not listing:
            raise IncompleteUploadError(f"{what}: no objects under this prefix. Fix: check the prefix and bucket.")
        with ThreadPoolExecutor(8) as pool:
            crcs = pool.map(lambda key: _server_crc(client, bucket, key), sorted(listing))
            return [(key, listing[key].size, crc) for key, crc in zip(sorted(listing), crcs, strict=True)]
    fix += ", or pass require_complete=False / --allow-incomplete to fetch the objects as they are"
    try:
        files = json.loads(client.get_object(Bucket=bucket, Key=marker.key)["Body"].read())["files"] if marker else None
        wanted = [(_join(prefix, f["path"]), int(f["size"]), str(f["crc32"]), str(f["etag"])) for f in files or []]
    except (ValueError, KeyError, TypeError) as exc:  # truncated, edited, another tool's
        raise IncompleteUploadError(f"{what}: damaged completion marker ({type(exc).__name__}). {fix}.") from None
    if files is None:
        why = "it is empty" if not listing else f"{len(listing)} objects but no {MARKER_NAME}"
        raise IncompleteUploadError(f"{what}: not a finished detox-sft upload ({why}). {fix}.")
    for key, size, _, etag in wanted:
        if key not in listing or (listing[key].size, listing[key].etag) != (size, etag):
            raise IncompleteUploadError(f"{what}: {key} changed or went missing after the upload. {fix}.")
    return [(key, size, crc) for key, size, crc, _ in wanted]


def download_prefix(
    prefix: str,
    local_dir: str | os.PathLike[str],
    *,
    settings: S3Settings | None = None,
    bucket: str | None = None,
    max_concurrency: int = 8,
    require_complete: bool = True,
    progress: bool = True,
) -> DownloadReport:
    """Download the objects under ``prefix/`` into ``local_dir``: CRC32-verified, atomic per file, resumable;
    ``require_complete=False`` takes the objects listed now when the completion marker is missing or stale."""
    start, prefix, root = time.perf_counter(), _norm_prefix(prefix), Path(local_dir)
    settings, client = _connect(settings, bucket, max_concurrency)
    name, what = settings.bucket, f"download s3://{settings.bucket}/{prefix}"
    report = DownloadReport(bucket=name, prefix=prefix, local_dir=str(root), complete=require_complete)
    with _s3_errors(settings, what):
        todo = []
        for key, size, crc in _wanted(client, name, prefix, what, require_complete):
            rel = key[len(prefix) + 1 :] if prefix else key
            dest = _safe_dest(root, rel)
            for stale in dest.parent.glob(f".{dest.name}{_PART_SUFFIX}*"):  # what a killed download left
                stale.unlink()
            if crc and dest.is_file() and dest.stat().st_size == size and _checksums(dest)[0] == crc:
                report.skipped.append(rel)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                todo.append((rel, key, size, crc, dest, dest.with_name(f".{dest.name}{_PART_SUFFIX}")))
        report.files, report.unverified = len(report.skipped) + len(todo), [t[0] for t in todo if t[3] is None]
        report.verified = report.files - len(report.unverified)  # once every download below has passed its check
        tm, bar, subscribers = _transfers(client, max_concurrency, sum(t[2] for t in todo), what, progress)
        try:
            with bar, tm:
                futures = [tm.download(name, t[1], str(t[-1]), subscribers=subscribers) for t in todo]
                for future, (rel, key, size, crc, dest, tmp) in zip(futures, todo, strict=True):
                    future.result()
                    if tmp.stat().st_size != size or (crc is not None and _checksums(tmp)[0] != crc):
                        raise ChecksumMismatchError(
                            f"{key}: the downloaded bytes do not match the object's CRC32 ({crc}): it changed or was "
                            "corrupted. Fix: rerun the download; if it fails again, rerun the upload."
                        )
                    os.replace(tmp, dest)
                    report.downloaded.append(rel)
                    report.bytes_downloaded += size
        finally:
            for *_, tmp in todo:
                tmp.unlink(missing_ok=True)
    report.downloaded, report.skipped = sorted(report.downloaded), sorted(report.skipped)
    report.seconds = time.perf_counter() - start
    return report


def upload_export(
    recipe: Recipe, *, settings: S3Settings | None = None, create_bucket: bool = False, progress: bool = True
) -> dict[str, UploadReport]:
    """Upload the run's Caikit and HF exports to ``<prefix>/caikit`` and ``<prefix>/hf`` (:func:`model_prefixes`)."""
    sources = {"caikit": recipe.paths.caikit_export(recipe.export.model_id), "hf": recipe.paths.hf_export}
    present = {kind: path for kind, path in sources.items() if path.is_dir()}
    if not present:
        fix = "run notebooks/3-save_convert_model.ipynb first (or `detox-sft export`)"
        raise FileNotFoundError(f"No export in {recipe.paths.export} — {fix}.")
    prefixes = model_prefixes(recipe.storage.prefix)
    options = {"settings": settings, "recipe": recipe, "create_bucket": create_bucket, "progress": progress}
    return {kind: upload_dir(path, prefixes[kind], **options) for kind, path in present.items()}


def upload_prefix(local_dir: str | os.PathLike[str], base: str = DEFAULT_PREFIX) -> str:
    """``<base>/caikit`` for a Caikit directory, ``<base>/hf`` for a Hugging Face one, else ``<base>``."""
    local, prefixes = Path(local_dir), model_prefixes(base)
    caikit, hf = (local / "config.yml").is_file(), (local / "config.json").is_file()
    return prefixes["caikit"] if caikit else prefixes["hf"] if hf else _norm_prefix(base)
