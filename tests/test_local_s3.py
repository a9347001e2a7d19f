"""The local services helpers and the real SeaweedFS S3 server (LocalS3)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from detox_sft_dev.s3 import LocalS3, find_weed, free_port, port_in_use, wait_until


def test_free_port_is_bindable_and_port_in_use_sees_a_listener():
    port = free_port()
    assert 1024 <= port <= 65535
    assert not port_in_use("127.0.0.1", port)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert port_in_use("127.0.0.1", port)


def test_wait_until_returns_the_first_truthy_value_and_retries_through_exceptions():
    calls = []

    def condition():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "ready"

    assert wait_until(condition, timeout=5, interval=0.01) == "ready"
    assert len(calls) == 3


def test_wait_until_times_out_with_the_last_error():
    def condition():
        raise ConnectionRefusedError("refused")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"the thing was not ready after .* ConnectionRefusedError: refused"):
        wait_until(condition, timeout=0.3, interval=0.05, what="the thing")
    assert time.monotonic() - started < 2


def test_wait_until_fails_fast_when_the_process_exits(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("line 1\nfatal: port taken\n")
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    process.wait()
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*fatal: port taken"):
        wait_until(lambda: False, timeout=30, process=process, log_path=log, what="server")


def test_find_weed_finds_the_seaweedfs_binary():
    out = subprocess.run([find_weed(), "version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "version" in out.stdout


def test_endpoint_before_start_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"call \.start\(\)"):
        _ = LocalS3().endpoint


@pytest.mark.service
def test_local_s3_serves_objects_with_generated_credentials(s3_server):
    env = s3_server.env()
    assert set(env) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_S3_ENDPOINT",
        "AWS_S3_BUCKET",
        "AWS_DEFAULT_REGION",
    }
    assert env["AWS_S3_ENDPOINT"].startswith("http://127.0.0.1:") and env["AWS_S3_BUCKET"] == "detox-sft"
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 30
    assert port_in_use("127.0.0.1", s3_server.ports["s3"])
    # secrets stay out of what a notebook would display
    assert s3_server.secret_key not in repr(s3_server)
    assert s3_server.secret_key not in repr(s3_server.settings())
    client = s3_server.client()
    client.put_object(Bucket="detox-sft", Key="test-local-s3/hello.txt", Body=b"hello")
    assert client.get_object(Bucket="detox-sft", Key="test-local-s3/hello.txt")["Body"].read() == b"hello"
    assert "detox-sft" in [b["Name"] for b in client.list_buckets()["Buckets"]]


# What detox_sft.storage relies on, measured on the pinned SeaweedFS.
@pytest.mark.service
def test_seaweedfs_validates_and_returns_full_object_crc32_checksums(s3_server, tmp_path):
    import base64
    import os
    import zlib

    from botocore.exceptions import ClientError
    from s3transfer.manager import TransferConfig, TransferManager

    client, bucket = s3_server.client(), "detox-sft"
    data = os.urandom(9 * 2**20)  # two parts of 8 MiB, as detox_sft.storage splits it
    path = tmp_path / "f.bin"
    path.write_bytes(data)

    def crc(blob: bytes) -> str:
        return base64.b64encode(zlib.crc32(blob).to_bytes(4, "big")).decode()

    config = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)
    with TransferManager(client, config) as tm:
        # a given full-object checksum makes s3transfer send ChecksumType FULL_OBJECT; the server checks it
        tm.upload(str(path), bucket, "test-local-s3/full", extra_args={"ChecksumCRC32": crc(data)}).result()
        with pytest.raises(ClientError, match="BadDigest"):
            tm.upload(str(path), bucket, "test-local-s3/wrong", extra_args={"ChecksumCRC32": "AAAAAA=="}).result()
    head = client.head_object(Bucket=bucket, Key="test-local-s3/full", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-2")
    assert head["ChecksumType"] == "FULL_OBJECT" and head["ChecksumCRC32"] == crc(data)
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix="test-local-s3/wrong").get("Uploads")

    client.put_object(Bucket=bucket, Key="test-local-s3/single", Body=data[:1000], ChecksumCRC32=crc(data[:1000]))
    head = client.head_object(Bucket=bucket, Key="test-local-s3/single", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == crc(data[:1000])
    with pytest.raises(ClientError, match="BadDigest"):
        client.put_object(Bucket=bucket, Key="test-local-s3/single-wrong", Body=data[:1000], ChecksumCRC32="AAAAAA==")
