"""Toxicity scorers and the local `evaluate` measurement module, offline."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from detox_sft import toxicity

CLEAN = "thank you for the lovely afternoon in the park"
TOXIC = "shut up you fucking idiot"


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random RoBERTa classifier with the hate-speech model's labels (nothate / hate) and a BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-classifier")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [CLEAN, TOXIC] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(fast),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=80,
        pad_token_id=1,
        id2label={0: "nothate", 1: "hate"},
        label2id={"nothate": 0, "hate": 1},
    )
    RobertaForSequenceClassification(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_profanity_check_scores_a_list_in_order():
    scorer = toxicity.load_scorer(toxicity.OFFLINE_SCORER)
    scores = scorer([CLEAN, TOXIC, "", CLEAN])
    assert scores.shape == (4,) and scores.dtype == np.float64
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[1] > 0.5 > scores[0] and scores[0] == scores[3]
    assert scorer([]).shape == (0,)
    # the 2024 original's defect: a bare string would be scored per character
    with pytest.raises(TypeError, match="list of texts"):
        scorer(TOXIC)


def test_classifier_scorer_batches_in_original_order(classifier_dir):
    scorer = toxicity.load_scorer(str(classifier_dir), device="cpu", batch_size=2)
    texts = [TOXIC, CLEAN, "a", CLEAN + " " + CLEAN, TOXIC]
    scores = scorer(texts)
    one_by_one = np.array([scorer([t])[0] for t in texts])
    np.testing.assert_allclose(scores, one_by_one, rtol=1e-5)
    assert ((scores > 0) & (scores < 1)).all() and scores[0] == pytest.approx(scores[4])
    assert scorer.toxic_label == "hate"


def test_classifier_without_the_label_names_the_labels(classifier_dir):
    with pytest.raises(toxicity.ScorerError, match="nothate"):
        toxicity.HateSpeechScorer(name=str(classifier_dir), toxic_label="toxic")
    auto = toxicity.HateSpeechScorer(name=str(classifier_dir), toxic_label=None)
    assert auto.toxic_label == "hate"


def test_unloadable_scorers_name_the_path_or_package(monkeypatch, tmp_path):
    with pytest.raises(toxicity.ScorerError, match="/nonexistent/classifier"):
        toxicity.load_scorer("/nonexistent/classifier")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(toxicity.ScorerError, match="not-a-model"):
        toxicity.load_scorer(str(tmp_path / "not-a-model"))
    with pytest.raises(toxicity.ScorerError, match="no scorer"):
        toxicity.load_scorers([])
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # the package is not installed
    with pytest.raises(toxicity.ScorerError, match="alt-profanity-check"):
        toxicity.load_scorer("profanity-check")


def test_measurement_module_offline(classifier_dir):
    texts = [CLEAN, TOXIC, CLEAN]
    expected = toxicity.load_scorer(toxicity.OFFLINE_SCORER)(texts)
    measure = toxicity.load_measurement("profanity-check")
    out = measure.compute(predictions=texts)
    np.testing.assert_allclose(out["toxicity"], expected)
    assert measure.compute(predictions=texts, aggregation="maximum") == {"max_toxicity": pytest.approx(expected[1])}
    assert measure.compute(predictions=texts, aggregation="ratio") == {"toxicity_ratio": pytest.approx(1 / 3)}
    assert measure.compute(predictions=texts, aggregation="ratio", threshold=0.0) == {"toxicity_ratio": 1.0}
    # a classifier by path, as config name or as a keyword; the same numbers as the scorer
    by_path = toxicity.load_scorer(str(classifier_dir))(texts)
    np.testing.assert_allclose(
        toxicity.load_measurement(str(classifier_dir)).compute(predictions=texts)["toxicity"], by_path, rtol=1e-5
    )
    np.testing.assert_allclose(
        measure.compute(predictions=texts, scorer=str(classifier_dir))["toxicity"], by_path, rtol=1e-5
    )
    with pytest.raises(ValueError, match="aggregation"):
        measure.compute(predictions=texts, aggregation="mean")


def test_measurement_default_is_the_hub_classifier_and_says_so_offline():
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(toxicity.HATE_SPEECH_SCORER, "config.json"), str):
        pytest.skip("the hub classifier is in the local cache: it would load")
    measure = toxicity.load_measurement()
    with pytest.raises(toxicity.ScorerError, match="roberta-hate-speech-dynabench-r4-target"):
        measure.compute(predictions=[CLEAN])
