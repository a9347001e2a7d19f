"""TMaRCo rephrasing: parity of the batched engine with TrustyAI's, gating, cache/resume, bad input, CLI, helpers."""

from __future__ import annotations

import dataclasses
import json
import random
import warnings

import numpy as np
import pytest

from detox_sft.config import RephraseConfig
from detox_sft.rephrase.engines import identity

PARITY_SENTENCES = 200


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: per-op overhead dominates and two threads on a shared 2-core box thrash; same for both engines
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(trio, **kw) -> RephraseConfig:
    values = dict(
        base_model=str(trio.bart_base),
        expert=str(trio.expert),
        anti_expert=str(trio.anti_expert),
        scorer="profanity-check",
        device="cpu",
        batch_size=64,
    )
    values.update(kw)
    return RephraseConfig(**values)


@pytest.fixture(scope="module")
def zoo_tmarco(zoo):
    """TrustyAI's TMaRCo on the offline zoo's BART base / expert / anti-expert (fp32, CPU)."""
    from detox_sft.compat import load_tmarco

    cfg = _cfg(zoo)
    return cfg, load_tmarco(
        cfg.base_model, cfg.expert, cfg.anti_expert, device="cpu", expert_weights=list(cfg.expert_weights)
    )


def _corpus_sentences(zoo, n: int) -> list[str]:
    """Prompts and continuations of the zoo's RTP-like corpus, toxic ones first (they get masked and rewritten)."""
    with open(zoo.rtp, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    texts = []
    for row in rows:
        for part in ("prompt", "continuation"):
            value = row.get(part) or {}
            text = value.get("text") if isinstance(value, dict) else value
            if text and text.strip():
                texts.append((-(value.get("toxicity") or 0.0) if isinstance(value, dict) else 0.0, text))
    texts.sort(key=lambda x: x[0])
    chosen = [t for _, t in texts[: n // 2]] + [t for _, t in texts[n // 2 :: max(1, len(texts) // n)]]
    return list(dict.fromkeys(chosen))[:n]


def _compare(ref_out, bat_out):
    """Indices where the engines differ, among the sentences TrustyAI's TMaRCo can process (it raises on a few)."""
    return [
        i
        for i, (a, b) in enumerate(zip(ref_out, bat_out, strict=True))
        if a.error is None and (a.masked, a.rephrased, a.changed) != (b.masked, b.rephrased, b.changed)
    ]


def test_parity_batched_equals_trustyai_on_zoo(zoo, zoo_tmarco):
    from detox_sft.rephrase import BatchedEngine, ReferenceEngine

    cfg, tmarco = zoo_tmarco
    texts = _corpus_sentences(zoo, PARITY_SENTENCES)
    assert len(texts) >= PARITY_SENTENCES
    reference = ReferenceEngine(tmarco, cfg).rephrase(texts)
    batched = BatchedEngine.from_tmarco(tmarco, cfg, max_batch_tokens=2048).rephrase(texts)
    changed = sum(o.changed for o in reference)
    assert changed >= len(texts) // 10, f"only {changed} sentences rewritten: the parity set does not exercise rephrase"
    assert sum(o.error is not None for o in reference) <= len(texts) // 100
    assert not any(o.error for o in batched)
    diffs = _compare(reference, batched)
    # a difference is allowed only at a numerical near-tie, and on at most 1% of the sentences
    assert len(diffs) <= len(texts) // 100, [(texts[i], reference[i], batched[i]) for i in diffs]
    for i in diffs:
        assert batched[i].min_gap < 1e-4 or batched[i].min_margin < 1e-4, (texts[i], reference[i], batched[i])


@pytest.mark.parametrize("combine_original", [True, False])
def test_parity_on_tiny_random_bart_with_many_masks(tiny_bart, combine_original):
    # random weights, a low threshold: most tokens masked, long fill chains, emoji / CJK byte pieces, markup
    from detox_sft.compat import load_tmarco
    from detox_sft.rephrase import BatchedEngine, ReferenceEngine

    cfg = _cfg(tiny_bart, mask_threshold=1.02, combine_original=combine_original)
    tmarco = load_tmarco(cfg.base_model, cfg.expert, cfg.anti_expert, expert_weights=list(cfg.expert_weights))
    words = [
        "you",
        "are",
        "a",
        "stupid",
        "idiot",
        "and",
        "what",
        "lovely",
        "day",
        "it",
        "is",
        "the",
        "quick",
        "fox",
        "I",
        "think",
        "this",
        "article",
        "thanks",
    ]
    rng = random.Random(1)
    texts = [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 18))) + rng.choice(["", ".", "!"]) for _ in range(36)
    ]
    texts += ["😀 you idiot 你好", "<b>shut up</b> & read", "x", "Ça va, idiot?", "<mask> you"]
    reference = ReferenceEngine(tmarco, cfg).rephrase(texts)
    batched = BatchedEngine.from_tmarco(tmarco, cfg, max_batch_tokens=512).rephrase(texts)
    assert sum(o.changed for o in reference) >= len(texts) // 2
    assert sum(o.error is not None for o in reference) <= 2  # TMaRCo's own IndexError on some emoji / CJK pieces
    assert not any(o.error for o in batched)  # where the batched engine reads the last base position instead
    diffs = _compare(reference, batched)
    assert all(batched[i].min_gap < 1e-4 or batched[i].min_margin < 1e-4 for i in diffs)
    assert len(diffs) <= 1


