"""S3 storage: settings, checksums, upload/download against a real SeaweedFS server, and the failure cases."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from detox_sft import cli, storage
from detox_sft.dev.s3 import LocalS3, free_port
from detox_sft.storage import (
    MARKER_NAME,
    BucketNotFoundError,
    ChecksumMismatchError,
    IncompleteUploadError,
    S3AuthError,
    S3ConfigError,
    S3Settings,
    S3UnavailableError,
    StorageError,
)

SECRET = "s3cr3t-value-that-must-never-show-0123456789"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_model_dir(root: Path, big_mb: int = 9, small: int = 6, seed: int = 0) -> Path:
    """A small HF-like directory: one multipart-sized weight file, a few small JSON files, one nested file."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(rng.randbytes(big_mb * 2**20 + 12345))
    for i in range(small):
        (root / f"file{i}.json").write_bytes(rng.randbytes(100 + 1000 * i))
    (root / "artifacts").mkdir(exist_ok=True)
    (root / "artifacts" / "tokenizer.json").write_bytes(rng.randbytes(4096))
    (root / "empty.txt").write_bytes(b"")
    return root


def local_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DETOX_SFT_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------ no server
def test_settings_read_the_data_connection_at_call_time_and_explicit_values_win(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_S3_ENDPOINT", "http://minio.example:9000")
    monkeypatch.setenv("AWS_S3_BUCKET", "from-env")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    settings = S3Settings.from_env(bucket="explicit")
    assert settings.endpoint == "http://minio.example:9000"
    assert settings.bucket == "explicit"
    assert settings.access_key == "AKIAEXAMPLEKEY" and settings.secret_key == SECRET
    assert settings.region == "us-east-1"
    monkeypatch.setenv("AWS_S3_BUCKET", "changed")
    assert S3Settings.from_env().bucket == "changed"  # read now, not at import
    shown = repr(settings) + str(settings)
    assert SECRET not in shown and "AKIAEXAMPLEKEY" not in shown and "AKIA****" in shown


def test_settings_errors_name_the_variable_to_set():
    with pytest.raises(S3ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        S3Settings(access_key="AKIA", secret_key=None)
    with pytest.raises(S3ConfigError, match="AWS_S3_ENDPOINT"):
        S3Settings(endpoint="minio:9000")
    with pytest.raises(S3ConfigError, match="AWS_S3_BUCKET"):
        S3Settings(bucket=None).require_bucket()


def test_local_checksums_are_the_full_object_crc32_and_the_multipart_etag(tmp_path):
    import base64
    import zlib

    path = tmp_path / "f.bin"
    data = os.urandom(8 * 2**20 * 2 + 1000)  # three parts of 8 MiB (the last one short), as s3transfer splits it
    path.write_bytes(data)
    digest = storage._hash_file(path, len(data), md5=True)
    part = 8 * 2**20
    chunks = [data[i : i + part] for i in range(0, len(data), part)]
    md5s = b"".join(hashlib.md5(c).digest() for c in chunks)
    assert digest.etag == f"{hashlib.md5(md5s).hexdigest()}-3"
    # the CRC32 sent with the upload is the whole file's (FULL_OBJECT), whatever the part split
    assert digest.crc32 == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert storage._hash_file(path, len(data)).etag is None  # the MD5 only when asked: it is the slow part
    small = tmp_path / "s.bin"
    small.write_bytes(b"abc")
    small_digest = storage._hash_file(small, 3, md5=True)
    assert small_digest.etag == hashlib.md5(b"abc").hexdigest()
    assert small_digest.crc32 == base64.b64encode(zlib.crc32(b"abc").to_bytes(4, "big")).decode()


def test_model_prefixes_follow_the_recipe_prefix():
    assert storage.model_prefixes() == {"caikit": "models/opt-350m-detox/caikit", "hf": "models/opt-350m-detox/hf"}
    assert storage.model_prefixes("/a/b/") == {"caikit": "a/b/caikit", "hf": "a/b/hf"}


def test_download_refuses_keys_that_escape_the_directory(tmp_path):
    with pytest.raises(StorageError, match="outside"):
        storage._safe_dest(tmp_path, "../../etc/passwd")


def test_endpoint_down_is_a_clear_error_without_secrets(tmp_path):
    settings = S3Settings(
        endpoint=f"http://127.0.0.1:{free_port()}",
        bucket="detox-sft",
        access_key="AKIAEXAMPLE",
        secret_key=SECRET,
        max_attempts=1,
        connect_timeout=1,
    )
    with pytest.raises(S3UnavailableError, match="check AWS_S3_ENDPOINT") as info:
        storage.upload_dir(make_model_dir(tmp_path / "m", big_mb=0), "p", settings=settings, progress=False)
    assert SECRET not in str(info.value)


def test_upload_cli_without_dir_or_recipe_says_what_to_give(capsys, monkeypatch):
    monkeypatch.setenv("AWS_S3_BUCKET", "b")
    assert cli.main(["upload"]) == 2
    assert "give a DIR" in capsys.readouterr().err


def test_upload_of_a_missing_directory_points_to_the_export_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="detox-sft export"):
        storage.upload_dir(tmp_path / "nope", settings=S3Settings(bucket="b"))


# ----------------------------------------------------------------------------------------- real S3 server
@pytest.mark.service
def test_upload_verifies_everything_then_a_rerun_transfers_nothing(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "hf")
    settings = s3_server.settings()
    first = storage.upload_dir(src, "t-roundtrip/hf", settings=settings, progress=False)
    expected = local_files(src)
    assert sorted(first.uploaded) == sorted(f"t-roundtrip/hf/{rel}" for rel in expected)
    assert first.bytes_uploaded == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert first.verified == first.files == len(expected) and first.skipped_unchanged == 0
    assert first.server_verified == len(expected)  # SeaweedFS keeps the CRC32s it validated (single and multipart)

    client = s3_server.client()
    head = client.head_object(Bucket="detox-sft", Key="t-roundtrip/hf/model.safetensors", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-2")  # it did go multipart
    assert head["Metadata"]["sha256"] == expected["model.safetensors"]
    # the server holds the whole file's CRC32 (it refuses the upload otherwise), not a CRC of part CRCs
    assert head["ChecksumType"] == "FULL_OBJECT"
    assert head["ChecksumCRC32"] == storage._hash_file(src / "model.safetensors", head["ContentLength"]).crc32
    assert not client.list_objects_v2(Bucket="detox-sft", Prefix=f"t-roundtrip/hf/{storage.LOCK_NAME}").get("Contents")
    manifest = json.loads(client.get_object(Bucket="detox-sft", Key=f"t-roundtrip/hf/{MARKER_NAME}")["Body"].read())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == expected

    again = storage.upload_dir(src, "t-roundtrip/hf", settings=settings, progress=False)
    assert again.uploaded == [] and again.bytes_uploaded == 0
    # the rerun made no HEAD request: it checked nothing on the server, it trusted the listing + the last manifest
    assert len(again.skipped) == again.skipped_unchanged == len(expected)
    assert again.verified == again.server_verified == 0
    assert f"0/{len(expected)} checked on the server" in str(again)

    dst = tmp_path / "downloaded"
    down = storage.download_prefix("t-roundtrip/hf", dst, settings=settings, progress=False)
    assert down.complete and down.verified == len(expected) and not down.unverified
    assert local_files(dst) == expected
    assert not list(dst.rglob("*.detox-sft-part"))
    assert storage.download_prefix("t-roundtrip/hf", dst, settings=settings, progress=False).downloaded == []

    keys = [o.key for o in storage.list_prefix("t-roundtrip", settings=settings)]
    assert f"t-roundtrip/hf/{MARKER_NAME}" in keys and "t-roundtrip/hf/artifacts/tokenizer.json" in keys


@pytest.mark.service
def test_an_upload_aborts_the_unfinished_multipart_uploads_a_dead_run_left_under_its_prefix(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "hf", big_mb=0)
    client = s3_server.client()
    left = {}
    # ours; a neighbour's; one under a sub-prefix whose own upload holds its lock (a live writer, not ours)
    client.put_object(Bucket="detox-sft", Key=f"t-orphan/hf/live/{storage.LOCK_NAME}.000000", Body=b"{}")
    for key in ("t-orphan/hf/model.safetensors", "t-orphan/hf-old/model.safetensors", "t-orphan/hf/live/w.bin"):
        up = client.create_multipart_upload(Bucket="detox-sft", Key=key)
        client.upload_part(Bucket="detox-sft", Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 2**20)
        left[key] = up["UploadId"]

    report = storage.upload_dir(src, "t-orphan/hf", settings=s3_server.settings(), progress=False)
    assert report.aborted_uploads == ["t-orphan/hf/model.safetensors"]
    assert "1 unfinished earlier upload(s) aborted" in str(report)
    still_open = client.list_multipart_uploads(Bucket="detox-sft", Prefix="t-orphan/hf/").get("Uploads", [])
    assert [u["UploadId"] for u in still_open] == [left["t-orphan/hf/live/w.bin"]]
    neighbour = client.list_multipart_uploads(Bucket="detox-sft", Prefix="t-orphan/hf-old/").get("Uploads", [])
    assert [u["UploadId"] for u in neighbour] == [left["t-orphan/hf-old/model.safetensors"]]  # not ours: untouched
    assert storage.upload_dir(src, "t-orphan/hf", settings=s3_server.settings(), progress=False).aborted_uploads == []
    # at the bucket's root an upload must not reach into other prefixes: the neighbour's stays open
    assert storage._abort_unfinished_uploads(client, "detox-sft", "") == []
    assert client.list_multipart_uploads(Bucket="detox-sft", Prefix="t-orphan/hf-old/").get("Uploads")


@pytest.mark.service
def test_a_changed_file_is_the_only_one_uploaded_and_extra_objects_are_reported(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "m", big_mb=0)
    settings = s3_server.settings()
    storage.upload_dir(src, "t-change", settings=settings, progress=False)
    (src / "file1.json").write_bytes(b"changed")
    (src / "file2.json").unlink()
    report = storage.upload_dir(src, "t-change", settings=settings, progress=False)
    assert report.uploaded == ["t-change/file1.json"]
    assert report.extra_keys == ["t-change/file2.json"]
    report = storage.upload_dir(src, "t-change", settings=settings, progress=False, delete_extra=True)
    assert report.uploaded == [] and report.extra_keys == ["t-change/file2.json"]
    assert "t-change/file2.json" not in [o.key for o in storage.list_prefix("t-change", settings=settings)]


@pytest.mark.service
def test_wrong_credentials_are_a_clear_error_that_never_shows_the_secret(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "m", big_mb=0)
    for changes in ({"secret_key": SECRET}, {"access_key": "NOSUCHKEY1234", "secret_key": SECRET}):
        bad = s3_server.settings(**changes)
        with pytest.raises(S3AuthError, match="check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") as info:
            storage.upload_dir(src, "t-creds", settings=bad, progress=False)
        assert SECRET not in str(info.value) and s3_server.secret_key not in str(info.value)
    assert storage.list_prefix("t-creds", settings=s3_server.settings()) == []


@pytest.mark.service
def test_a_missing_bucket_is_an_error_unless_creation_is_asked(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "m", big_mb=0)
    settings = s3_server.settings(bucket="detox-sft-missing")
    with pytest.raises(BucketNotFoundError, match="--create-bucket"):
        storage.upload_dir(src, "p", settings=settings, progress=False)
    with pytest.raises(BucketNotFoundError, match="AWS_S3_BUCKET"):
        storage.list_prefix("p", settings=settings)
    report = storage.upload_dir(src, "p", settings=settings, progress=False, create_bucket=True)
    assert report.verified == report.files == len(local_files(src))
    assert storage.ensure_bucket(settings=settings) == "detox-sft-missing"


@pytest.mark.service
def test_download_refuses_an_unfinished_prefix_and_a_corrupted_object(s3_server, tmp_path):
    settings = s3_server.settings()
    client = s3_server.client()
    client.put_object(Bucket="detox-sft", Key="t-foreign/a.txt", Body=b"uploaded by another tool")
    with pytest.raises(IncompleteUploadError, match="--allow-incomplete"):
        storage.download_prefix("t-foreign", tmp_path / "x", settings=settings, progress=False)
    report = storage.download_prefix(
        "t-foreign", tmp_path / "x", settings=settings, progress=False, require_complete=False
    )
    assert report.unverified == ["a.txt"] and (tmp_path / "x" / "a.txt").read_bytes() == b"uploaded by another tool"

    src = make_model_dir(tmp_path / "m", big_mb=0)
    storage.upload_dir(src, "t-corrupt", settings=settings, progress=False)
    good = (src / "file3.json").read_bytes()
    # same size, same metadata, other bytes: only a content check can notice
    client.put_object(
        Bucket="detox-sft",
        Key="t-corrupt/file3.json",
        Body=bytes(len(good)),
        Metadata={"sha256": hashlib.sha256(good).hexdigest()},
    )
    dst = tmp_path / "y"
    with pytest.raises(ChecksumMismatchError, match="SHA-256"):
        storage.download_prefix("t-corrupt", dst, settings=settings, progress=False)
    assert not (dst / "file3.json").exists()
    assert not list(dst.rglob("*.detox-sft-part"))


@pytest.mark.service
def test_cli_upload_and_download_through_the_data_connection_variables(s3_server, tmp_path, monkeypatch, capsys):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    hf = make_model_dir(tmp_path / "hf", big_mb=0)
    (hf / "config.json").write_text("{}")
    assert cli.main(["upload", str(hf), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "s3://detox-sft/models/opt-350m-detox/hf:" in out.out and s3_server.secret_key not in out.out + out.err
    dst = tmp_path / "back"
    assert cli.main(["download", "models/opt-350m-detox/hf", str(dst), "--no-progress"]) == 0
    assert local_files(dst) == local_files(hf)
    assert cli.main(["download", "models/nothing-here", str(dst), "--no-progress"]) == 1
    assert "not a finished detox-sft upload" in capsys.readouterr().err


@pytest.mark.service
def test_s3_stopped_mid_upload_then_restarted_the_rerun_completes_and_nothing_looked_done_early(tmp_path):
    src = tmp_path / "model"
    make_model_dir(src, big_mb=16, small=0)
    for i in range(24):
        (src / f"shard{i:02d}.bin").write_bytes(os.urandom(2**20))
    expected = local_files(src)
    prefix = "models/opt-350m-detox/hf"
    marker = f"{prefix}/{MARKER_NAME}"
    server = LocalS3(tmp_path / "s3data", bucket="detox-sft").start()
    try:
        # few retries so the failure surfaces in seconds; the bandwidth cap makes the upload last ~10 s
        settings = server.settings(max_attempts=2, connect_timeout=1, read_timeout=5)
        watcher = server.client()
        outcome: dict = {}

        def run_upload():
            try:
                outcome["report"] = storage.upload_dir(
                    src, prefix, settings=settings, progress=False, max_concurrency=4, max_bandwidth=4 * 2**20
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=run_upload)
        thread.start()
        deadline = time.monotonic() + 30
        while len(watcher.list_objects_v2(Bucket="detox-sft", Prefix=prefix).get("Contents", [])) < 4:
            assert time.monotonic() < deadline and thread.is_alive(), outcome
            time.sleep(0.1)
        stopped_at = time.monotonic()
        # the failed run says it could not delete its lock (the server is gone)
        with pytest.warns(UserWarning, match="Could not delete the upload lock"):
            server.stop(keep_data=True)
            thread.join(timeout=60)
        print(f"upload failed {time.monotonic() - stopped_at:.1f} s after the stop began")
        assert not thread.is_alive()
        assert "report" not in outcome, "the upload claimed success although the server went away"
        assert isinstance(outcome["error"], S3UnavailableError), outcome["error"]
        assert "AWS_S3_ENDPOINT" in str(outcome["error"]) and "rerun the same command" in str(outcome["error"])

        restart = time.monotonic()
        server.start()  # same data, ports and credentials
        print(f"restarted in {time.monotonic() - restart:.1f} s")
        keys = {o.key for o in storage.list_prefix(prefix, settings=settings)}
        assert marker not in keys  # nothing was reported done early
        assert 0 < len(keys) < len(expected)
        with pytest.raises(IncompleteUploadError):
            storage.download_prefix(prefix, tmp_path / "too-early", settings=settings, progress=False)

        report = storage.upload_dir(src, prefix, settings=server.settings(), progress=False)
        # the failed run could not delete its lock (no server): this process knows it is over and takes it back
        assert report.lock_taken_over == "left by an earlier upload of this process that could not delete it"
        assert report.skipped, "the rerun should resume, not start over"
        # no marker survived the failed run, so every object was checked on the server again
        assert len(report.uploaded) + len(report.skipped) == len(expected) == report.verified
        assert report.server_verified == len(expected) and report.skipped_unchanged == 0
        down = storage.download_prefix(prefix, tmp_path / "back", settings=server.settings(), progress=False)
        assert down.verified == len(expected) and local_files(tmp_path / "back") == expected
    finally:
        server.stop()


def test_objects_without_a_crc32_are_checked_by_their_md5_etag(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"model bytes")
    digest = storage._hash_file(path, path.stat().st_size)
    head = {
        "ContentLength": digest.size,
        "Metadata": {"sha256": digest.sha256},
        "ETag": f'"{hashlib.md5(b"model bytes").hexdigest()}"',
    }
    assert storage._check_object(head, digest, "k", path, server_check=True) is True
    assert storage._check_object(head, digest, "k", path, server_check=False) is False
    with pytest.raises(ChecksumMismatchError, match="ETag"):
        storage._check_object({**head, "ETag": '"' + "0" * 32 + '"'}, digest, "k", path, server_check=True)
    with pytest.raises(ChecksumMismatchError, match="CRC32"):
        storage._check_object({**head, "ChecksumCRC32": "AAAAAA=="}, digest, "k", path, server_check=True)
    with pytest.raises(ChecksumMismatchError, match="SHA-256"):
        storage._check_object({**head, "Metadata": {}}, digest, "k", path, server_check=True)


# ---------------------------------------------------------------------------------------- one writer per prefix
def _lock_body(**fields) -> bytes:
    return json.dumps({"tool": "detox-sft", "owner": "someone-else", **fields}).encode()


@pytest.mark.service
def test_of_three_concurrent_uploads_to_one_prefix_exactly_one_runs_and_the_others_are_refused(
    s3_server, tmp_path, monkeypatch
):
    src = make_model_dir(tmp_path / "m", big_mb=0)
    settings = s3_server.settings()
    # whoever holds the lock waits at its first step until the others have tried: they overlap for certain
    arrived, gate = [], threading.Event()
    open_prefix = storage._Upload.open_prefix

    def gated_open_prefix(self):
        arrived.append(threading.current_thread().name)
        gate.wait(60)
        return open_prefix(self)

    monkeypatch.setattr(storage._Upload, "open_prefix", gated_open_prefix)
    start, outcome = threading.Barrier(3), {}

    def writer():
        start.wait()
        try:
            outcome[threading.current_thread().name] = storage.upload_dir(
                src, "t-lock", settings=settings, progress=False
            )
        except StorageError as exc:
            outcome[threading.current_thread().name] = exc

    threads = [threading.Thread(target=writer, name=f"writer-{i}") for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(outcome) < 2 and len(arrived) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(60)
    refused = [v for v in outcome.values() if isinstance(v, storage.PrefixLockedError)]
    done = [v for v in outcome.values() if isinstance(v, storage.UploadReport)]
    assert len(arrived) == 1 and len(done) == 1 and len(refused) == 2, outcome
    assert all("being uploaded by another run" in str(e) and "force_lock" in str(e) for e in refused)
    assert done[0].verified == done[0].files
    keys = [o.key for o in storage.list_prefix("t-lock", settings=settings)]
    assert not [k for k in keys if storage.LOCK_NAME in k] and f"t-lock/{MARKER_NAME}" in keys  # released, complete
    down = storage.download_prefix("t-lock", tmp_path / "back", settings=settings, progress=False)
    assert down.verified == len(local_files(src))


@pytest.mark.service
def test_an_upload_whose_lock_was_taken_over_fails_before_writing_its_marker(s3_server, tmp_path, monkeypatch):
    src = make_model_dir(tmp_path / "m", big_mb=0)
    settings = s3_server.settings()
    reached, other_done = threading.Event(), threading.Event()
    verify = storage._Upload.verify_uploaded

    def slow_verify(self):  # the first writer pauses after its transfers, as a stalled pod would
        if threading.current_thread().name == "stalled":
            reached.set()
            other_done.wait(60)
        return verify(self)

    monkeypatch.setattr(storage._Upload, "verify_uploaded", slow_verify)
    outcome = {}

    def stalled():
        try:
            outcome["report"] = storage.upload_dir(src, "t-lost", settings=settings, progress=False)
        except StorageError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=stalled, name="stalled")
    thread.start()
    assert reached.wait(60)
    with pytest.raises(storage.PrefixLockedError, match="being uploaded by another run"):
        storage.upload_dir(src, "t-lost", settings=settings, progress=False)
    forced = storage.upload_dir(src, "t-lost", settings=settings, progress=False, force_lock=True)
    assert "taken over with force_lock" in forced.lock_taken_over
    marker = s3_server.client().head_object(Bucket="detox-sft", Key=f"t-lost/{MARKER_NAME}")
    other_done.set()
    thread.join(60)
    assert isinstance(outcome.get("error"), storage.PrefixLockedError), outcome
    assert "lost the upload lock" in str(outcome["error"]) and "marker was not written" in str(outcome["error"])
    # the marker is the forced run's, untouched by the one that lost the lock
    again = s3_server.client().head_object(Bucket="detox-sft", Key=f"t-lost/{MARKER_NAME}")
    assert again["ETag"] == marker["ETag"] and again["LastModified"] == marker["LastModified"]


@pytest.mark.service
def test_a_lock_left_by_a_dead_run_is_taken_over_after_its_ttl_or_at_once_when_its_process_is_gone(s3_server, tmp_path):
    import subprocess
    import sys

    src = make_model_dir(tmp_path / "m", big_mb=0)
    settings, client = s3_server.settings(), s3_server.client()
    key = f"t-stale/{storage.LOCK_NAME}.000000"

    # a killed pod elsewhere: its lock counts until it has gone lock_ttl seconds without renewal (server clock)
    client.put_object(Bucket="detox-sft", Key=key, Body=_lock_body(host="pod-elsewhere", pid=7, ttl=3600))
    with pytest.raises(storage.PrefixLockedError, match=r"pid 7 on pod-elsewhere.*expires in \d+ s"):
        storage.upload_dir(src, "t-stale", settings=settings, progress=False)
    client.put_object(Bucket="detox-sft", Key=key, Body=_lock_body(host="pod-elsewhere", pid=7, ttl=1))
    time.sleep(2.5)  # LastModified has one-second resolution
    report = storage.upload_dir(src, "t-stale", settings=settings, progress=False)
    assert report.lock_taken_over.startswith("pid 7 on pod-elsewhere, not renewed for")
    assert "lock taken over" in str(report)

    # a process of this machine that has exited: no need to wait
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = storage._process_identity()
    client.put_object(Bucket="detox-sft", Key=key, Body=_lock_body(**{**here, "pid": gone.pid, "ttl": 3600}))
    report = storage.upload_dir(src, "t-stale", settings=settings, progress=False)
    assert report.lock_taken_over == f"pid {gone.pid} on {here['host']}, which has exited"
    assert not [o.key for o in storage.list_prefix("t-stale", settings=settings) if storage.LOCK_NAME in o.key]


# ------------------------------------------------------------------------------ damaged files, changed files, full disk
@pytest.mark.service
def test_a_file_changed_during_its_upload_is_refused_by_the_server(s3_server, tmp_path, monkeypatch):
    src = make_model_dir(tmp_path / "m")
    plan = storage._Upload.plan

    def plan_then_rewrite(self, rel, path):
        planned = plan(self, rel, path)  # hashed: the upload sends this SHA-256 and CRC32
        if rel == "model.safetensors":
            path.write_bytes(bytes(path.stat().st_size))  # same size, other bytes, before the transfer
        return planned

    monkeypatch.setattr(storage._Upload, "plan", plan_then_rewrite)
    with pytest.raises(ChecksumMismatchError, match="changed during the upload"):
        storage.upload_dir(src, "t-changed", settings=s3_server.settings(), progress=False)
    keys = [o.key for o in storage.list_prefix("t-changed", settings=s3_server.settings())]
    assert "t-changed/model.safetensors" not in keys and f"t-changed/{MARKER_NAME}" not in keys


@pytest.mark.service
def test_a_damaged_marker_is_not_trusted_the_rerun_checks_everything_and_rewrites_it(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "m", big_mb=0)
    settings, client = s3_server.settings(), s3_server.client()
    storage.upload_dir(src, "t-damaged", settings=settings, progress=False)
    marker = f"t-damaged/{MARKER_NAME}"
    good = client.get_object(Bucket="detox-sft", Key=marker)["Body"].read()
    client.put_object(Bucket="detox-sft", Key=marker, Body=good[: len(good) // 2])  # a truncated marker

    with pytest.raises(IncompleteUploadError, match="damaged.*rerun `detox-sft upload`"):
        storage.download_prefix("t-damaged", tmp_path / "x", settings=settings, progress=False)
    with pytest.warns(UserWarning, match="damaged.*checked again"):
        again = storage.upload_dir(src, "t-damaged", settings=settings, progress=False)
    assert again.uploaded == [] and again.skipped_unchanged == 0 and again.verified == again.files
    assert json.loads(client.get_object(Bucket="detox-sft", Key=marker)["Body"].read())["files"]
    down = storage.download_prefix("t-damaged", tmp_path / "y", settings=settings, progress=False)
    assert down.complete and local_files(tmp_path / "y") == local_files(src)


def test_a_damaged_checksum_cache_is_ignored_with_a_warning_and_rewritten_whole(tmp_path):
    root = make_model_dir(tmp_path / "m", big_mb=0)
    cache = storage._HashCache(root)
    digest = cache.digest(root / "file1.json", "file1.json")
    cache.save()
    text = cache.path.read_text()
    # truncated, not a mapping: the file is ignored with a warning; a malformed entry: that entry is recomputed
    for damaged, warns in ((text[: len(text) // 2], True), ("[1, 2]", True), ('{"file1.json": 5}', False)):
        cache.path.write_text(damaged)
        if warns:
            with pytest.warns(UserWarning, match="checksum cache .* is damaged"):
                again = storage._HashCache(root)
        else:
            again = storage._HashCache(root)
        assert again.digest(root / "file1.json", "file1.json") == digest
        again.save()
        assert json.loads(cache.path.read_text())["file1.json"][4] == digest.sha256
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]  # no temporary file left


@pytest.mark.service
def test_a_download_that_runs_out_of_room_fails_with_a_typed_error_keeps_nothing_partial_and_a_rerun_completes(
    s3_server, tmp_path
):
    import subprocess
    import sys
    import textwrap

    src = make_model_dir(tmp_path / "m", big_mb=2)  # a 2 MiB weight file; the limit below is 1 MiB
    settings = s3_server.settings()
    storage.upload_dir(src, "t-full", settings=settings, progress=False)
    dst = tmp_path / "dst"
    script = textwrap.dedent(
        """
        import json, resource, signal, sys
        from detox_sft import storage
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as ENOSPC would
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        try:
            storage.download_prefix("t-full", sys.argv[1], progress=False)
        except storage.StorageError as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        else:
            print(json.dumps({"error": None}))
        """
    )
    env = {**os.environ, **s3_server.env(), "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-c", script, str(dst)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["error"] == "DiskFullError", (result, run.stderr[-2000:])
    assert "model.safetensors" in result["message"] and "file-size limit" in result["message"]
    assert "rerun" in result["message"]
    expected, present = local_files(src), local_files(dst)
    assert "model.safetensors" not in present  # nothing partial is left under a real name...
    assert all(expected.get(rel) == sha for rel, sha in present.items())  # ...what is there is complete
    assert not [p.name for p in dst.rglob("*") if p.name.startswith(".")]  # and no temporary file stayed

    report = storage.download_prefix("t-full", dst, settings=settings, progress=False)
    assert "model.safetensors" in report.downloaded and sorted(report.downloaded + report.skipped) == sorted(expected)
    assert local_files(dst) == expected


@pytest.mark.service
def test_a_rerun_removes_the_temporary_files_of_a_killed_download_but_not_a_live_ones(s3_server, tmp_path):
    """A SIGKILLed download cannot delete its ``.NAME.PID-HEX.detox-sft-part`` files (the fault suite found them)."""
    import subprocess
    import sys

    src = make_model_dir(tmp_path / "m", big_mb=0)
    storage.upload_dir(src, "t-parts", settings=s3_server.settings(), progress=False)
    dst = tmp_path / "dst"
    storage.download_prefix("t-parts", dst, settings=s3_server.settings(), progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    rel = sorted(local_files(src))[0]
    left = dst / Path(rel).parent / f".{Path(rel).name}.{dead.stdout.strip()}-0badf00d.detox-sft-part"
    live = dst / Path(rel).parent / f".{Path(rel).name}.{os.getppid()}-0000beef.detox-sft-part"  # pytest's parent
    left_by_s3transfer = left.with_name(left.name + ".EbEB24fa")  # s3transfer's own temporary file of ours
    left.write_bytes(b"half")
    left_by_s3transfer.write_bytes(b"half")
    live.write_bytes(b"in use")
    report = storage.download_prefix("t-parts", dst, settings=s3_server.settings(), progress=False)
    assert report.downloaded == [] and not left.exists() and not left_by_s3transfer.exists() and live.exists()
    live.unlink()
    assert local_files(dst) == local_files(src)
