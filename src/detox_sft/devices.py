"""Which torch device a step runs on: one rule for every step (rephrase, training, evaluation, scoring)."""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(device: str | None = "auto", setting: str = "device", error: type[Exception] = ValueError) -> str:
    """``auto`` (or `None`) -> ``cuda`` when CUDA is available, else ``cpu``; ``cpu`` / ``cuda`` as given.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or `None` (= ``auto``).
        setting: the recipe setting the value came from, named in the error (``training.device``, ...).
        error: the exception class to raise (each step raises its own error type).

    Raises:
        error: ``cuda`` was asked for but CUDA is not available, or the value is none of the above.
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise error(f"{setting} is 'cuda' but CUDA is not available here. Fix: set {setting}: auto (or cpu).")
    if device not in ("cpu", "cuda"):
        raise error(f"unknown {setting} {device!r}. Fix: use 'auto', 'cpu' or 'cuda'.")
    return device
