"""The prompt template has one owner (detox_sft.prompts), and the generation prompt is exactly what training taught."""

from pathlib import Path

from detox_sft.prompts import RESPONSE_MARKER, format_sample, generation_prompt, split_sample

SRC = Path(__file__).resolve().parents[1] / "src" / "detox_sft"


def test_sample_text_is_the_documented_template():
    assert format_sample(" Hello there ", "friend ") == "Prompt: Hello there\nContinuation: friend"


def test_generation_prompt_is_the_training_prompt():
    """What a model is asked to continue is, byte for byte, the prompt part TRL trained on (no trailing space)."""
    text = format_sample("you are such a", "nice person")
    prompt, completion = split_sample(text)
    assert prompt == generation_prompt("you are such a") == "Prompt: you are such a\nContinuation:"
    assert completion == " nice person" and prompt + completion == text
    assert split_sample("no marker here") is None


def test_template_text_lives_in_one_source_file():
    """The marker's text appears in prompts.py only: every other module imports it."""
    holders = [p.relative_to(SRC) for p in SRC.rglob("*.py") if "Continuation:" in p.read_text()]
    assert holders == [Path("prompts.py")], holders
    assert RESPONSE_MARKER == "\nContinuation:"
