"""The prompt template that training, evaluation, export's check, the clients and the notebooks share.

Training text is ``"Prompt: {prompt}\\nContinuation: {continuation}"``; the model continues after
:data:`RESPONSE_MARKER` (``"\\nContinuation:"``, no trailing space), so a generation prompt ends on ``":"`` as in
training (a trailing space would be a lone space token the tuned model never saw before a word).
"""

from __future__ import annotations

__all__ = ["RESPONSE_MARKER", "format_sample", "generation_prompt", "split_sample"]

RESPONSE_MARKER = "\nContinuation:"
_PROMPT = "Prompt: {prompt}" + RESPONSE_MARKER


def _text(value: str, name: str) -> str:
    if not isinstance(value, str):  # bytes would be formatted as "b'...'" without a word
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}. Fix: decode or fill it first.")
    return value.strip()


def generation_prompt(prompt: str) -> str:
    """The prompt as the model saw it in training: ``"Prompt: {prompt}\\nContinuation:"``."""
    return _PROMPT.format(prompt=_text(prompt, "prompt"))


def format_sample(prompt: str, continuation: str) -> str:
    """The SFT text of one sample: the generation prompt, a space, the continuation."""
    return f"{generation_prompt(prompt)} {_text(continuation, 'continuation')}"


def split_sample(text: str) -> tuple[str, str] | None:
    """Split an SFT text at the marker into (generation prompt, completion), ``prompt + completion == text``; `None`
    without the marker."""
    at = text.find(RESPONSE_MARKER)
    if at < 0:
        return None
    cut = at + len(RESPONSE_MARKER)
    return text[:cut], text[cut:]
