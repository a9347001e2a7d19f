"""S3 storage: settings, checksums, upload/download against a real SeaweedFS server, and the failure cases."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import zlib
from pathlib import Path

import pytest

from detox_sft import storage
from detox_sft.storage import (
    MARKER_NAME,
    BucketNotFoundError,
    ChecksumMismatchError,
    IncompleteUploadError,
    S3AuthError,
    S3Settings,
    S3UnavailableError,
    StorageError,
)
from detox_sft_dev.s3 import LocalS3, free_port

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


def _crc(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


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
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY"):
        S3Settings(access_key="AKIA", secret_key=None)
    with pytest.raises(StorageError, match="AWS_S3_ENDPOINT"):
        S3Settings(endpoint="minio:9000")
    with pytest.raises(StorageError, match="AWS_S3_BUCKET"):
        S3Settings(bucket=None).require_bucket()


def test_local_checksums_are_the_full_object_crc32_s3_reports_and_the_md5_etag(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(8 * 2**20 * 2 + 1000)
    path.write_bytes(data)
    assert storage._checksums(path) == (_crc(data), None)  # the MD5 only when asked
    assert storage._checksums(path, md5=True)[1] == hashlib.md5(data).hexdigest()


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
    with pytest.raises(S3UnavailableError, match="check AWS_S3_ENDPOINT"):
        storage.download_prefix("p", tmp_path / "d", settings=settings, progress=False)


def test_upload_cli_without_dir_or_recipe_says_what_to_give(capsys, monkeypatch):
    from detox_sft import cli

    monkeypatch.setenv("AWS_S3_BUCKET", "b")
    assert cli.main(["upload"]) == 2
    assert "give a DIR" in capsys.readouterr().err


def test_upload_of_a_missing_directory_points_to_the_export_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="detox-sft export"):
        storage.upload_dir(tmp_path / "nope", settings=S3Settings(bucket="b"))


# ----------------------------------------------------------------------------------------- real S3 server
@pytest.mark.service
def test_upload_is_checked_by_the_server_the_marker_comes_last_and_a_rerun_transfers_nothing(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "hf")
    settings, client = s3_server.settings(), s3_server.client()
    writes = []  # the order the objects were written in (boto3's own event hooks)
    client.meta.events.register(
        "before-parameter-build.s3.*", lambda model, params, **_: writes.append((model.name, params.get("Key")))
    )
    from unittest import mock

    with mock.patch.object(S3Settings, "client", lambda self, **_: client):
        first = storage.upload_dir(src, "t-roundtrip/hf", settings=settings, progress=False)
    expected = local_files(src)
    assert sorted(first.uploaded) == sorted(f"t-roundtrip/hf/{rel}" for rel in expected) and not first.skipped
    assert first.bytes_uploaded == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    marker = f"t-roundtrip/hf/{MARKER_NAME}"
    puts = [key for op, key in writes if op in ("PutObject", "CompleteMultipartUpload", "DeleteObject")]
    assert puts[0] == marker and puts[-1] == marker and puts.count(marker) == 2  # deleted first, written last
    assert not [op for op, _ in writes if op == "AbortMultipartUpload"]

    head = client.head_object(Bucket="detox-sft", Key="t-roundtrip/hf/model.safetensors", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-2")  # it did go multipart
    # the server validated and kept the whole file's CRC32 (it refuses the upload otherwise), not a CRC of CRCs
    assert head["ChecksumType"] == "FULL_OBJECT"
    assert head["ChecksumCRC32"] == _crc((src / "model.safetensors").read_bytes())
    manifest = json.loads(client.get_object(Bucket="detox-sft", Key=marker)["Body"].read())
    assert {f["path"]: f["crc32"] for f in manifest["files"]} == {
        rel: _crc((src / rel).read_bytes()) for rel in expected
    }

    again = storage.upload_dir(src, "t-roundtrip/hf", settings=settings, progress=False)
    assert again.uploaded == [] and again.bytes_uploaded == 0 and len(again.skipped) == len(expected)
    assert "0 uploaded" in str(again)

    dst = tmp_path / "downloaded"
    down = storage.download_prefix("t-roundtrip/hf", dst, settings=settings, progress=False)
    assert down.complete and down.verified == len(expected) and not down.unverified
    assert local_files(dst) == expected
    assert not list(dst.rglob("*.detox-sft-part*"))
    assert storage.download_prefix("t-roundtrip/hf", dst, settings=settings, progress=False).downloaded == []

    keys = [o.key for o in storage.list_prefix("t-roundtrip", settings=settings)]
    assert marker in keys and "t-roundtrip/hf/artifacts/tokenizer.json" in keys


@pytest.mark.service
def test_an_upload_never_aborts_a_multipart_upload_it_did_not_start(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "hf", big_mb=0)
    client = s3_server.client()
    key = "t-other/hf/model.safetensors"  # another writer's upload in progress, under this very prefix
    up = client.create_multipart_upload(Bucket="detox-sft", Key=key)
    client.upload_part(Bucket="detox-sft", Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 2**20)
    storage.upload_dir(src, "t-other/hf", settings=s3_server.settings(), progress=False)
    still_open = client.list_multipart_uploads(Bucket="detox-sft", Prefix="t-other/hf/").get("Uploads", [])
    assert [u["UploadId"] for u in still_open] == [up["UploadId"]]


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
    # same size, other bytes: the CRC32 S3 reports tells them apart
    (src / "file3.json").write_bytes(bytes((src / "file3.json").stat().st_size))
    report = storage.upload_dir(src, "t-change", settings=settings, progress=False, delete_extra=True)
    assert report.uploaded == ["t-change/file3.json"] and report.extra_keys == ["t-change/file2.json"]
    assert "t-change/file2.json" not in [o.key for o in storage.list_prefix("t-change", settings=settings)]


@pytest.mark.service
def test_an_object_another_tool_uploaded_is_skipped_by_its_md5_etag(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "m", big_mb=0, small=2)
    client = s3_server.client()
    client.put_object(Bucket="detox-sft", Key="t-foreign-up/file0.json", Body=(src / "file0.json").read_bytes())
    report = storage.upload_dir(src, "t-foreign-up", settings=s3_server.settings(), progress=False)
    assert report.skipped == ["t-foreign-up/file0.json"] and "t-foreign-up/file0.json" not in report.uploaded


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
    assert len(report.uploaded) == report.files == len(local_files(src))
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
    assert (tmp_path / "x" / "a.txt").read_bytes() == b"uploaded by another tool"
    assert report.verified + len(report.unverified) == 1  # botocore sent a CRC32 with the PUT: SeaweedFS keeps it

    src = make_model_dir(tmp_path / "m", big_mb=0)
    storage.upload_dir(src, "t-corrupt", settings=settings, progress=False)
    good = (src / "file3.json").read_bytes()
    marker = f"t-corrupt/{MARKER_NAME}"
    manifest = json.loads(client.get_object(Bucket="detox-sft", Key=marker)["Body"].read())
    # same size, other bytes, and the manifest edited to vouch for the new ETag: only the CRC32 check can notice
    etag = client.put_object(Bucket="detox-sft", Key="t-corrupt/file3.json", Body=bytes(len(good)))["ETag"]
    for entry in manifest["files"]:
        entry["etag"] = etag.strip('"') if entry["path"] == "file3.json" else entry["etag"]
    client.put_object(Bucket="detox-sft", Key=marker, Body=json.dumps(manifest).encode())
    dst = tmp_path / "y"
    with pytest.raises(ChecksumMismatchError, match="CRC32"):
        storage.download_prefix("t-corrupt", dst, settings=settings, progress=False)
    assert not (dst / "file3.json").exists()
    assert not list(dst.rglob("*.detox-sft-part*"))


@pytest.mark.service
def test_allow_incomplete_fetches_a_prefix_that_changed_after_its_upload(s3_server, tmp_path):
    """Issue 25: with a marker present, a prefix written to since (Ray's output beside an upload) failed with
    "prefix changed" even with --allow-incomplete. Without the flag it is refused; with it, fetched as it is."""
    settings, client = s3_server.settings(), s3_server.client()
    src = make_model_dir(tmp_path / "m", big_mb=0, small=2)
    storage.upload_dir(src, "t-changed-later", settings=settings, progress=False)
    client.put_object(Bucket="detox-sft", Key="t-changed-later/file0.json", Body=b"rewritten by a later job")
    client.put_object(Bucket="detox-sft", Key="t-changed-later/new.jsonl", Body=b"{}\n")
    with pytest.raises(IncompleteUploadError, match="changed or went missing.*--allow-incomplete"):
        storage.download_prefix("t-changed-later", tmp_path / "x", settings=settings, progress=False)
    report = storage.download_prefix(
        "t-changed-later", tmp_path / "y", settings=settings, progress=False, require_complete=False
    )
    assert (tmp_path / "y" / "file0.json").read_bytes() == b"rewritten by a later job"
    assert (tmp_path / "y" / "new.jsonl").read_bytes() == b"{}\n"
    assert not (tmp_path / "y" / MARKER_NAME).exists() and report.files == len(local_files(src)) + 1


@pytest.mark.service
def test_cli_upload_and_download_through_the_data_connection_variables(s3_server, tmp_path, monkeypatch, capsys):
    from detox_sft import cli

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
    assert cli.main(["download", "models/opt-350m-detox/hf", str(tmp_path / "b2"), "--allow-incomplete"]) == 0


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
        server.stop(keep_data=True)
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert "report" not in outcome, "the upload claimed success although the server went away"
        assert isinstance(outcome["error"], S3UnavailableError), outcome["error"]
        assert "AWS_S3_ENDPOINT" in str(outcome["error"]) and "rerun the same command" in str(outcome["error"])

        server.start()  # same data, ports and credentials
        keys = {o.key for o in storage.list_prefix(prefix, settings=settings)}
        assert marker not in keys  # nothing was reported done early
        assert 0 < len(keys) < len(expected)
        with pytest.raises(IncompleteUploadError):
            storage.download_prefix(prefix, tmp_path / "too-early", settings=settings, progress=False)

        report = storage.upload_dir(src, prefix, settings=server.settings(), progress=False)
        assert report.skipped, "the rerun should resume, not start over"
        assert sorted(report.uploaded + report.skipped) == sorted(f"{prefix}/{rel}" for rel in expected)
        down = storage.download_prefix(prefix, tmp_path / "back", settings=server.settings(), progress=False)
        assert down.verified == len(expected) and local_files(tmp_path / "back") == expected
    finally:
        server.stop()


@pytest.mark.service
def test_a_file_changed_during_its_upload_is_refused_by_the_server(s3_server, tmp_path, monkeypatch):
    src = make_model_dir(tmp_path / "m")
    checksums = storage._checksums

    def checksum_then_rewrite(path, md5=False):
        result = checksums(path, md5)  # the CRC32 the upload sends
        if path.name == "model.safetensors":
            path.write_bytes(bytes(path.stat().st_size))  # same size, other bytes, before the transfer
        return result

    monkeypatch.setattr(storage, "_checksums", checksum_then_rewrite)
    with pytest.raises(ChecksumMismatchError, match="changed during the upload"):
        storage.upload_dir(src, "t-changed", settings=s3_server.settings(), progress=False)
    keys = [o.key for o in storage.list_prefix("t-changed", settings=s3_server.settings())]
    assert "t-changed/model.safetensors" not in keys and f"t-changed/{MARKER_NAME}" not in keys


@pytest.mark.service
def test_a_damaged_marker_is_not_trusted_and_the_rerun_rewrites_it(s3_server, tmp_path):
    src = make_model_dir(tmp_path / "m", big_mb=0)
    settings, client = s3_server.settings(), s3_server.client()
    storage.upload_dir(src, "t-damaged", settings=settings, progress=False)
    marker = f"t-damaged/{MARKER_NAME}"
    good = client.get_object(Bucket="detox-sft", Key=marker)["Body"].read()
    client.put_object(Bucket="detox-sft", Key=marker, Body=good[: len(good) // 2])  # a truncated marker
    with pytest.raises(IncompleteUploadError, match="damaged.*rerun `detox-sft upload`"):
        storage.download_prefix("t-damaged", tmp_path / "x", settings=settings, progress=False)
    again = storage.upload_dir(src, "t-damaged", settings=settings, progress=False)
    assert again.uploaded == [] and len(again.skipped) == again.files
    down = storage.download_prefix("t-damaged", tmp_path / "y", settings=settings, progress=False)
    assert down.complete and local_files(tmp_path / "y") == local_files(src)


@pytest.mark.service
def test_a_killed_download_leaves_no_partial_file_and_the_rerun_fetches_only_the_rest(s3_server, tmp_path):
    """A download SIGKILLed with the big file fetched but not yet renamed: nothing partial under a real name, and the
    rerun clears the ``.NAME.detox-sft-part`` file, keeps the finished files and fetches the rest."""
    import subprocess
    import sys
    import textwrap

    src = make_model_dir(tmp_path / "m", big_mb=9, small=3)
    storage.upload_dir(src, "t-kill", settings=s3_server.settings(), progress=False)
    dst = tmp_path / "dst"
    script = textwrap.dedent(
        """
        import os, signal, sys
        from detox_sft import storage
        replace = os.replace
        def replace_or_die(tmp, dest):
            if str(dest).endswith("model.safetensors"):
                os.kill(os.getpid(), signal.SIGKILL)
            replace(tmp, dest)
        storage.os.replace = replace_or_die
        storage.download_prefix("t-kill", sys.argv[1], progress=False)
        """
    )
    run = subprocess.run([sys.executable, "-c", script, str(dst)], env={**os.environ, **s3_server.env()}, timeout=300)
    assert run.returncode == -9
    expected, present = local_files(src), local_files(dst)
    assert [p.name for p in dst.iterdir() if p.name.startswith(".")] == [".model.safetensors.detox-sft-part"]
    done = {rel for rel in present if not Path(rel).name.startswith(".")}
    assert "model.safetensors" not in done and all(present[rel] == expected[rel] for rel in done)
    report = storage.download_prefix("t-kill", dst, settings=s3_server.settings(), progress=False)
    assert set(report.skipped) == done and set(report.downloaded) == set(expected) - done
    assert local_files(dst) == expected  # no temporary file left either
