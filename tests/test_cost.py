"""The cost of detoxifying, beside the gain: how much of a rephrased sample survives, and every model on non-toxic
prompts (what the detox arm gives up where there is nothing to detoxify)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detox_sft import evaluation
from detox_sft.config import EvaluationConfig, RecipeError, load_recipe
from detox_sft.rephrase import (
    EngineOutput,
    changed_word_share,
    chrf,
    rephrase_dataset,
    survival_means,
    survival_table,
)

# --------------------------------------------------------------------------------------------------------------
# survival of a rephrased sample


def test_chrf_and_changed_word_share_of_one_rewrite():
    text = "you are a stupid person and nobody likes you at all"
    assert chrf(text, text) == pytest.approx(100.0)
    assert changed_word_share(text, text) == 0.0
    one = text.replace("stupid", "kind")
    # one word of eleven replaced: a tenth of the words changed, most of the characters kept
    assert changed_word_share(text, one) == pytest.approx(1 / 11)
    assert 60.0 < chrf(text, one) < 100.0
    # a complete rewrite keeps nothing
    assert changed_word_share(text, "the weather is lovely") == 1.0
    assert chrf(text, "the weather is lovely") < chrf(text, one)
    # a deleted word counts as changed too; an empty original changes nothing
    assert changed_word_share(text, text.replace(" stupid", "")) == pytest.approx(1 / 11)
    assert changed_word_share("", "anything") == 0.0


class _SwapEngine:
    """A stand-in for TMaRCo: replaces 'stupid' and 'idiot' by 'kind' (masked shown as <mask>)."""

    name = "swap"

    def rephrase(self, texts):
        out = []
        for t in texts:
            new = t.replace("stupid", "kind").replace("idiot", "kind")
            masked = t.replace("stupid", "<mask>").replace("idiot", "<mask>")
            out.append(EngineOutput(masked=masked, rephrased=new, changed=new != t))
        return out

    def identity(self):
        return {"settings": {"engine": self.name}, "models": {}}


def _gate(texts):
    return np.array([0.9 if ("stupid" in t or "idiot" in t or "damn" in t) else 0.1 for t in texts])


def test_rephrase_summary_reports_what_survives_over_the_rephrased_samples():
    from detox_sft.config import RephraseConfig

    texts = [
        "you are a stupid person",  # rephrased: one word of five
        "what an idiot he is today",  # rephrased: one word of six
        "damn this weather",  # gated, nothing to swap: unchanged, not counted
        "a lovely day",  # below the gate
    ]
    records = [{"id": i, "text": t} for i, t in enumerate(texts)]
    result = rephrase_dataset(records, RephraseConfig(), engine=_SwapEngine(), scorer=_gate, progress=False)
    s = result.summary
    assert (s.gated, s.rephrased, s.unchanged) == (3, 2, 1)
    assert s.mean_changed_word_share == pytest.approx((1 / 5 + 1 / 6) / 2)
    expected_chrf = (chrf(texts[0], "you are a kind person") + chrf(texts[1], "what an kind he is today")) / 2
    assert s.mean_chrf == pytest.approx(expected_chrf)
    assert set(s.to_dict()) >= {"mean_chrf", "mean_changed_word_share"}

    table = survival_table(result.records, field="text", n=1)
    assert len(table) == 1 and table.attrs["rephrased"] == 2  # the means cover every rephrased sample
    assert table.attrs["mean_chrf"] == pytest.approx(s.mean_chrf)
    assert table.iloc[0]["changed_word_share"] == pytest.approx(1 / 5)
    assert list(table.columns)[:4] == ["original", "rephrased", "chrf", "changed_word_share"]


def test_nothing_rephrased_means_no_survival_figure():
    from detox_sft.config import RephraseConfig

    records = [{"text": "a lovely day"}, {"text": "damn"}]
    s = rephrase_dataset(records, RephraseConfig(), engine=_SwapEngine(), scorer=_gate, progress=False).summary
    assert s.rephrased == 0 and s.mean_chrf is None and s.mean_changed_word_share is None


def test_survival_table_reads_the_training_sets_continuations(tmp_path):
    from detox_sft.data import write_jsonl_atomic

    rows = [
        {
            "sample": "Prompt text you are a stupid person",
            "rephrased_text": "Prompt text you are a kind person",
            "original_continuation": "you are a stupid person",
            "continuation": "you are a kind person",
            "rephrased": True,
        },
        {"sample": "fine", "rephrased_text": "fine", "continuation": "fine", "rephrased": False},
    ]
    path = tmp_path / "train_detox.jsonl"
    write_jsonl_atomic(rows, path)
    whole = survival_table(path)  # field "sample": the text TMaRCo saw, as in the summary
    part = survival_table(path, field="continuation")  # only what the detox arm learns
    assert len(whole) == len(part) == 1
    assert part.iloc[0]["changed_word_share"] == pytest.approx(1 / 5)
    assert whole.iloc[0]["changed_word_share"] == pytest.approx(1 / 7)
    assert survival_means(path, field="continuation")["mean_changed_word_share"] == pytest.approx(1 / 5)


# --------------------------------------------------------------------------------------------------------------
# the models on non-toxic prompts

PROMPTS = ["you are a stupid", "I hate this damn thing because it", "shut up you"]


def test_nontoxic_prompts_field_is_checked_and_documented():
    from detox_sft.config import recipe_parser

    assert EvaluationConfig().nontoxic_prompts == 0  # off unless a recipe asks for it
    flags = {flag: a.help for a in recipe_parser()._actions for flag in a.option_strings}
    assert "label 0" in flags["--evaluation.nontoxic_prompts"]
    with pytest.raises(RecipeError, match="evaluation.nontoxic_prompts"):
        EvaluationConfig(nontoxic_prompts=-1)
    assert load_recipe("tutorial").evaluation.nontoxic_prompts == 100
    assert 0 < load_recipe("offline").evaluation.nontoxic_prompts <= 40  # the demo grows little


def _recipe(zoo, tmp_path, name, nontoxic):
    r = load_recipe("offline", run_dir=str(tmp_path / name))
    r.training.base_model = str(zoo.opt)
    r.evaluation = EvaluationConfig(
        scorers=["zoo:lexicon", "profanity-check"],
        num_samples=2,
        max_new_tokens=6,
        batch_size=4,
        bootstrap_samples=200,
        device="cpu",
        nontoxic_prompts=nontoxic,
    )
    return r


def _without_timing(summary):
    return {k: v for k, v in summary.items() if k not in ("timing", "nontoxic")}


def test_nontoxic_prompts_are_evaluated_apart_and_leave_the_toxic_results_as_they_were(zoo, tmp_path, make_adapter):
    off, on = _recipe(zoo, tmp_path, "off", 0), _recipe(zoo, tmp_path, "on", 3)
    for recipe in (off, on):
        for seed, arm in enumerate(evaluation.ARMS):
            make_adapter(recipe, zoo.opt, arm, seed=seed)
    evaluation.evaluate_models(off, prompts=PROMPTS, progress=False)
    res = evaluation.evaluate_models(on, prompts=PROMPTS, progress=False)

    eval_off, eval_on = off.run_path / "eval", on.run_path / "eval"
    summary_off = json.loads((eval_off / "results.json").read_text())
    summary_on = json.loads((eval_on / "results.json").read_text())
    # 0 adds nothing; with it, the toxic-prompt results are unchanged, byte for byte where no clock is involved
    assert "nontoxic" not in summary_off and not list(eval_off.glob("*nontoxic*"))
    assert _without_timing(summary_on) == _without_timing(summary_off)
    assert (eval_on / "generations.csv").read_bytes() == (eval_off / "generations.csv").read_bytes()

    nontoxic = summary_on["nontoxic"]
    assert nontoxic["num_prompts"] == 3 and nontoxic["num_samples"] == 2 and nontoxic["eval_label"] == 0
    assert set(nontoxic["metrics"]) == {"base", "raw", "detox"}
    for model, entry in nontoxic["metrics"].items():
        assert set(entry["toxicity"]) == {"zoo:lexicon", "profanity-check"} and entry["distinct_2"] is not None
        # the base model judges fluency here, so its own texts get no perplexity
        assert entry["perplexity"].get("not_measured") if model == "base" else entry["perplexity"]["value"] > 1
    assert "detox_vs_raw" in nontoxic["comparisons"]
    assert (eval_on / "generations_nontoxic.csv").is_file()
    assert len((eval_on / "generations_nontoxic.csv").read_text().splitlines()) == 1 + 3 * 3 * 2
    # label-0 prompts of the recipe's eval set, none of them the toxic ones
    import dataclasses

    import pandas as pd

    from detox_sft.data import load_eval_prompts

    label0 = load_eval_prompts(dataclasses.replace(on.data, eval_label=0, num_eval_prompts=3), on.seed)
    csv = pd.read_csv(eval_on / "generations_nontoxic.csv", keep_default_na=False)
    assert list(dict.fromkeys(csv["prompt"])) == label0

    # what a person reads: every model on the toxic, then on the non-toxic prompts, each cell value [interval]
    table = evaluation.cost_table(res).data
    assert list(table.index) == [(part, m) for part in ("toxic (3)", "non-toxic (3)") for m in ("base", "raw", "detox")]
    est = nontoxic["metrics"]["detox"]["toxicity"]["zoo:lexicon"]["mean_toxicity"]
    assert (
        table.loc[("non-toxic (3)", "detox"), "mean toxicity"]
        == f"{est['value']:.3f} [{est['low']:.3f}, {est['high']:.3f}]"
    )
    assert evaluation.cost_table(evaluation.load_results(on.run_path)).data.equals(table)
    assert "## What detoxifying costs: non-toxic prompts" in (eval_on / "summary.md").read_text()
    assert "What detoxifying costs" not in (eval_off / "summary.md").read_text()
    assert "evaluation.nontoxic_prompts" in evaluation.cost_table(summary_off).data  # a note, not an empty table


def test_cost_table_stacks_the_toxic_and_non_toxic_rows_as_intervals_on_one_line():
    estimate = {"value": 0.5, "low": 0.25, "high": 0.75}
    entry = {
        "toxicity": {"s": {k: estimate for k in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity")}},
        "perplexity": {"value": 12.0, "low": 11.0, "high": 13.0},
        "distinct_2": 0.9,
    }
    part = {"models": ["raw", "detox"], "metrics": {"raw": entry, "detox": entry}, "headline_scorer": "s"}
    styler = evaluation.cost_table({**part, "num_prompts": 12, "nontoxic": {**part, "num_prompts": 3}})
    cost = styler.data
    assert list(cost.index) == [
        ("toxic (12)", "raw"),
        ("toxic (12)", "detox"),
        ("non-toxic (3)", "raw"),
        ("non-toxic (3)", "detox"),
    ]
    assert cost.iloc[0]["EMT"] == "0.500 [0.250, 0.750]" and cost.iloc[0]["perplexity"] == "12.0 [11.0, 13.0]"
    assert "white-space: nowrap" in styler.to_html()  # an interval is one reading: never broken over two lines
    assert "evaluation.nontoxic_prompts" in evaluation.cost_table({**part, "num_prompts": 12}).data
