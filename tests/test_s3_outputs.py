"""s3:// outputs (issue 25): written through the filesystem that reads s3:// inputs, as one whole object, never as a
local file named ``s3:``; an unreachable S3 is refused with the package's message before the work starts."""

from __future__ import annotations

import pytest

from detox_sft.data import DataError, read_records, write_jsonl_atomic
from detox_sft_dev.s3 import free_port


@pytest.fixture
def data_connection(s3_server, monkeypatch, tmp_path):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # a local file named s3: would land here
    return s3_server


def _fake_rephrase(monkeypatch):
    """The rephrase step itself is not under test here: records come back as they went in."""
    from detox_sft import cli
    from detox_sft.rephrase import RephraseResult, RephraseSummary

    monkeypatch.setattr(cli, "rephrase_dataset", lambda records, cfg, **_: RephraseResult(records, RephraseSummary()))
    return cli


@pytest.mark.service
def test_write_jsonl_to_s3_puts_one_whole_object_that_read_records_reads_back(data_connection, tmp_path):
    records = [{"id": i, "text": "é" * (i % 7) + "x" * 4000} for i in range(3000)]  # ~12 MiB: multipart in pyarrow
    assert write_jsonl_atomic(records, "s3://detox-sft/t-out/big.jsonl") == "s3://detox-sft/t-out/big.jsonl"
    assert read_records("s3://detox-sft/t-out/big.jsonl") == records
    client = data_connection.client()
    assert not client.list_multipart_uploads(Bucket="detox-sft", Prefix="t-out/").get("Uploads")
    assert not (tmp_path / "s3:").exists()


@pytest.mark.service
def test_rephrase_cli_writes_an_s3_output_and_no_local_s3_path(data_connection, tmp_path, monkeypatch, capsys):
    cli = _fake_rephrase(monkeypatch)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hi"}\n{"text": "there"}\n')
    argv = ["rephrase", "--input", str(src), "--output", "s3://detox-sft/t-out/runs/out.jsonl"]
    assert cli.main([*argv, "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    body = data_connection.client().get_object(Bucket="detox-sft", Key="t-out/runs/out.jsonl")["Body"].read()
    assert body == b'{"text": "hi"}\n{"text": "there"}\n'
    assert "-> s3://detox-sft/t-out/runs/out.jsonl" in capsys.readouterr().out
    assert not (tmp_path / "s3:").exists()


def test_rephrase_cli_with_s3_gone_exits_nonzero_with_the_fix_and_no_traceback(tmp_path, monkeypatch, capsys):
    cli = _fake_rephrase(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-that-must-not-show")
    (tmp_path / "in.jsonl").write_text('{"text": "hi"}\n')
    argv = ["rephrase", "--input", "in.jsonl", "--output", "s3://detox-models/runs/out.jsonl", "--run-dir", "run"]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert (
        err.startswith("detox-sft rephrase: Cannot write s3://detox-models/runs/out.jsonl") and "AWS_S3_ENDPOINT" in err
    )
    assert "Traceback" not in err and "s3cr3t" not in err
    assert not (tmp_path / "s3:").exists()
    with pytest.raises(DataError, match="AWS_S3_ENDPOINT"):  # and the write itself, should it be reached
        write_jsonl_atomic([{"a": 1}], "s3://detox-models/runs/out.jsonl")
