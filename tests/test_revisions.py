"""Reproducible runs: every hub model and dataset of the tutorial recipe has a revision field beside it, a revision is a
full commit id, a zoo: reference ignores it and a local path refuses it (naming the field), and the loaders pass it to
from_pretrained / load_dataset / pipeline as revision=."""

from __future__ import annotations

import pytest

from detox_sft.config import RECIPES_DIR, RecipeError, load_recipe
from detox_sft.refs import is_hub_ref, revision_kwargs
from detox_sft.toxicity import HATESONAR_SCORER, OFFLINE_SCORER

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PACKAGED = (OFFLINE_SCORER, HATESONAR_SCORER)

# every hub reference field of a recipe, and the field that pins it
PINS = {
    "data.train_dataset": "data.train_revision",
    "data.eval_dataset": "data.eval_revision",
    "rephrase.base_model": "rephrase.base_model_revision",
    "rephrase.expert": "rephrase.expert_revision",
    "rephrase.anti_expert": "rephrase.anti_expert_revision",
    "rephrase.scorer": "rephrase.scorer_revision",
    "training.base_model": "training.base_model_revision",
    "evaluation.perplexity_model": "evaluation.perplexity_model_revision",
}


def _get(recipe, dotted):
    section, name = dotted.split(".")
    return getattr(getattr(recipe, section), name)


def test_every_hub_reference_of_the_tutorial_has_a_revision_field():
    recipe = load_recipe("tutorial")
    for ref_field, revision_field in PINS.items():
        ref, revision = _get(recipe, ref_field), _get(recipe, revision_field)  # both fields exist
        assert revision is None or (len(revision) == 40 and is_hub_ref(ref)), revision_field
    assert recipe.data.train_revision == "f21629712ffd6a3d13a54fd2807ccd521c55ef74"  # RTP's README commit f216297
    scorers = recipe.evaluation.scorers
    assert all(name in scorers for name in recipe.evaluation.scorer_revisions)
    # the recipe is the place to pin: the YAML names the field of each hub reference it has (a packaged scorer has
    # none to pin)
    text = (RECIPES_DIR / "tutorial.yaml").read_text()
    hub = [r for r in PINS if _get(recipe, r) and is_hub_ref(_get(recipe, r)) and _get(recipe, r) not in PACKAGED]
    assert len(hub) == 7
    for revision_field in [*(PINS[r] for r in hub), "evaluation.scorer_revisions"]:
        assert f"  {revision_field.split('.')[1]}:" in text, revision_field


def test_a_revision_is_a_full_commit_id_of_a_hub_reference():
    with pytest.raises(RecipeError, match=r"data\.train_revision: got 'f216297', expected a full commit id"):
        load_recipe("tutorial", dotted={"data.train_revision": "f216297"})
    with pytest.raises(RecipeError, match=r"training\.base_model_revision: training\.base_model is '\./m', a local"):
        load_recipe("tutorial", dotted={"training.base_model": "./m", "training.base_model_revision": COMMIT})
    with pytest.raises(RecipeError, match=r"evaluation\.scorer_revisions\.roberta: is not one of evaluation\.scorers"):
        load_recipe("tutorial", dotted={"evaluation.scorer_revisions": f"{{roberta: {COMMIT}}}"})
    with pytest.raises(RecipeError, match=r"evaluation\.perplexity_model_revision: evaluation\.perplexity_model is"):
        load_recipe(
            "tutorial", dotted={"evaluation.perplexity_model": "null", "evaluation.perplexity_model_revision": COMMIT}
        )
    # the offline profile's zoo: references ignore a revision (say, the tutorial's pins carried over)
    offline = load_recipe("offline", dotted={"training.base_model_revision": COMMIT})
    assert revision_kwargs(offline.training.base_model, offline.training.base_model_revision) == {}
    assert revision_kwargs("facebook/opt-350m", COMMIT) == {"revision": COMMIT}
    assert revision_kwargs("facebook/opt-350m", None) == {}
    with pytest.raises(ValueError, match="local path"):
        revision_kwargs(__file__, COMMIT)


def test_training_passes_the_base_revision_to_the_trainer(tmp_path):
    from detox_sft.training import precision_kwargs

    cfg = load_recipe("tutorial", dotted={"training.base_model_revision": COMMIT}).training
    assert precision_kwargs(cfg, "cpu")["model_init_kwargs"]["revision"] == COMMIT
    offline = load_recipe("offline", dotted={"training.base_model_revision": COMMIT}).training
    assert "revision" not in precision_kwargs(offline, "cpu")["model_init_kwargs"]


class _Stop(OSError):
    """Raised by a stand-in loader once it has seen its arguments."""


def _recording(seen):
    def load(*args, **kwargs):
        seen.append((args, kwargs))
        raise _Stop("stop here")

    return load


def test_the_loaders_pass_revision(monkeypatch):
    import datasets
    import transformers

    from detox_sft import compat, evaluation, toxicity
    from detox_sft.data import DataError, load_rows

    seen: list = []
    monkeypatch.setattr(datasets, "load_dataset", _recording(seen))
    with pytest.raises(DataError, match=f"at revision {COMMIT}"):
        load_rows("allenai/real-toxicity-prompts", "train", revision=COMMIT)
    assert seen.pop() == (("allenai/real-toxicity-prompts",), {"split": "train", "revision": COMMIT})

    monkeypatch.setattr(transformers.AutoModelForSeq2SeqLM, "from_pretrained", _recording(seen))
    with pytest.raises(OSError):
        compat.load_tmarco_model("trustyai/gplus", forced_bos_token_id=0, revision=COMMIT)
    assert seen.pop()[1] == {"revision": COMMIT}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _recording(seen))
    with pytest.raises(evaluation.EvaluationError):
        evaluation.load_base_model("facebook/opt-350m", "cpu", revision=COMMIT)
    assert seen.pop()[1] == {"revision": COMMIT}

    monkeypatch.setattr(transformers, "pipeline", _recording(seen))
    with pytest.raises(toxicity.ScorerError):
        toxicity.load_scorer("facebook/roberta-hate-speech-dynabench-r4-target", revision=COMMIT)
    assert seen.pop()[1]["revision"] == COMMIT
    with pytest.raises(toxicity.ScorerError, match="not a hub classifier"):
        toxicity.load_scorer("profanity-check", revision=COMMIT)
