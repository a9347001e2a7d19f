"""Fault injection (benchmarks/faults.py, benchmarks/faults_env.py): FAULTS.md is generated from the committed trial
records, every long step was killed at least ten times over its whole run with nothing lost and no false done, the
faults of the environment (disk full, S3 server and model server killed) were each tried with nothing lost, no false
done and no hang, and a quick kill-and-rerun of export and rephrase survives here too."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"


@pytest.fixture(scope="module")
def faults():
    spec = importlib.util.spec_from_file_location("bench_faults", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_faults"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def records(faults):
    return faults.load_records()


@pytest.fixture(scope="module")
def env_records(faults):
    return faults.load_env_records()


def test_faults_md_is_generated_from_the_records(faults, records, env_records):
    assert records, f"no trial records in {faults.RESULTS}: run `make faults`"
    expected = faults.render_report(records, env_records)
    assert faults.REPORT.read_text() == expected, "FAULTS.md is stale: run faults.py --report"


def test_the_faults_of_the_environment_were_tried_and_nothing_was_lost_or_hung(faults, env_records):
    by_case = {case: [r for r in env_records if r["case"] == case] for case in faults.ENV_CASES}
    # the disk filled up in every writing step, at several sizes, and at least once per step the write really failed
    disk = by_case["disk-full"]
    for step in ("rephrase", "train", "evaluate", "export", "download"):
        rs = [r for r in disk if r["step"] == step]
        assert len(rs) >= 3 and any(r["rc"] != 0 for r in rs), f"disk-full {step}: {len(rs)} trials"
    for r in disk:
        where = f"disk-full {r['step']} trial {r['trial']}"
        assert r["outcome"] in ("survived", "limit not reached"), (where, r["outcome"], r["false_done"], r["redone"])
        assert r["rerun_rc"] == 0 and not r["differences"] and not r["false_done"] and not r["hang"], where
    # the S3 server was really killed mid-transfer, in upload and in download
    s3 = by_case["s3-restart"]
    for step in ("upload", "download"):
        assert sum(r["step"] == step and r["server_killed"] for r in s3) >= 3, f"s3-restart {step}"
    for r in s3:
        assert r["outcome"] in ("survived", "not interrupted"), (r["step"], r["trial"], r["outcome"], r["false_done"])
    # the model server died under requests of both clients: a typed error each time, never a hang or an answer
    served = by_case["model-server-kill"]
    killed = [r for r in served if r["outcome"] != "not interrupted"]
    assert {r["client"] for r in killed} == {"http", "grpc"} and len(killed) >= 6, len(killed)
    assert all(r["outcome"] == "typed error" and r["seconds_to_outcome"] < 120 for r in killed), killed


def test_every_step_was_killed_ten_times_over_its_whole_run_and_nothing_was_lost(faults, records):
    for step in faults.STEPS:
        killed = [r for r in records if r["step"] == step and r["killed"]]
        assert len(killed) >= 10, f"{step}: {len(killed)} killed trials"
        thirds = {min(2, int(r["fraction"] * 3)) for r in killed}
        assert thirds == {0, 1, 2}, f"{step}: kills only in thirds {sorted(thirds)} of the run"
        assert len({r["phase"] for r in killed}) >= 2, f"{step}: every kill hit the same phase"
        for r in killed:
            where = f"{step} trial {r['trial']} (seed {r['seed']})"
            assert r["rerun_rc"] == 0, f"{where}: the rerun failed"
            assert not r["redone"] and not r["differences"], f"{where}: lost {r['redone'] + r['differences']}"
            assert not r["false_done"], f"{where}: false done {r['false_done']}"
            assert r["outcome"] == "survived"


def test_kill_moments_are_seeded_and_cover_the_run(faults):
    values = faults.fractions(0, "train", 10)
    assert values == faults.fractions(0, "train", 10) and values != faults.fractions(1, "train", 10)
    assert sorted(int(v / faults.MAX_FRACTION * 10) for v in values) == list(range(10))  # one in each tenth


def test_quick_kill_and_rerun_of_export_and_rephrase(faults, zoo, tmp_path, make_adapter):
    from detox_sft.config import load_recipe

    harness = faults.Harness(tmp_path / "work", results=tmp_path / "records", trials=1)
    try:
        # export's input (the run as evaluate leaves it) is an adapter: made directly, training one is the slow trials' job
        make_adapter(load_recipe(str(harness.recipes["ref"])), zoo.opt, "detox")
        shutil.copytree(harness.run, harness.work / "after" / "evaluate")
        # killed once its work is seen under way (a file of the export built, a batch of outputs cached), not at a
        # moment: on a loaded machine a moment can land before the work or after its end
        inside = {
            "export": ("saving the merged model", "converting to Caikit", "checking the Caikit model"),
            "rephrase": ("rephrasing",),
        }
        for step in ("export", "rephrase"):
            harness.reference(step)
            record = harness.trial(step, 0, progress=faults.PROGRESS[step])
            assert record["killed"] and record["phase"].startswith(inside[step]), record
            assert record["outcome"] == "survived", record
            assert harness.record_path(step, 0).is_file()
    finally:
        harness.close()