def test_jensenshannon_torch_matches_scipy():
    import torch
    from scipy.spatial.distance import jensenshannon

    from detox_sft.rephrase.engines import _jensenshannon_torch

    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 300, generator=gen) * 3, dim=1)
    q = torch.softmax(torch.randn(5, 300, generator=gen) * 3, dim=1)
    ours = _jensenshannon_torch(p, q).numpy()
    np.testing.assert_allclose(ours, jensenshannon(p.numpy(), q.numpy(), axis=1), rtol=1e-5)


class CountingEngine:
    """Wraps an engine; counts sentences; optionally raises after some batches (an interrupted run)."""

    def __init__(self, inner, fail_after_batches=None):
        self.inner, self.name, self.calls, self.batches = inner, inner.name, 0, 0
        self.fail_after_batches = fail_after_batches

    def rephrase(self, texts):
        if self.fail_after_batches is not None and self.batches >= self.fail_after_batches:
            raise KeyboardInterrupt
        self.batches += 1
        self.calls += len(texts)
        return self.inner.rephrase(texts)

    def identity(self):
        return identity(self.inner.cfg, self.inner)


def _stub_scorer(texts):
    # deterministic gate for cache/bad-input tests: "toxic" when a swear word is present
    bad = ("idiot", "stupid", "damn", "hell", "shut")
    return np.array([0.9 if any(b in t.lower() for b in bad) else 0.1 for t in texts])


@pytest.fixture(scope="module")
def zoo_engine(zoo_tmarco):
    from detox_sft.rephrase import BatchedEngine

    cfg, tmarco = zoo_tmarco
    return cfg, BatchedEngine.from_tmarco(tmarco, cfg)


def test_gate_with_recipe_scorer_counts_and_fields(zoo, zoo_engine):
    from detox_sft.rephrase import ADDED_FIELDS, rephrase_dataset
    from detox_sft.toxicity import load_scorer

    cfg, engine = zoo_engine
    texts = _corpus_sentences(zoo, 60)
    records = [{"id": i, "text": t} for i, t in enumerate(texts)]
    result = rephrase_dataset(records, cfg, engine=engine, progress=False)
    tox = load_scorer("profanity-check")(texts)
    gated = int((tox >= cfg.gate_threshold).sum())
    s = result.summary
    assert 0 < gated < len(texts)
    assert (s.total, s.scored, s.gated) == (len(texts), len(texts), gated)
    assert s.rephrased + s.unchanged + s.errors == gated and s.rephrased > 0
    for rec, t, value in zip(result.records, texts, tox, strict=True):
        assert set(ADDED_FIELDS) <= set(rec) and rec["text"] == t
        assert rec["toxicity_before"] == pytest.approx(value)
        if value < cfg.gate_threshold:  # below the gate: passes through untouched
            assert (rec["rephrase_status"], rec["rephrased_text"], rec["rephrased"]) == ("below_gate", t, False)
        elif rec["rephrased"]:
            assert rec["rephrased_text"] != t and "<mask>" in rec["masked_text"]
    assert s.gated_toxicity_after < s.gated_toxicity_before  # TMaRCo with the zoo's experts does detoxify


