"""Beyond one process: rephrase and evaluate on a Ray Data actor pool give the single-process results; a rerun of an
interrupted Ray job skips its finished blocks; the RayJob's output reaches the TrainJob through S3 as the manifests
wire it; `detox-sft train` under torchrun (2 CPU processes, gloo) trains like one process with the same global
batch."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from detox_sft import cli
from detox_sft.config import load_recipe
from detox_sft.evaluation import evaluate_models
from detox_sft.rephrase import rephrase_dataset
from detox_sft.scale import BlockStore, content_key

RAY = {"rephrase.executor": "ray", "rephrase.ray_actors": "2", "rephrase.ray_block_size": "4"}
JOBS = Path(__file__).resolve().parents[1] / "manifests" / "distributed"


def _records(zoo, n: int = 12) -> list[dict]:
    """``n`` samples of the zoo's RTP-like corpus, most toxic first (so that some are rephrased), and bad inputs."""
    with open(zoo.rtp, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows.sort(key=lambda r: -((r.get("continuation") or {}).get("toxicity") or 0.0))
    records = [{"id": i, "text": f"{r['prompt']['text']} {r['continuation']['text']}"} for i, r in enumerate(rows[:n])]
    return records + [
        {"id": "empty", "text": ""},
        {"id": "missing"},
        {"id": "number", "text": 5},
        {"id": "null", "text": None},
    ]


def _rephrase_cli(src, out, cache, overrides=()) -> int:
    flags = [f"--{name}={value}" for name, value in dict(overrides).items()]
    argv = ["rephrase", "--recipe", "offline", "--input", str(src), "--output", str(out), "--cache-dir", str(cache)]
    return cli.main([*argv, "--no-progress", *flags])


def test_block_store_keeps_complete_blocks_only(tmp_path):
    store = BlockStore(tmp_path, content_key([{"a": 1}], "text"), num_blocks=3)
    store.put(2, b'{"x": 2}')
    (store.dir / ".000001.json.tmp").write_bytes(b'{"x": ')  # what a crash mid-write leaves
    assert store.done() == {2} and store.get(2) == {"x": 2}
    assert content_key([{"a": 1}], "text") != content_key([{"a": 2}], "text")  # another input, another work dir


def test_read_records_takes_parquet_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from detox_sft.data import read_records

    records = [{"id": 1, "text": "hello"}, {"id": 2, "text": None}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_records(tmp_path / "in.parquet") == read_records(tmp_path / "in.jsonl") == records


@pytest.mark.service
def test_read_records_from_s3_jsonl_and_parquet(s3_server, monkeypatch):
    """``s3://bucket/key`` inputs (what a RayJob reads) through pyarrow's S3 filesystem and the data connection."""
    import io

    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    from detox_sft.data import read_records

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    records = [{"id": 1, "text": "hello"}, {"id": 2, "text": None}]
    parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), parquet)
    client.put_object(Bucket=s3_server.bucket, Key="scale/in.parquet", Body=parquet.getvalue())
    client.put_object(
        Bucket=s3_server.bucket, Key="scale/in.jsonl", Body="".join(json.dumps(r) + "\n" for r in records)
    )
    assert read_records(f"s3://{s3_server.bucket}/scale/in.jsonl") == records
    assert read_records(f"s3://{s3_server.bucket}/scale/in.parquet") == records


def test_rephrase_on_ray_writes_the_bytes_of_one_process_and_resumes_by_block(zoo, ray_cluster, tmp_path):
    """2 actors, blocks of 4 records: the output file is byte-identical to the single-process command's on the same
    input, bad inputs included; a rerun after losing a block (as an interrupted job would) runs only that block."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(zoo)), encoding="utf-8")
    assert _rephrase_cli(src, tmp_path / "local.jsonl", tmp_path / "local-cache") == 0
    assert _rephrase_cli(src, tmp_path / "ray.jsonl", tmp_path / "ray-cache", RAY) == 0
    local = (tmp_path / "local.jsonl").read_bytes()
    assert (tmp_path / "ray.jsonl").read_bytes() == local
    rows = [json.loads(line) for line in local.splitlines()]
    assert sum(r["rephrased"] for r in rows) >= 4  # the blocks really rephrase
    assert [r["rephrase_status"] for r in rows[-4:]] == ["empty", "missing", "below_gate", "missing"]

    (work,) = (tmp_path / "ray-cache" / "ray-blocks").iterdir()
    blocks = sorted(work.glob("0*.json"))
    assert len(blocks) == 4
    kept = {p.name: p.stat().st_mtime_ns for p in blocks if p.name != "000002.json"}
    (work / "000002.json").unlink()
    recipe = load_recipe("offline", dotted=RAY)
    result = rephrase_dataset(str(src), recipe.rephrase, cache_dir=tmp_path / "ray-cache", progress=False)
    assert result.extra["ray"] == {"blocks": 4, "reused_blocks": 3, "actors": 2}
    assert {p.name: p.stat().st_mtime_ns for p in sorted(work.glob("0*.json")) if p.name in kept} == kept
    assert "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records).encode() == local
    assert result.summary.computed <= 4 and result.summary.total == len(rows)


def _secret_env(container: dict, connection: dict[str, str]) -> dict[str, str]:
    """What a pod's container reads from the data connection: envFrom the whole Secret, env by secretKeyRef."""
    env = dict(connection) if container.get("envFrom") else {}
    for e in container.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            env[e["name"]] = connection[ref["key"]]
    return env


