"""Fault injection (benchmarks/faults.py): FAULTS.md is generated from the committed trial records, every long step was
killed at least ten times over its whole run with nothing lost and no false done, and a quick kill-and-rerun of
export and rephrase survives here too."""

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


def test_faults_md_is_generated_from_the_records(faults, records):
    assert records, f"no trial records in {faults.RESULTS}: run `make faults`"
    assert faults.REPORT.read_text() == faults.render_report(records), "FAULTS.md is stale: run faults.py --report"


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
        for step in ("export", "rephrase"):
            harness.reference(step)
            record = harness.trial(step, 0, 0.5)  # killed half way through its work
            assert record["killed"] and record["outcome"] == "survived", record
            assert harness.record_path(step, 0).is_file()
    finally:
        harness.close()
