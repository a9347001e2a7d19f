"""Fault injection (benchmarks/faults.py, benchmarks/faults_env.py): FAULTS.md is generated from the committed trial
records, every long step was interrupted at least ten times, at least three times in each third of its observed
progress (export: in each phase), with nothing lost and no false done, the faults of the environment (disk full, S3
server and model server killed) were each tried with nothing lost, no false done and no hang, and a quick
kill-and-rerun of export and rephrase, aimed in progress space, lands inside the work and survives here too."""

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
    return faults._sibling("faults_env").load_env_records()


def test_faults_md_is_generated_from_the_records(faults, records, env_records):
    assert records, f"no trial records in {faults.RESULTS}: run `make faults`"
    expected = faults.render_report(records, env_records)
    assert faults.REPORT.read_text() == expected, "FAULTS.md is stale: run faults.py --report"


def test_every_step_was_interrupted_in_every_third_of_its_observed_progress_and_nothing_was_lost(faults, records):
    for step in faults.STEPS:
        rs = [r for r in records if r["step"] == step]
        unobserved = [r["trial"] for r in rs if "progress" not in r]
        assert not unobserved, f"{step}: trials {unobserved} have no observed progress at the kill: rerun `make faults`"
        hit = [r for r in rs if r["interrupted"]]
        # the third is where the progress was at the kill (progress / total), whatever the plan aimed at
        per_third = [sum(faults.third(r["progress"], r["total"]) == k for r in hit) for k in range(3)]
        assert len(hit) >= 10 and min(per_third) >= 3, f"{step}: {len(hit)} interrupting kills, by third {per_third}"
        for r in hit:
            where = f"{step} trial {r['trial']} (seed {r['seed']})"
            assert r["moment_s"] > 0 and r["provenance"], f"{where}: no moment since the start or no provenance"
            assert r["rerun_rc"] == 0, f"{where}: the rerun failed"
            assert r["outcome"] == "survived", f"{where}: {r['outcome']}"
        for r in rs:  # the kills that interrupted nothing must not lose anything either
            where = f"{step} trial {r['trial']} (seed {r['seed']})"
            assert not r["redone"] and not r["differences"], f"{where}: lost {r['redone'] + r['differences']}"
            assert not r["false_done"], f"{where}: false done {r['false_done']}"


def test_a_kill_counts_in_the_third_its_progress_was_in_not_the_one_it_aimed_at(faults):
    aimed_late = {"interrupted": True, "progress": 1, "total": 12, "target": 0.9, "planned_third": 2}
    not_interrupted = {"interrupted": False, "progress": 12, "total": 12, "target": 0.95, "planned_third": 2}
    assert faults.thirds([aimed_late, not_interrupted]) == [1, 0, 0]
    assert [faults.third(d, 3) for d in range(3)] == [0, 1, 2]  # export: a phase each


def test_kill_targets_are_seeded_in_their_third_and_land_inside_a_unit(faults):
    targets = [faults.kill_target(0, "train", trial, trial % 3) for trial in range(30)]
    assert targets == [faults.kill_target(0, "train", trial, trial % 3) for trial in range(30)]
    assert targets != [faults.kill_target(1, "train", trial, trial % 3) for trial in range(30)]
    assert [int(t * 3) for t in targets] == [trial % 3 for trial in range(30)]
    # a reference run that committed 4 units at 2 cpu s (3 s wall), 8 at 3 s (5 s), 12 at 5 s (6 s): half way (6
    # units) is half way through the second batch: wait for 4 units, then half of that batch's 1 cpu s (2 s wall)
    timeline = [[0, 0, 0], [2, 3, 4], [3, 5, 8], [5, 6, 12]]
    assert faults.plan_kill(timeline, 0.5, "cpu") == (4, 0.5)
    assert faults.plan_kill(timeline, 0.5, "wall") == (4, 1.0)
    assert faults.plan_kill(timeline, 0.1, "cpu") == pytest.approx((0, 0.6))  # in the first unit: from the start


def test_quick_kill_and_rerun_of_export_and_rephrase(faults, zoo, tmp_path, make_adapter):
    from detox_sft.config import load_recipe

    harness = faults.Harness(tmp_path / "work", results=tmp_path / "records", trials=1)
    try:
        # export's input (the run as evaluate leaves it) is an adapter: made directly, training one is the slow trials' job
        make_adapter(load_recipe(str(harness.recipes["ref"])), zoo.opt, "detox")
        shutil.copytree(harness.run, harness.work / "after" / "evaluate")
        # aimed at the middle of the progress (export: its second phase, rephrase: half the TMaRCo outputs): the kill
        # waits for the observed progress, not a moment, so it lands inside the work however loaded the machine is
        for step in ("export", "rephrase"):
            harness.reference(step)
            record = harness.trial(step, 0, 0.5)
            assert record["interrupted"] and record["moment_s"] > 0, record
            assert 0 <= record["progress"] < record["total"] and record["third"] >= 1, record
            if step == "export":
                assert record["phase"] in ("converting to Caikit", "checking the Caikit model"), record
            else:
                assert record["phase"].startswith("rephrasing"), record
            assert record["outcome"] == "survived", record
            assert harness.record_path(step, 0).is_file()
    finally:
        harness.close()