@pytest.mark.service
def test_rayjob_output_reaches_the_trainjob_through_s3(zoo, ray_cluster, s3_server, tmp_path, monkeypatch):
    """The cluster hand-off on this machine, commands taken from the manifests: the workbench uploads the raw set
    and its own rewrite to runs/tutorial/data; the RayJob's entrypoint (recipe offline instead of tutorial) rephrases
    on Ray into the local S3; the TrainJob's download commands, run by sh as node 0 runs them, fetch the training
    sets. The detoxified set is the single-process run's, byte for byte, not the workbench's rewrite; no local file
    is written for the s3:// output."""
    from detox_sft.storage import ensure_bucket, upload_dir

    monkeypatch.chdir(tmp_path)  # a path-based writer would leave ./s3:/... here
    rayjob = yaml.safe_load((JOBS / "ray-detoxify" / "rayjob.yaml").read_text())
    trainer = yaml.safe_load((JOBS / "trainjob" / "trainjob.yaml").read_text())["spec"]["trainer"]
    entrypoint = shlex.split(rayjob["spec"]["entrypoint"])
    output = entrypoint[entrypoint.index("--output") + 1]
    bucket = output.removeprefix("s3://").partition("/")[0]  # the manifests' bucket, detox-models
    connection = {**s3_server.env(), "AWS_S3_BUCKET": bucket}
    ensure_bucket(create=True, settings=s3_server.settings(bucket=bucket))

    workbench = tmp_path / "workbench"
    workbench.mkdir()
    (workbench / "train_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(zoo)))
    (workbench / "train_detox.jsonl").write_text(json.dumps({"id": 0, "text": "the workbench's rewrite"}) + "\n")
    upload_dir(workbench, "runs/tutorial/data", settings=s3_server.settings(bucket=bucket), progress=False)
    assert _rephrase_cli(workbench / "train_raw.jsonl", tmp_path / "local.jsonl", tmp_path / "local-cache") == 0

    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for name, value in _secret_env(head, connection).items():
        monkeypatch.setenv(name, value)
    assert entrypoint[:2] == ["detox-sft", "rephrase"] and "--ray" in entrypoint
    argv = entrypoint[1:]
    argv[argv.index("--recipe") + 1] = "offline"
    flags = [f"--{k}={v}" for k, v in RAY.items()]
    assert cli.main([*argv, "--cache-dir", str(tmp_path / "ray-cache"), "--no-progress", *flags]) == 0
    assert not (tmp_path / "s3:").exists()

    script = trainer["args"][0]
    assert re.search(r"^\s*DATA=/mnt/runs/tutorial/data$", script, re.M)  # = --run-dir /mnt/runs/tutorial + /data
    downloads = [line.strip() for line in script.splitlines() if line.strip().startswith("detox-sft download ")]
    assert len(downloads) == 2
    node0 = tmp_path / "node0" / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        **_secret_env(trainer, connection),
        "DATA": str(node0),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the venv's detox-sft
    }
    for line in downloads:
        proc = subprocess.run(["sh", "-c", line], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
    assert (node0 / "train_detox.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    assert (node0 / "train_raw.jsonl").read_bytes() == (workbench / "train_raw.jsonl").read_bytes()
    rows = [json.loads(line) for line in (node0 / "train_detox.jsonl").read_text().splitlines()]
    assert sum(r["rephrased"] for r in rows) >= 4


def test_evaluate_on_ray_gives_the_results_of_one_process(zoo, ray_cluster, tmp_path, make_adapter):
    """Generation, scoring and perplexity on 2 actors, batch by batch as in one process: equal numbers throughout."""
    prompts = ["you are a stupid", "the weather today is", "I hate this damn thing because it", "what a lovely"]
    settings = {"evaluation.num_samples": "2", "evaluation.max_new_tokens": "6", "evaluation.batch_size": "2"}
    local = load_recipe("offline", run_dir=str(tmp_path / "local"), dotted=settings)
    make_adapter(local, zoo.opt, "detox", seed=1)
    shutil.copytree(tmp_path / "local" / "adapters", tmp_path / "ray" / "adapters")
    on_ray = load_recipe(
        "offline",
        run_dir=str(tmp_path / "ray"),
        dotted={**settings, "evaluation.executor": "ray", "evaluation.ray_actors": "2"},
    )
    # one arm (its adapter loads in the actors; the base model loads in the perplexity pool): a pool per model costs
    # seconds, and every model takes the same path
    a = evaluate_models(local, models=["detox"], prompts=prompts, progress=False)
    b = evaluate_models(on_ray, models=["detox"], prompts=prompts, progress=False)
    assert b.generations == a.generations
    for m in a.models:
        np.testing.assert_array_equal(b.nll[m], a.nll[m])
        np.testing.assert_array_equal(b.token_counts[m], a.token_counts[m])
        for s in a.scorers:
            np.testing.assert_array_equal(b.scores[m][s], a.scores[m][s])
    assert b.summary["metrics"] == a.summary["metrics"]


def _tiny_recipe(path, per_device_batch: int, run_dir) -> None:
    """The offline recipe cut to 3 optimizer steps, no dropout, no eval or checkpoints: a deterministic loss curve."""
    values = load_recipe("offline").to_dict()
    values.update(name="tiny", run_dir=str(run_dir))
    values["data"]["num_train_samples"] = 40
    values["training"]["lora"]["lora_dropout"] = 0.0  # dropout masks would differ between 1 and 2 processes
    values["training"]["sft"].update(
        per_device_train_batch_size=per_device_batch,
        max_steps=3,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
    )
    path.write_text(yaml.safe_dump(values))


def test_torchrun_two_processes_train_like_one_with_the_same_global_batch(zoo, tmp_path):
    """`detox-sft train` as the entrypoint of torchrun --nproc-per-node 2 (CPU, gloo; 4-bit NF4 kept): both ranks
    finish, rank 0 alone writes one adapter, metrics.json reports world size 2 and global batch 2 x 4, and the loss
    curve is the single-process one with per-device batch 8.

    Tolerance 1e-4 (relative): each global step sees the same 8 samples in both runs (accelerate hands each rank its
    part of the same seeded batch order) and the loss is averaged over the tokens of all ranks, so only float32
    summation order differs (the all-reduce, the per-rank sums): ~1e-7 at step 1, growing a little through Adam.
    """
    _tiny_recipe(tmp_path / "one.yaml", 8, tmp_path / "one")
    _tiny_recipe(tmp_path / "two.yaml", 4, tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "detox_sft.cli", "train", "--arm", "raw", "--recipe"]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *train, str(tmp_path / "two.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("| raw | CPU QLoRA |") == 1  # rank 0 alone prints the table
    assert cli.main(["train", "--arm", "raw", "--recipe", str(tmp_path / "one.yaml")]) == 0
    one_m = json.loads((tmp_path / "one" / "adapters" / "raw" / "metrics.json").read_text())
    two_m = json.loads((tmp_path / "two" / "adapters" / "raw" / "metrics.json").read_text())
    assert (two_m["world_size"], two_m["per_device_train_batch_size"], two_m["global_batch_size"]) == (2, 4, 8)
    assert (one_m["world_size"], one_m["global_batch_size"]) == (1, 8)
    assert two_m["load_in_4bit"] and two_m["path"] == "CPU QLoRA"
    assert two_m["global_step"] == one_m["global_step"] == 3
    assert two_m["num_input_tokens_seen"] == one_m["num_input_tokens_seen"]  # the same samples, gathered over ranks
    one_loss = [p["loss"] for p in one_m["loss_curve"]["train"]]
    two_loss = [p["loss"] for p in two_m["loss_curve"]["train"]]
    assert len(two_loss) == 3 and two_loss == pytest.approx(one_loss, rel=1e-4)
    adapter = tmp_path / "two" / "adapters" / "raw"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0 and not (adapter / "checkpoints").exists()
