"""Toxicity scorers, offline."""

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


# --- the classifier scorer is a transformers pipeline; the hand-computed softmax stays as the reference ------------


def _hand_probabilities(path, texts, label="hate"):
    """P(label) the way the scorer computed it before it used a pipeline: tokenize, forward, softmax."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    index = {v.lower(): int(k) for k, v in model.config.id2label.items()}[label]
    enc = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits.float().softmax(-1)[:, index].numpy()


def test_classifier_scorer_is_the_pipeline_and_equals_the_hand_softmax(classifier_dir):
    from transformers import TextClassificationPipeline

    scorer = toxicity.load_scorer(str(classifier_dir), device="cpu", batch_size=3)
    assert isinstance(scorer._pipeline, TextClassificationPipeline)
    texts = [TOXIC, CLEAN, "", "a", CLEAN + " " + TOXIC, TOXIC]
    np.testing.assert_allclose(scorer(texts), _hand_probabilities(classifier_dir, texts), rtol=0, atol=1e-5)
    assert scorer([]).shape == (0,)


# --- the offline judges: the zoo's lexicon (exact in the synthetic world) and HateSonar ------------------------------


@pytest.fixture(scope="module")
def lexicon_file(tmp_path_factory):
    """The lexicon as the zoo writes it (the same function), without building the zoo."""
    import json

    from detox_sft_dev.zoo import corpus

    path = tmp_path_factory.mktemp("lexicon") / "lexicon.json"
    path.write_text(json.dumps({"toxic_words": corpus.toxic_lexicon()}))
    return path


def test_lexicon_scorer_is_exact_on_the_corpus_sentences(lexicon_file):
    from detox_sft_dev.zoo import corpus

    scorer = toxicity.load_scorer(str(lexicon_file))
    assert isinstance(scorer, toxicity.LexiconScorer) and scorer.name == str(lexicon_file)
    fillers = [w for words in corpus.TOXIC_WORDS.values() for w in words]
    benign = [w for words in corpus.BENIGN_WORDS.values() for w in words]
    assert scorer(fillers).all() and not scorer(benign).any()  # every toxic filler holds a lexicon word
    for seed, n in ((0, 3000), (1234, 2000)):  # 1234: the zoo's own seed
        sentences = corpus.generate_sentences(n, seed)
        toxic = np.array([s.toxic_prompt or s.toxic_continuation for s in sentences])
        assert 0.3 < toxic.mean() < 0.7  # both kinds, many of each
        # every toxic sentence scores 1, every benign one 0; the same for continuations and prompts alone
        np.testing.assert_array_equal(scorer([s.text for s in sentences]), toxic.astype(float))
        np.testing.assert_array_equal(
            scorer([s.continuation for s in sentences]), [s.toxic_continuation for s in sentences]
        )
        np.testing.assert_array_equal(scorer([s.prompt for s in sentences]), [s.toxic_prompt for s in sentences])
    assert set(np.unique(scorer([s.text for s in corpus.generate_sentences(50, 9)]))) <= {0.0, 1.0}


def test_lexicon_scorer_matches_whole_words_in_any_case(lexicon_file):
    scorer = toxicity.load_scorer(str(lexicon_file))
    hits = ["IDIOT!", "you idiot.", "Dumbass, stop", "what the hell", "Holy shit, no", "a jerk's move", "it stinks"]
    misses = ["idiots", "foolish", "hello", "the shell", "dumbassery", "crappy", "", "what the", "would like this"]
    np.testing.assert_array_equal(scorer(hits + misses), [1.0] * len(hits) + [0.0] * len(misses))
    with pytest.raises(TypeError, match="list of texts"):
        scorer("idiot")


def test_lexicon_scorer_refuses_a_bad_file(tmp_path):
    with pytest.raises(toxicity.ScorerError, match="cannot read the lexicon"):
        toxicity.LexiconScorer(path=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"words": ["x"]}')
    with pytest.raises(toxicity.ScorerError, match="toxic_words"):
        toxicity.load_scorer(str(tmp_path / "bad.json"))


def test_zoo_lexicon_resolves_to_the_generator_lexicon(zoo):
    import json

    from detox_sft_dev.zoo import corpus

    scorer = toxicity.load_scorer(toxicity.LEXICON_SCORER)
    assert scorer.name == "zoo:lexicon" and scorer.words == tuple(corpus.toxic_lexicon())
    assert json.loads(zoo.lexicon.read_text()) == {"toxic_words": corpus.toxic_lexicon()}


def test_hatesonar_scores_a_list_in_order_offline():
    scorer = toxicity.load_scorer(toxicity.HATESONAR_SCORER)
    scores = scorer([CLEAN, TOXIC, "", CLEAN])
    assert scores.shape == (4,) and scores.dtype == np.float64
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[1] > 0.9 and scores[0] < 0.5 and scores[0] == scores[3]
    assert scorer([]).shape == (0,)
    with pytest.raises(TypeError, match="list of texts"):
        scorer(TOXIC)


def test_hatesonar_missing_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(toxicity.ScorerError, match="pip install hatesonar"):
        toxicity.load_scorer("hatesonar")


# --- independence: the headline judge never gated the data, never built or chose the corpus ----------------------


def _corpus_scorer(dataset: str) -> str | None:
    """Who computed a dataset's toxicity metadata: Perspective API for RTP; for the zoo its CORPUS_SCORER, which also
    chose the toxic slot words."""
    from detox_sft_dev.zoo import corpus

    if dataset.startswith("zoo:"):
        return corpus.CORPUS_SCORER
    return {"allenai/real-toxicity-prompts": "perspective-api"}.get(dataset)


@pytest.mark.parametrize("name", ["offline", "tutorial"])
def test_headline_scorer_is_neither_the_gate_nor_the_corpus_builder(name):
    from detox_sft.config import load_recipe, recipe_names

    assert name in recipe_names()
    recipe = load_recipe(name)
    headline = recipe.evaluation.scorers[0]
    assert headline != recipe.rephrase.scorer, "the gate scorer would judge its own rewrites"
    builders = {_corpus_scorer(recipe.data.train_dataset), _corpus_scorer(recipe.data.eval_dataset)}
    assert headline not in builders, f"{headline} built or chose the corpus"
    assert recipe.rephrase.scorer in recipe.evaluation.scorers[1:]  # the gate's own view is still reported
    assert len(set(recipe.evaluation.scorers)) == len(recipe.evaluation.scorers)


def test_the_zoo_corpus_toxicity_is_the_corpus_scorer():
    from detox_sft_dev.zoo import corpus

    records = corpus.make_rtp_records(40, seed=5)
    scores = toxicity.load_scorer(corpus.CORPUS_SCORER)([r["continuation"]["text"] for r in records])
    np.testing.assert_allclose([r["continuation"]["toxicity"] for r in records], scores, atol=1e-6)
