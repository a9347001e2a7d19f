"""The faults of the environment (benchmarks/faults_env.py): the harness reads the `detox-sft` command's exit status
and stderr as a user's script would, and the committed records show every fault reaching the user as its typed exit
status, with no traceback and the fix named."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "faults_env.py"


@pytest.fixture(scope="module")
def env():
    if "faults_env" not in sys.modules:
        spec = importlib.util.spec_from_file_location("faults_env", _SCRIPT)
        sys.modules["faults_env"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["faults_env"])
    return sys.modules["faults_env"]


def test_the_expected_statuses_are_the_commands_own(env):
    assert env.expected_status() == {
        "disk-full": ("NoRoomError", 3),
        "s3-gone": ("S3UnavailableError", 4),
        "model-server-gone": ("ServerUnavailable", 5),
        "hub-unreachable": ("HubUnavailable", 6),
        "no-such-hub-id": ("HubUnavailable", 6),
    }


def test_a_trial_reads_the_commands_exit_status_and_message(env, tmp_path):
    """The real command against an S3 endpoint where nothing listens: exit 4, no traceback, our message first."""
    process_env = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "HF_HUB_OFFLINE": "1"}
    argv = [env.DETOX_SFT, "download", "x/caikit", str(tmp_path / "d"), "--endpoint", "http://127.0.0.1:9"]
    result, _ = env.run_command([*argv, "--bucket", "b", "--no-progress"], process_env)
    assert result["rc"] == 4 and not result["traceback"] and not result["hang"], result
    assert result["message"].startswith("detox-sft download: download s3://b/x/caikit: cannot reach the S3 endpoint")
    assert result["command"].startswith(".venv/bin/detox-sft download x/caikit ")


@pytest.mark.parametrize(
    "change, outcome",
    [
        ({}, "survived"),
        ({"traceback": True}, "traceback"),
        ({"rc": 1}, "wrong exit status"),
        ({"names_fix": False}, "no fix named"),
        ({"false_done": ["data: x differs"]}, "false done"),
        ({"differences": ["eval: y missing"]}, "lost"),
        ({"rc": 0}, "not interrupted"),
        ({"hang": True}, "hang"),
    ],
)
def test_a_trial_survives_only_with_the_typed_status_no_traceback_the_fix_and_nothing_lost(env, change, outcome):
    record = {"rc": 3, "expected_status": 3, "traceback": False, "names_fix": True, "hang": False, "false_done": []}
    assert env._judge(record | change) == outcome


def test_the_section_shows_exit_status_expected_class_traceback_and_message(env):
    record = {
        "case": "disk-full", "step": "train", "seed": 0, "trial": 0, "method": "tmpfs", "room_bytes": 4096,
        "output_bytes": 9000, "fraction": 0.3, "rc": 3, "expected_class": "NoRoomError", "expected_status": 3,
        "traceback": False, "message": "detox-sft train: no room to write (x). Fix: free disk space", "rerun_rc": 0,
        "redone": [], "differences": [], "false_done": [], "outcome": "survived", "provenance": {"commit": "a" * 40},
    }  # fmt: skip
    text = "\n".join(env.render_env([record]))
    assert "| 0 | train | tmpfs: room 4096 B of 9000 B written (0.30) | 3 | NoRoomError (3) | no |" in text
    assert "detox-sft train: no room to write (x). Fix: free disk space | same as the reference | survived |" in text
    assert "`aaaaaaa`" in text


def test_every_fault_of_the_environment_reached_the_user_as_its_exit_status(env):
    records = env.load_env_records()
    assert records, "no records of benchmarks/faults_env.py: run `make faults`"
    by_case = {case: [r for r in records if r["case"] == case] for case in env.CASES}
    for step in env.DISK_STEPS:  # the disk really filled in every writing step
        assert any(r["step"] == step and r["rc"] != 0 for r in by_case["disk-full"]), f"disk-full {step}"
    for step in ("upload", "download"):  # the S3 server died before and during each transfer
        whens = {r["when"] for r in by_case["s3-gone"] if r["step"] == step and r["command_running"]}
        assert whens == {"before", "mid"}, f"s3-gone {step}: {whens}"
    assert {r["client"] for r in by_case["model-server-gone"] if r["rc"] != 0} == {"http", "grpc"}
    loaders = {(s, field) for s, rows in env.HUB_LOADERS.items() for _, field, _ in rows}
    assert {(r["step"], r["field"]) for r in by_case["hub-unreachable"]} == loaders
    assert {r["step"] for r in by_case["no-such-hub-id"]} == set(env.HUB_LOADERS)
    for r in records:
        where = f"{r['case']} {r['step']} trial {r['trial']}: {r['command']}"
        assert not r["traceback"] and not r["hang"] and r["provenance"], where
        assert r["outcome"] in ("survived", "not interrupted"), (where, r["outcome"], r["message"])
