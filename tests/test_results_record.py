"""README's headline numbers equal the committed record of the offline demo run (results/offline), and a slow test
that reruns the offline experiment (notebooks 1-2, through the package) and reproduces that record."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detox_sft.evaluation import headline_numbers

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "results" / "offline"
README = ROOT / "README.md"
HOW_TO_RECORD = (
    "after the final `make demo`, run `.venv/bin/python benchmarks/record_run.py runs/<stamp> results/offline` and "
    "commit results/offline"
)


def _record() -> dict:
    if not (RECORD / "record.json").is_file():
        pytest.skip(f"no committed record yet (results/offline/record.json): {HOW_TO_RECORD}")
    return json.loads((RECORD / "record.json").read_text())


def _record_run_module():
    spec = importlib.util.spec_from_file_location("record_run", ROOT / "benchmarks" / "record_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_quotes_the_recorded_headline_numbers():
    from detox_sft.config import load_recipe

    record = _record()
    summary = json.loads((RECORD / "results.json").read_text())
    numbers = headline_numbers(summary)
    assert record["headline"] == numbers, "record.json's headline does not match its results.json: rerun record_run.py"
    assert record["recipe"] == "offline" and record["headline_scorer"] == summary["headline_scorer"]
    assert summary["headline_scorer"] == load_recipe("offline").evaluation.scorers[0], (
        "the record was made with another headline scorer than recipes/offline.yaml's: record a new run"
    )
    readme = README.read_text()
    missing = {key: text for key, text in numbers.items() if text not in readme}
    assert not missing, f"README.md does not quote the recorded run {record['run']}: {missing}"
    # the rephrase step's figures as README words them (notebook 1)
    r = json.loads((RECORD / "rephrase_summary.json").read_text())
    quoted = [
        f"sent {r['gated']} of {r['total']} training samples",
        f"rewrote the continuation of {r['rephrased']} (in {r['unchanged']} the rewrite",
        f"from {r['gated_toxicity_before']:.3f} to {r['gated_toxicity_after']:.3f}",
        f"from {r['mean_toxicity_before']:.3f} to {r['mean_toxicity_after']:.3f}",
        f"chrF of {r['mean_chrf']:.1f}",
        f"{100 * r['mean_changed_word_share']:.1f}% of its words",
    ]
    assert [q for q in quoted if q not in " ".join(readme.split())] == [], (
        "README's rephrase figures are not the record's"
    )


# how README names the record's scorers
README_NAMES = {"zoo:lexicon": "lexicon", "profanity-check": "alt-profanity-check", "hatesonar": "hatesonar"}


def test_every_number_readme_quotes_from_the_record_is_the_records():
    """Beyond the headline, every figure README's record section quotes is the record's, formatted as README formats
    it: the sizes, the second scorer's paired difference, the agreement table, the non-toxic prompts' toxicity,
    perplexity and distinct-2; and no decimal number in that section is left unchecked (a past run's numbers, in the
    bullet that says so, aside)."""
    import re

    from detox_sft.evaluation.report import _diff, _fmt

    _record()
    s = json.loads((RECORD / "results.json").read_text())
    recipe = json.loads((RECORD / "recipe.json").read_text())
    r = json.loads((RECORD / "rephrase_summary.json").read_text())
    readme = " ".join(README.read_text().split())
    start, end = "Rephrasing (notebook 1):", "The tutorial at its real size"
    assert start in readme and end in readme, f"README's record section no longer runs from {start!r} to {end!r}"
    section = readme[readme.index(start) : readme.index(end)]
    section = re.sub(r"- An earlier version of this README quoted .*?(?= - |$)", "", section)  # a past run's numbers

    headline, second = s["headline_scorer"], s["scorers"][1]
    tox = {m: s["metrics"][m]["toxicity"] for m in s["models"]}
    other = s["comparisons"]["detox_vs_raw"][second]["expected_max_toxicity"]
    nt = s["nontoxic"]
    nt_tox = {m: nt["metrics"][m]["toxicity"][headline]["mean_toxicity"] for m in ("raw", "detox")}
    nt_ppl = {m: nt["metrics"][m]["perplexity"] for m in ("raw", "detox")}
    quoted = [
        *headline_numbers(s).values(),
        f"alt-profanity-check >= {recipe['rephrase']['gate_threshold']}",
        f"keeps {r['mean_toxicity_after']:.3f} mean toxicity",
        f"{s['num_prompts']} toxic prompts x {s['num_samples']} sampled continuations",
        f"the same generations give detox minus raw EMT {_diff(other)} (raw "
        f"{tox['raw'][second]['expected_max_toxicity']['value']:.3f}, detox "
        f"{tox['detox'][second]['expected_max_toxicity']['value']:.3f})",
        f"agree on the same {s['agreement'][0]['continuations']} continuations",
        f"| scorers | Spearman | same side of {s['config']['toxic_threshold']} |",
        *(
            f"| {README_NAMES[p['scorers'][0]]} vs {README_NAMES[p['scorers'][1]]} | {p['spearman']:.3f} | "
            f"{p['agreement']:.3f} |"
            for p in s["agreement"]
        ),
        f"({nt['num_prompts']} non-toxic prompts, {README_NAMES[headline]} judge): its mean toxicity there is "
        f"{_fmt(nt_tox['detox'])} against the raw arm's {_fmt(nt_tox['raw'])} (paired "
        f"{_diff(nt['comparisons']['detox_vs_raw'][headline]['mean_toxicity'])})",
        f"its perplexity under the base model is {_fmt(nt_ppl['detox'], 1)} against {_fmt(nt_ppl['raw'], 1)}, "
        f"distinct-2 {nt['metrics']['detox']['distinct_2']:.3f} against {nt['metrics']['raw']['distinct_2']:.3f}",
    ]
    assert s.get("perplexity_model", recipe["training"]["base_model"]) == recipe["training"]["base_model"], (
        "README says the arms' perplexity is under the base model: the record used another judge"
    )
    missing = [q for q in quoted if q not in section]
    run = json.loads((RECORD / "record.json").read_text())["run"]
    assert not missing, f"README does not quote the recorded run {run} as it is: {missing}"
    number = r"(?<![\w.])[-+]?\d+\.\d+(?!\w)"  # a number, not a part of an id (facebook/opt-1.3b)
    checked = [n for q in quoted for n in re.findall(number, q)]
    checked += [f"{r[k]:.3f}" for k in ("gated_toxicity_before", "gated_toxicity_after")]
    checked += [f"{r[k]:.3f}" for k in ("mean_toxicity_before", "mean_toxicity_after")]
    checked += [f"{r['mean_chrf']:.1f}", f"{100 * r['mean_changed_word_share']:.1f}"]
    unchecked = [n for n in re.findall(number, section) if n not in checked]
    assert not unchecked, f"README's record section quotes numbers no test checks against the record: {unchecked}"


def _fake_run(tmp_path: Path) -> Path:
    """A demo-shaped run directory with a real summary (random scores) and the files the record copies."""
    from detox_sft.config import EvaluationConfig
    from detox_sft.evaluation import report

    rng = np.random.default_rng(1)
    models = ["base", "raw", "detox"]
    scorers = ["zoo:lexicon", "profanity-check"]
    results = report.EvalResults(
        prompts=[f"p{i}" for i in range(6)],
        models=models,
        scorers=scorers,
        generations={m: [["a b c", "d e"]] * 6 for m in models},
        scores={m: {s: rng.random((6, 2)) for s in scorers} for m in models},
    )
    summary = report._summarize(results, EvaluationConfig(scorers=scorers, num_samples=2), seed=0, extra={})
    summary |= {"recipe": "offline", "profile": "offline", "generations": {"raw": [["big"]]}}
    run = tmp_path / "runs" / "20270101-000000" / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps(summary))
    (run / "eval" / "summary.md").write_text(report.summary_markdown(summary))
    (run / "data").mkdir()
    (run / "data" / "rephrase_summary.jsonl").write_text(json.dumps({"gated": 3, "total": 10}) + "\n")
    (run / "notebooks").mkdir()
    (run / "notebooks" / "2-eval.json").write_text(json.dumps({"summary": summary}))
    (run.parent / "recipe.json").write_text(json.dumps({"name": "offline"}))
    return run.parent


def test_record_run_writes_a_small_record_with_its_provenance(tmp_path):
    record_run = _record_run_module()
    demo = _fake_run(tmp_path)
    out = tmp_path / "results" / "offline"
    (out / "notebooks").mkdir(parents=True)
    (out / "notebooks" / "stale.json").write_text("{}")  # an older record is replaced whole
    path = record_run.record_run(demo, out)
    record = json.loads(path.read_text())
    assert record["recipe"] == "offline" and record["run"] == "20270101-000000"
    assert record["machine"]["cores"] >= 1 and record["machine"]["cpu"] and record["machine"]["platform"]
    # the git state comes from the demo's provenance.json, taken as it started: this fake run has none
    assert "provenance" not in record and "git" not in record and record["date"].endswith("Z")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [*record["files"], "record.json"]
    )
    assert "notebooks/stale.json" not in record["files"] and "rephrase_summary.json" in record["files"]
    results = json.loads((out / "results.json").read_text())
    assert "generations" not in results and "agreement" in results
    assert "generations" not in json.loads((out / "notebooks" / "2-eval.json").read_text())["summary"]
    assert record["headline"] == headline_numbers(results)
    d = results["comparisons"]["detox_vs_raw"]["zoo:lexicon"]["expected_max_toxicity"]
    assert record["headline"]["detox - raw EMT"] == f"EMT {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    assert record_run.find_run(demo) == record_run.find_run(demo / "run")
    with pytest.raises(FileNotFoundError, match="make demo"):
        record_run.find_run(tmp_path)


@pytest.mark.slow
def test_the_offline_experiment_reproduces_the_record(tmp_path):
    """Notebooks 1 and 2 on the offline recipe, through the package functions they call, from a fresh run directory
    (the zoo is reused), in a process pinned to the recipe's ``cpu_isa`` as `make demo` pins its kernels: the
    headline numbers equal the record's as README prints them, on any x86-64 CPU with AVX2. Takes minutes on 2 cores."""
    from detox_sft_dev.zoo.build import CPU_PINS

    record = _record()
    code = f"""
import json
import os
import subprocess
import sys
from detox_sft import data, evaluation, notebook, rephrase, training
cfg = notebook.start("offline", {str(tmp_path / "run")!r})
dataset = data.load_train_dataset(cfg.data, cfg.seed)
_, s = rephrase.detoxify_training_set(cfg, dataset["train"], progress=False)
training.train_arms(cfg, training.load_arm_datasets(cfg))
results = evaluation.evaluate_models(cfg, progress=False)
summary = {{k: getattr(s, k) for k in ("total", "gated", "rephrased", "mean_toxicity_before", "mean_toxicity_after")}}
print(json.dumps({{"summary": summary, "headline": evaluation.headline_numbers(results)}}))
"""
    env = {**os.environ, **CPU_PINS["avx2"], "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    recorded = json.loads((RECORD / "rephrase_summary.json").read_text())
    summary = got["summary"]
    assert [summary[k] for k in ("total", "gated", "rephrased")] == [
        recorded[k] for k in ("total", "gated", "rephrased")
    ]
    for key in ("mean_toxicity_before", "mean_toxicity_after"):
        assert f"{summary[key]:.3f}" == f"{recorded[key]:.3f}", key
    assert got["headline"] == record["headline"], f"recorded on {record['machine']}"


def test_the_recorded_summary_tables_are_what_the_package_writes_from_the_recorded_results():
    """results/offline/summary.md holds the tables ``summary_markdown`` (pandas' ``to_markdown``) writes from the
    recorded results.json: the same cells, row by row (the columns' padding aside)."""
    import re

    from detox_sft.evaluation import summary_markdown

    _record()

    def cells(text: str) -> list[str]:
        rows = [line for line in text.splitlines() if not re.fullmatch(r"\|[-:| ]+\|", line.strip())]
        return ["|".join(c.strip() for c in row.split("|")) if row.startswith("|") else row for row in rows]

    written = summary_markdown(json.loads((RECORD / "results.json").read_text()))
    assert cells(written) == cells((RECORD / "summary.md").read_text())