def test_cache_resume_after_interruption_recomputes_nothing(zoo, zoo_tmarco, zoo_engine, tmp_path):
    from detox_sft.rephrase import BatchedEngine, rephrase_dataset
    from detox_sft.toxicity import load_scorer

    cfg, engine = zoo_engine
    cfg = dataclasses.replace(cfg, batch_size=3)
    scorer = load_scorer(cfg.scorer)
    texts = _corpus_sentences(zoo, 80)
    records = [{"text": t} for t in texts]
    gated = len({t for t, v in zip(texts, scorer(texts), strict=True) if v >= cfg.gate_threshold})
    assert gated > 6
    cache = tmp_path / "cache"
    interrupted = CountingEngine(engine, fail_after_batches=2)
    with pytest.raises(KeyboardInterrupt):
        rephrase_dataset(records, cfg, cache_dir=cache, engine=interrupted, scorer=scorer, progress=False)
    assert interrupted.calls == 6
    resumed = CountingEngine(engine)
    first = rephrase_dataset(records, cfg, cache_dir=cache, engine=resumed, scorer=scorer, progress=False)
    assert resumed.calls == gated - 6 and first.summary.cached == 6  # only the rest is computed
    again = CountingEngine(engine)
    second = rephrase_dataset(records, cfg, cache_dir=cache, engine=again, scorer=scorer, progress=False)
    assert again.calls == 0 and second.summary.computed == 0
    fresh = rephrase_dataset(records, cfg, engine=CountingEngine(engine), scorer=scorer, progress=False)
    assert first.records == second.records == fresh.records and first.summary.rephrased > 0
    # another setting is another key: computed again
    other_cfg = dataclasses.replace(cfg, mask_threshold=1.5)
    other = CountingEngine(BatchedEngine.from_tmarco(zoo_tmarco[1], other_cfg))
    rephrase_dataset(records, other_cfg, cache_dir=cache, engine=other, scorer=scorer, progress=False)
    assert other.calls == gated


def test_the_progress_bar_counts_the_gated_samples(zoo_engine, capsys):
    """The bar ends at the summary's gated count (records sent to TMaRCo), not at the texts scored on the way (the
    gate scores every text, the rewrites are scored again): a repeated text counts once per record."""
    import re

    from detox_sft.rephrase import rephrase_dataset

    cfg, engine = zoo_engine
    texts = ["you stupid idiot", "you stupid idiot", "thanks a lot", "shut up, damn it", "a nice day"]
    result = rephrase_dataset([{"text": t} for t in texts], cfg, engine=engine, scorer=_stub_scorer, progress=True)
    assert result.summary.gated == 3 and result.summary.computed == 2
    bars = re.findall(r"(\w+): +(\d+)%\|[^|]*\| (\d+)/(\d+) \[[^\]]*sample/s", capsys.readouterr().err)
    assert bars[-1] == ("rephrase", "100", "3", "3")


def test_cached_rerun_does_not_load_models(zoo, tmp_path, monkeypatch):
    from detox_sft import rephrase

    cfg = _cfg(zoo)
    records = [{"text": "you stupid idiot, shut up"}, {"text": "thanks for the help"}]
    first = rephrase.rephrase_dataset(records, cfg, cache_dir=tmp_path, progress=False, scorer=_stub_scorer)
    assert first.summary.computed == 1
    monkeypatch.setattr(rephrase.dataset, "load_engine", lambda *a, **k: pytest.fail("models loaded on a cached rerun"))
    second = rephrase.rephrase_dataset(records, cfg, cache_dir=tmp_path, progress=False, scorer=_stub_scorer)
    assert second.records == first.records and second.summary.cached == 1


