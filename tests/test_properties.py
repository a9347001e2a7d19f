"""Property-based tests (hypothesis) of the code that meets untrusted text: JSONL files, recipe files and overrides, the offline scorer, the prompt
template, and the clients' parsing of server answers.

Random Unicode (control characters and surrogates included), empty and huge strings, random bytes and wrong types:
each function either gives its documented result or raises its documented error. The settings keep the run
deterministic (``derandomize``, no example database) and short on two cores.
"""

from __future__ import annotations

import json
import math
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from detox_sft.clients import (
    GenerationResult,
    ModelServerError,
    error_detail,
    parse_caikit_result,
    parse_sse,
)
from detox_sft.data import DataError, read_jsonl, write_jsonl_atomic
from detox_sft.prompts import RESPONSE_MARKER, format_sample, generation_prompt, split_sample
from detox_sft.toxicity import ProfanityCheckScorer

PROPERTY = settings(
    deadline=None,
    max_examples=50,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# text as it comes: any code point (controls, surrogates, U+2028, NUL), empty to long
any_text = st.text(st.characters(exclude_categories=()), max_size=200)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
not_json_types = st.sampled_from([object(), b"\x00", bytearray(b"{}"), 3j, {1, 2}, print])
HUGE = "x" * 200_000
DEEP = "[" * 100_000  # deeper than any parser's recursion limit


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8, as in a broken file


# --- detox_sft.data.read_jsonl ----------------------------------------------------------------------------------------


@settings(PROPERTY, max_examples=25)  # each example writes and fsyncs a file
@given(st.lists(st.dictionaries(any_text, json_values), max_size=5))
def test_jsonl_round_trip(tmp_path_factory, records):
    """What write_jsonl_atomic writes, read_jsonl reads back unchanged (when it is UTF-8-encodable)."""
    try:
        json.dumps(records, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        assume(False)  # lone surrogates cannot be written as UTF-8 at all
    path = tmp_path_factory.mktemp("jsonl") / "records.jsonl"
    write_jsonl_atomic(records, path)
    assert read_jsonl(path) == records


@PROPERTY
@given(
    st.binary(max_size=300)
    | any_text.map(_utf8)
    | st.lists(json_values, max_size=4).map(lambda values: "\n".join(json.dumps(v) for v in values).encode())
)
@example(b"")
@example(b"\n \n\t\n")
@example(b"\xff\xfe{}\n")
@example(b'{"a": 1}\n\x80\n')
@example(DEEP.encode())
@example(b'{"a": "' + HUGE.encode() + b'"}\n')
def test_jsonl_reader_gives_objects_or_data_error(tmp_path_factory, content):
    """Any bytes: a list of dicts, or DataError (naming the line); never another exception."""
    path = tmp_path_factory.mktemp("jsonl") / "any.jsonl"
    path.write_bytes(content)
    try:
        records = read_jsonl(path)
    except DataError as exc:
        assert "line " in str(exc) and "Fix:" in str(exc)
    else:
        assert isinstance(records, list) and all(isinstance(r, dict) for r in records)


# --- detox_sft.toxicity: the offline profanity-check scorer ----------------------------------------------------------


@cache
def _scorer() -> ProfanityCheckScorer:
    return ProfanityCheckScorer()


@PROPERTY
@given(st.lists(any_text, max_size=8))
@example([])
@example([""])
@example(["\x00\x01\x1f", "\u2028", "\ud800", " " * 50])
@example([HUGE])
def test_scorer_gives_one_probability_per_text(texts):
    scores = _scorer()(texts)
    assert isinstance(scores, np.ndarray) and scores.shape == (len(texts),)
    assert all(0.0 <= s <= 1.0 and math.isfinite(s) for s in scores)


@PROPERTY
@given(any_text)
def test_scorer_refuses_a_bare_string(text):
    """The 2024 original's bug (a string scored character by character) cannot come back."""
    with pytest.raises(TypeError, match="bare string"):
        _scorer()(text)


@PROPERTY
@given(st.lists(st.none() | st.integers() | st.floats() | st.binary(max_size=10), min_size=1, max_size=5))
def test_scorer_scores_non_text_items_as_empty_text(items):
    scores = _scorer()(items)
    assert scores.shape == (len(items),)
    assert np.allclose(scores, _scorer()([""] * len(items)))


# --- detox_sft.prompts: the prompt template ---------------------------------------------------------------------------


@PROPERTY
@given(any_text, any_text)
@example("", "")
@example(" \n\t", "\u2028\x00")
@example("Prompt: nested", "Continuation: inside")
@example(HUGE, HUGE)
def test_prompt_template_round_trip(prompt, continuation):
    """split_sample(format_sample(p, c)) gives back the generation prompt of p and " " + c (stripped)."""
    assume(RESPONSE_MARKER not in prompt)  # a prompt holding the marker itself is split at its first occurrence
    text = format_sample(prompt, continuation)
    head = generation_prompt(prompt)
    assert head == f"Prompt: {prompt.strip()}{RESPONSE_MARKER}"
    assert text.startswith(head) and not head.endswith(" ")  # the completion starts with the space, as in training
    assert split_sample(text) == (head, " " + continuation.strip())


@PROPERTY
@given(st.lists(any_text | st.just(RESPONSE_MARKER), max_size=5).map("".join))
def test_split_sample_of_any_text(text):
    parts = split_sample(text)
    if RESPONSE_MARKER not in text:
        assert parts is None
    else:
        head, completion = parts
        assert head + completion == text
        assert head.endswith(RESPONSE_MARKER) and RESPONSE_MARKER not in head[: -len(RESPONSE_MARKER)]


@PROPERTY
@given(st.none() | st.integers() | st.binary() | st.lists(any_text))
def test_prompt_template_refuses_non_text(value):
    """Bytes or None never become a prompt like "Prompt: b'...'": a TypeError naming the argument."""
    with pytest.raises(TypeError, match="prompt: expected a str"):
        generation_prompt(value)
    with pytest.raises(TypeError, match="continuation: expected a str"):
        format_sample("a prompt", value)


# --- detox_sft.clients: parsing what a server answers -----------------------------------------------------------------

wire = (
    st.binary(max_size=200)
    | any_text
    | json_values.map(json.dumps)
    | json_values.map(lambda v: json.dumps(v).encode())
    | json_values
    | not_json_types
)
caikit_like = st.fixed_dictionaries(
    {},
    optional={
        "generated_text": json_values,
        "generated_tokens": json_values,
        "finish_reason": json_values,
        "input_token_count": json_values,
    },
)


def _check_result(result):
    assert isinstance(result, GenerationResult) and isinstance(result.text, str)
    for count in (result.generated_tokens, result.input_token_count):
        assert count is None or (isinstance(count, int) and not isinstance(count, bool))
    assert result.finish_reason is None or isinstance(result.finish_reason, str)


@PROPERTY
@given(wire | caikit_like | caikit_like.map(json.dumps))
@example(DEEP)
@example(b"<html><body>Log in</body></html>")
@example({"generated_text": HUGE, "generated_tokens": 3, "finish_reason": "MAX_TOKENS"})
def test_caikit_result_parses_or_raises_model_server_error(body):
    try:
        result = parse_caikit_result(body)
    except ModelServerError as exc:
        assert len(str(exc)) < 1000  # a snippet, not the whole body
    else:
        _check_result(result)


@PROPERTY
@given(st.text(st.characters(codec="utf-8"), max_size=100), st.integers(0, 10**6))
def test_caikit_result_keeps_the_answer(text, tokens):
    body = json.dumps({"generated_text": text, "generated_tokens": tokens, "finish_reason": "EOS_TOKEN"}).encode()
    result = parse_caikit_result(body)
    assert (result.text, result.generated_tokens, result.finish_reason) == (text, tokens, "EOS_TOKEN")


sse_lines = st.lists(
    st.binary(max_size=40)
    | any_text
    | st.sampled_from(["", "event: error", "event: message", ": comment", "data:", "data: {}", "data: [1]"])
    | json_values.map(lambda v: "data: " + json.dumps(v))
    | caikit_like.map(lambda v: "data: " + json.dumps(v)),
    max_size=8,
)


@PROPERTY
@given(sse_lines | sse_lines.map(lambda ls: b"\r\n".join(x if isinstance(x, bytes) else _utf8(x) for x in ls)))
@example(["data: " + DEEP])
@example([3, None])
def test_sse_events_parse_or_raise_model_server_error(lines):
    try:
        events = list(parse_sse(lines))
    except ModelServerError:
        pass
    else:
        assert all(isinstance(event, str) and isinstance(data, dict) for event, data in events)


@PROPERTY
@given(st.text(st.characters(codec="utf-8"), max_size=60))
def test_sse_keeps_unicode_line_separators_inside_json(text):
    """U+2028 and friends are not line breaks in SSE: the event's text arrives whole."""
    stream = ("event: message\ndata: " + json.dumps({"generated_text": text}, ensure_ascii=False) + "\n\n").encode()
    assert list(parse_sse(stream)) == [("message", {"generated_text": text})]


@PROPERTY
@given(wire | st.dictionaries(st.sampled_from(["details", "detail", "message", "error"]), json_values))
@example(DEEP)
@example({"error": {"message": HUGE}})
@example(HUGE.encode())
def test_error_detail_never_raises(body):
    detail = error_detail(body)
    assert isinstance(detail, str) and len(detail) <= 500


# --- detox_sft.config.load_recipe -------------------------------------------------------------------------------------

_RECIPE_FIELDS = [
    "seed",
    "data.num_train_samples",
    "rephrase.gate_threshold",
    "rephrase.batch_size",
    "evaluation.num_samples",
    "training.sft.learning_rate",
    "training.lora.r",
    "storage.prefix",
]


@cache
def _offline_yaml() -> dict:
    import yaml

    from detox_sft.config import RECIPES_DIR

    return yaml.safe_load((RECIPES_DIR / "offline.yaml").read_text())


@settings(PROPERTY, max_examples=30)  # each example writes a file and builds the dataclasses
@given(content=st.binary(max_size=300) | any_text.map(_utf8))
@example(content=b"")
@example(content=b"seed: [1, 2")
@example(content=b"- a list\n- not a mapping\n")
@example(content=b"\xff\xfe not utf-8")
def test_recipe_loader_reads_any_file_or_raises_recipe_error(tmp_path_factory, content):
    from detox_sft.config import Recipe, RecipeError, load_recipe

    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_bytes(content)
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        assert "Fix:" in str(exc) or "not valid YAML" in str(exc)
    else:
        assert isinstance(recipe, Recipe)


@settings(PROPERTY, max_examples=40)
@given(field=st.sampled_from(_RECIPE_FIELDS), value=json_values)
def test_recipe_loader_checks_any_value_of_a_field(tmp_path_factory, field, value):
    """A YAML value of any type in a typed field: a recipe whose field holds the value (a text read as the field's
    type, as jsonargparse reads "1e-4" for a float), or RecipeError naming the field."""
    import copy

    import yaml

    from detox_sft.config import RecipeError, load_recipe

    values = copy.deepcopy(_offline_yaml())
    *parents, leaf = field.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True))
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        assert leaf in str(exc), (field, value, str(exc))
    else:
        got = recipe
        for part in field.split("."):
            got = got[part] if isinstance(got, dict) else getattr(got, part)
        if isinstance(value, str) and not isinstance(got, str):
            value = yaml.safe_load(value.replace("e-", ".0e-") if "e-" in value and "." not in value else value)
        assert got == value and isinstance(got, bool) == isinstance(value, bool), (field, value, got)


@settings(PROPERTY, max_examples=40)
@given(field=st.sampled_from(_RECIPE_FIELDS), text=any_text)
def test_recipe_dotted_overrides_read_any_text_or_raise_recipe_error(field, text):
    from detox_sft.config import Recipe, RecipeError, load_recipe

    try:
        recipe = load_recipe("offline", dotted={field: text})
    except RecipeError as exc:
        assert field.rsplit(".", 1)[-1] in str(exc), (field, text, str(exc))
    else:
        assert isinstance(recipe, Recipe)