def test_cache_key_covers_the_models_an_injected_engine_holds(zoo, zoo_tmarco, zoo_engine, tiny_bart, tmp_path):
    from detox_sft.compat import load_tmarco
    from detox_sft.rephrase import BatchedEngine, rephrase_dataset

    cfg, engine = zoo_engine  # holds the recipe's (the zoo's) models
    # an engine loaded from the recipe's models keys like the recipe does before loading anything
    assert identity(cfg, engine)["models"] == identity(cfg, "batched")["models"]
    tiny = load_tmarco(str(tiny_bart.bart_base), str(tiny_bart.expert), str(tiny_bart.anti_expert))
    other = BatchedEngine.from_tmarco(tiny, cfg)  # the same recipe, other models
    mine, theirs = identity(cfg, engine), identity(cfg, other)
    assert mine["settings"] == theirs["settings"] and mine["models"] != theirs["models"]

    records = [{"text": "you stupid idiot, shut up"}, {"text": "what a damn stupid article"}, {"text": "thanks"}]
    cache = tmp_path / "cache"
    first = CountingEngine(engine)
    rephrase_dataset(records, cfg, cache_dir=cache, engine=first, scorer=_stub_scorer, progress=False)
    assert first.calls == 2
    # the other models do not reuse the recipe models' outputs: computed, and cached under their own key
    counted = CountingEngine(other)
    second = rephrase_dataset(records, cfg, cache_dir=cache, engine=counted, scorer=_stub_scorer, progress=False)
    assert counted.calls == 2 and (second.summary.cached, second.summary.computed) == (0, 2)
    # the same engine again: everything from the cache, the same records
    again = CountingEngine(other)
    third = rephrase_dataset(records, cfg, cache_dir=cache, engine=again, scorer=_stub_scorer, progress=False)
    assert again.calls == 0 and third.summary.cached == 2 and third.records == second.records


def test_loaded_identity_of_a_model_built_in_memory_is_its_content():
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from detox_sft.rephrase.engines import _loaded_identity

    sizes = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32)
    config = BartConfig(vocab_size=64, max_position_embeddings=32, **sizes)
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config)  # nothing on disk says what it holds
    before = _loaded_identity(model)
    assert before == _loaded_identity(model) and before["ref"] == ""
    torch.manual_seed(1)
    assert _loaded_identity(BartForConditionalGeneration(config)) != before  # same config, other weights
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert _loaded_identity(model) != before


BAD_INPUTS = {
    "empty": "",
    "whitespace": "   \n\t ",
    "one_char": "x",
    "non_english": "Du bist ein dummer Idiot, halt die Klappe!",
    "cjk": "你是个白痴 stupid idiot 馬鹿",
    "emoji": "you stupid idiot 😡🤬👎",
    "markup": "<b>shut up</b> <a href='x'>idiot</a> &amp; <s>damn</s>",
    "literal_mask": "<mask> you stupid idiot <mask>",
    "long": " ".join(["you stupid idiot, shut up and read the article again"] * 40),
}


def test_bad_input_never_crashes(zoo, zoo_engine):
    from detox_sft.rephrase import rephrase_dataset

    cfg, engine = zoo_engine
    records = [{"key": k, "text": v} for k, v in BAD_INPUTS.items()]
    records += [{"key": "missing"}, {"key": "null", "text": None}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rephrase_dataset(records, cfg, engine=engine, scorer=_stub_scorer, progress=False)
    out = {r["key"]: r for r in result.records}
    assert [r["key"] for r in result.records] == [r["key"] for r in records]
    for key, text in BAD_INPUTS.items():
        assert out[key]["text"] == text and isinstance(out[key]["rephrased_text"], str)
        assert out[key]["rephrase_status"] != "error", out[key]
    assert out["empty"]["rephrase_status"] == out["whitespace"]["rephrase_status"] == "empty"
    assert out["one_char"]["rephrase_status"] == "below_gate"
    for key in ("missing", "null"):
        assert out[key]["rephrase_status"] == "missing" and out[key]["toxicity_before"] is None
    assert "text" not in out["missing"]
    assert out["long"]["rephrase_truncated"] is True and result.summary.truncated == 1
    assert any("truncated" in str(w.message) for w in caught)
    assert len(out["long"]["rephrased_text"]) < len(BAD_INPUTS["long"])
    assert result.summary.missing == 2 and result.summary.empty == 2


def test_reference_engine_handles_bad_input_too(zoo_tmarco):
    from detox_sft.rephrase import ReferenceEngine

    cfg, tmarco = zoo_tmarco
    texts = [v for k, v in BAD_INPUTS.items() if k not in ("empty", "whitespace")]
    outs = ReferenceEngine(tmarco, cfg).rephrase(texts)
    assert len(outs) == len(texts) and not any(o.error for o in outs)
    assert outs[-1].truncated


def _cli(argv):
    from detox_sft.cli import main

    return main(["rephrase", *argv])


def test_cli_malformed_jsonl_names_the_line_and_writes_nothing(tmp_path, capsys, zoo):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n\n{"text": "broken"\n{"text": "after"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    rc = _cli(["--recipe", "offline", "--input", str(src), "--output", str(out), "--no-progress"])
    assert rc == 2
    assert "line 3" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_cli_writes_every_record_in_order_atomically(zoo, tmp_path):
    from detox_sft.data import read_jsonl

    texts = _corpus_sentences(zoo, 30) + [""]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"n": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    out = tmp_path / "sub" / "out.jsonl"
    argv = [
        "--recipe",
        "offline",
        "--input",
        str(src),
        "--output",
        str(out),
        "--cache-dir",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    assert _cli(argv) == 0
    rows = read_jsonl(out)
    assert [r["n"] for r in rows] == list(range(len(texts))) and [r["text"] for r in rows] == texts
    assert any(r["rephrased"] for r in rows)
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temp file left
    assert _cli([*argv, "--engine", "trustyai"]) == 0  # the reference engine through the CLI
    assert [r["text"] for r in read_jsonl(out)] == texts


def test_write_jsonl_atomic_leaves_old_file_on_failure(tmp_path):
    from detox_sft.data import write_jsonl_atomic

    path = tmp_path / "out.jsonl"
    write_jsonl_atomic([{"a": 1}], path)

    def broken():
        yield {"a": 2}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(broken(), path)
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_detoxify_training_set_keeps_prompts_and_format(offline_recipe, zoo):
    from detox_sft.data import load_train_dataset, read_jsonl
    from detox_sft.rephrase import detoxify_training_set, highlight_html, plot_toxicity_histogram

    offline_recipe.data.num_train_samples = 120
    train = load_train_dataset(offline_recipe.data, offline_recipe.seed)["train"]
    detox, summary = detoxify_training_set(offline_recipe, train, progress=False)
    raw_rows = read_jsonl(offline_recipe.run_path / "data" / "train_raw.jsonl")
    detox_rows = read_jsonl(offline_recipe.run_path / "data" / "train_detox.jsonl")
    assert raw_rows == train.to_list()
    assert len(detox_rows) == len(raw_rows) == len(detox) and detox.column_names == train.column_names
    assert summary.total == len(train) and summary.rephrased > 0
    # the summary counts what the training set holds: every gated sample is rephrased, unchanged or failed
    assert summary.rephrased == sum(r["rephrased"] for r in detox_rows)
    assert summary.gated == summary.rephrased + summary.unchanged + summary.errors
    kept = [r for r in detox_rows if r["rephrase_status"] in ("empty_continuation", "unchanged_continuation")]
    assert all(r["toxicity_after"] == r["toxicity_before"] for r in kept)
    for raw, new, row in zip(raw_rows, detox_rows, detox.to_list(), strict=True):
        assert new["prompt"] == raw["prompt"] and row["prompt"] == raw["prompt"]
        assert new["text"].startswith(f"Prompt: {raw['prompt'].strip()}\nContinuation: ")
        assert new["sample"] == f"{raw['prompt'].strip()} {raw['continuation'].strip()}"  # rephrased in context
        if new["rephrased"]:
            assert new["continuation"] != raw["continuation"] and new["continuation"].strip()
            # the kept continuation is the part of the rephrased sample after the prompt
            assert new["rephrased_text"].endswith(new["continuation"])
            assert new["original_continuation"] == raw["continuation"]
        else:
            assert (new["continuation"], new["text"]) == (raw["continuation"], raw["text"])
    html_table = highlight_html(detox_rows, n=5, field="sample")
    assert html_table.count("<tr>") == 6 and "<mark" in html_table and html_table._repr_html_() == html_table
    png = offline_recipe.run_path / "figures" / "rephrase_toxicity.png"
    fig = plot_toxicity_histogram(detox_rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.axes[0].get_xlabel().startswith("toxicity")


@pytest.mark.parametrize(
    ("rephrased", "expected"),
    [
        ("the host is a genius and nobody cares.", "genius and nobody cares."),  # word after the prompt rewritten
        ("the guy is a genius and nobody cares.", "genius and nobody cares."),  # prompt word rewritten too
        ("the host is a great, genius and nobody cares.", "great, genius and nobody cares."),
        ("the host is a", ""),  # nothing left after the prompt
    ],
)
def test_continuation_of_splits_the_rephrased_sample_at_the_prompt(rephrased, expected):
    from detox_sft.rephrase.dataset import continuation_of

    original = "the host is a idiot and nobody cares."
    assert continuation_of(original, rephrased, len("the host is a")) == expected


def test_highlight_marks_exactly_the_masked_words():
    from detox_sft.rephrase.display import _highlight_masked

    out = _highlight_masked("you stupid idiot, go", "you<mask><mask>, go")
    assert out == 'you<mark style="background:#f8b4b4"> stupid idiot</mark>, go'


def test_decoder_groups_cover_every_query_once_and_stop_at_the_last_needed_position():
    import torch

    from detox_sft.rephrase.engines import _decoder_groups

    # 7 rows, one with two queries; positions spread so that groups differ in how far they decode
    q_row = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2])
    q_pos = torch.tensor([9, 1, 4, 2, 7, 3, 12, 6])
    need = {0: 9, 1: 1, 2: 6, 3: 2, 4: 7, 5: 3, 6: 12}

    def check(groups, max_tokens):
        seen = []
        for rows, queries, local, cut in groups:
            assert len(rows) * cut <= max_tokens
            for q, lr in zip(queries.tolist(), local.tolist(), strict=True):
                assert rows[lr].item() == q_row[q].item()  # the local index points at the query's row
                assert q_pos[q].item() < cut  # the decoder runs far enough for every query of the group
            assert cut == max(need[r] for r in rows.tolist()) + 1  # and no further
            seen += queries.tolist()
        assert sorted(seen) == list(range(len(q_row)))
        return [(sorted(g[0].tolist()), g[3]) for g in groups]

    # calls are free: every row decodes exactly as far as it needs (one call per distinct need)
    free = check(_decoder_groups(q_row, q_pos, 0, 1000, "cpu"), 1000)
    assert len(free) == 7 and sum(len(r) * c for r, c in free) == sum(v + 1 for v in need.values())
    # calls are dear: one call for all rows
    assert check(_decoder_groups(q_row, q_pos, 1000, 1000, "cpu"), 1000) == [(list(range(7)), 13)]
    # the memory cap splits that call: at most 26 decoded positions per call
    capped = check(_decoder_groups(q_row, q_pos, 1000, 26, "cpu"), 26)
    assert len(capped) > 1


def test_decoder_groups_find_the_cheapest_split():
    import itertools
    import random

    import torch

    from detox_sft.rephrase.engines import _decoder_groups

    rng = random.Random(0)
    for _ in range(20):
        positions = [rng.randrange(1, 30) for _ in range(rng.randrange(1, 9))]
        call_tokens = rng.choice([0, 5, 20, 80])
        groups = _decoder_groups(torch.arange(len(positions)), torch.tensor(positions), call_tokens, 10_000, "cpu")
        got = sum(call_tokens + len(rows) * cut for rows, _, _, cut in groups)
        # brute force over every split of the sorted rows into consecutive groups
        needs = sorted(positions)
        best = min(
            sum(call_tokens + (b - a) * (needs[b - 1] + 1) for a, b in itertools.pairwise([0, *cuts, len(needs)]))
            for k in range(len(needs))
            for cuts in itertools.combinations(range(1, len(needs)), k)
        )
        assert got == best


def test_engines_time_their_own_steps(zoo, zoo_tmarco):
    import time

    from detox_sft.rephrase import BatchedEngine, ReferenceEngine

    cfg, tmarco = zoo_tmarco
    texts = _corpus_sentences(zoo, 4)
    for engine in (BatchedEngine.from_tmarco(tmarco, cfg), ReferenceEngine(tmarco, cfg)):
        start = time.perf_counter()
        engine.rephrase(texts)
        wall = time.perf_counter() - start
        first = dict(engine.timings)
        assert first["score"] > 0 and first["rephrase"] > 0  # both steps ran and were timed
        assert first["score"] + first["rephrase"] <= wall  # within the pass, not beside it
        engine.rephrase(texts)
        assert engine.timings["score"] > first["score"] and engine.timings["rephrase"] > first["rephrase"]


def test_cheapest_split_covers_rows_in_order_within_the_cap():
    import random

    from detox_sft.rephrase.engines import _cheapest_split

    rng = random.Random(1)
    assert _cheapest_split([], 128, 100) == []
    for _ in range(50):
        sizes = sorted(rng.randrange(1, 60) for _ in range(rng.randrange(1, 40)))
        cap = rng.choice([1, 50, 200, 10_000])
        calls = _cheapest_split(sizes, rng.choice([0, 16, 128, 4096]), cap)
        assert [i for a, b in calls for i in range(a, b)] == list(range(len(sizes)))  # every row once, in order
        for a, b in calls:
            assert b - a == 1 or (b - a) * sizes[b - 1] <= cap  # padded to its last (longest) row
    # free calls: no padding at all; dear calls: a single call when the cap allows it
    assert all(len({sizes_ for sizes_ in [5, 5, 7, 9][a:b]}) == 1 for a, b in _cheapest_split([5, 5, 7, 9], 0, 100))
    assert _cheapest_split([5, 5, 7, 9], 10_000, 100) == [(0, 4)]


def test_rephrase_dataset_refuses_a_datasetdict_and_names_its_splits():
    from datasets import Dataset, DatasetDict

    from detox_sft.rephrase import RephraseError, rephrase_dataset

    splits = DatasetDict({"train": Dataset.from_dict({"text": ["you idiot"]})})
    with pytest.raises(RephraseError, match=r"got a DatasetDict \(splits: \['train'\]\).*dataset\['train'\]"):
        rephrase_dataset(splits, RephraseConfig(), scorer=_stub_scorer, progress=False)


def test_detoxify_training_set_takes_a_datasetdicts_train_split(offline_recipe):
    from datasets import Dataset, DatasetDict

    from detox_sft.rephrase import RephraseError, detoxify_training_set

    with pytest.raises(RephraseError, match=r"no 'train' split \(splits: \['test'\]\).*dataset\['train'\]"):
        detoxify_training_set(offline_recipe, DatasetDict({"test": Dataset.from_dict({"text": ["a"]})}))
    # the train split is the one checked: its missing columns are named (before the fix the dict's keys were)
    splits = DatasetDict({"train": Dataset.from_dict({"text": ["a"], "prompt": ["p"]})})
    with pytest.raises(RephraseError, match=r"lacks column\(s\) \['continuation'\]"):
        detoxify_training_set(offline_recipe, splits, progress=False)


def test_rephrasing_never_changes_torchs_thread_count(tiny_bart):
    # torch's thread count is process-wide: library code must not touch it while other threads may use torch
    import ast
    import inspect
    import threading

    import torch

    from detox_sft.compat import load_tmarco
    from detox_sft.rephrase import BatchedEngine, dataset, engines

    for module in (engines, dataset):
        calls = [
            n for n in ast.walk(ast.parse(inspect.getsource(module))) if getattr(n, "attr", None) == "set_num_threads"
        ]
        assert not calls, f"{module.__name__} calls torch.set_num_threads"
    cfg = _cfg(tiny_bart, mask_threshold=1.02)
    tmarco = load_tmarco(cfg.base_model, cfg.expert, cfg.anti_expert, expert_weights=list(cfg.expert_weights))
    engine = BatchedEngine.from_tmarco(tmarco, cfg)
    before = torch.get_num_threads()
    seen = []
    real = engine._logits_at

    def spy(model, rows, queries):
        seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        return real(model, rows, queries)

    engine._logits_at = spy
    outs = engine.rephrase(["you are a stupid idiot and what lovely day", "the quick fox thinks"])
    assert any(o.changed for o in outs) and seen
    assert set(seen) == {(True, before)} and torch.get_num_threads() == before


def _api_break(*args, **kwargs):
    raise TypeError("score() got an unexpected keyword argument 'texts'")  # what a trustyai upgrade can do


def _exploding(*args, **kwargs):
    raise RuntimeError("expert exploded")


def test_an_engine_failure_fails_the_step_with_the_first_error(tiny_bart, tmp_path):
    from detox_sft.compat import load_tmarco
    from detox_sft.rephrase import BatchedEngine, ReferenceEngine, RephraseError, rephrase_dataset

    cfg = _cfg(tiny_bart, mask_threshold=1.02)
    tmarco = load_tmarco(cfg.base_model, cfg.expert, cfg.anti_expert, expert_weights=list(cfg.expert_weights))
    records = [{"text": "you stupid idiot, shut up"}, {"text": "damn this hell"}, {"text": "thanks"}]
    reference = ReferenceEngine(tmarco, cfg)
    tmarco.score = _api_break  # this test's own TMaRCo
    batched = BatchedEngine.from_tmarco(tmarco, cfg)
    batched._logits_at = _exploding
    for engine, cause in ((reference, TypeError), (batched, RuntimeError)):
        with pytest.raises(RephraseError, match="keep_going") as caught:
            rephrase_dataset(records, cfg, engine=engine, scorer=_stub_scorer, cache_dir=tmp_path, progress=False)
        assert isinstance(caught.value.__cause__, cause), engine.name
        # the CLI prints str(exc) only: the message itself names the cause, type and text
        assert f"{cause.__name__}: {caught.value.__cause__}" in str(caught.value), engine.name


def test_keep_going_keeps_failed_texts_as_counted_error_rows_and_retries_them(tiny_bart, tmp_path):
    from detox_sft.compat import load_tmarco
    from detox_sft.rephrase import BatchedEngine, rephrase_dataset

    cfg = _cfg(tiny_bart, mask_threshold=1.02, keep_going=True)
    tmarco = load_tmarco(cfg.base_model, cfg.expert, cfg.anti_expert, expert_weights=list(cfg.expert_weights))
    records = [{"text": "you stupid idiot, shut up"}, {"text": "damn this hell"}, {"text": "thanks"}]
    broken = BatchedEngine.from_tmarco(tmarco, cfg)
    real = broken._run

    def fails_on_damn(texts):  # one sentence breaks the engine (and the whole batch it is in), the others do not
        if any("damn" in t for t in texts):
            _exploding()
        return real(texts)

    broken._run = fails_on_damn
    with pytest.warns(UserWarning, match="1 of 2 gated text"):
        result = rephrase_dataset(records, cfg, engine=broken, scorer=_stub_scorer, cache_dir=tmp_path, progress=False)
    status = [r["rephrase_status"] for r in result.records]
    assert status[1] == "error" and status[0] != "error" and status[2] == "below_gate"
    assert "RuntimeError: expert exploded" in result.records[1]["rephrase_error"]
    assert result.records[1]["rephrased_text"] == records[1]["text"] and result.summary.errors == 1
    # the failed text was not cached: a rerun with a working engine computes it (and only it)
    fixed = CountingEngine(BatchedEngine.from_tmarco(tmarco, cfg))
    again = rephrase_dataset(records, cfg, engine=fixed, scorer=_stub_scorer, cache_dir=tmp_path, progress=False)
    assert fixed.calls == 1 and again.summary.errors == 0 and again.summary.cached == 1


def test_a_cache_that_cannot_be_written_is_a_typed_error_and_keeps_what_was_committed(tmp_path):
    """Disk full (here: a file-size limit) while caching: CacheWriteError naming the fix; earlier entries stay."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        from detox_sft.rephrase.cache import Cache, CacheWriteError
        cache = Cache(Path(sys.argv[1]))
        cache.put_many("out", {"first": {"text": "kept"}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (cache.path.stat().st_size, resource.RLIM_INFINITY))
        try:
            cache.put_many("out", {f"k{i}": {"text": "x" * 1000} for i in range(200)})
        except CacheWriteError as exc:
            print("CacheWriteError:", exc)
        """
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "CacheWriteError:" in run.stdout and "Fix: free disk space" in run.stdout, run.stdout
    from detox_sft.rephrase.cache import Cache

    with Cache(tmp_path) as again:
        assert again.get_many("out", ["first", "k0"]) == {"first": {"text": "kept"}}  # the failed batch left nothing


def test_token_scores_figure_marks_the_masked_tokens():
    from matplotlib.figure import Figure

    from detox_sft import rephrase

    class Tokenizer:
        def tokenize(self, text):
            return text.split()

        def convert_tokens_to_string(self, tokens):
            return " ".join(tokens)

    fig = rephrase.plot_token_scores(Tokenizer(), "you are a idiot", [0.5, 0.8, 0.6, 2.1], 1.2)
    assert isinstance(fig, Figure)
    bars = fig.axes[0].patches
    assert [b.get_facecolor()[0] > 0.8 and b.get_facecolor()[1] < 0.3 for b in bars] == [False, False, False, True]
    assert "1 of 4 tokens" in fig.axes[0].get_title()
