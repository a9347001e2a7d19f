"""Which torch device and dtype a step runs on: one rule for every step (rephrase, training, evaluation, scoring)."""

from __future__ import annotations

__all__ = ["DeviceError", "compute_dtype", "gpu_dtype", "resolve_device"]


class DeviceError(ValueError):
    """A device setting names a device this machine does not have; the message names the setting and the fix."""


def resolve_device(device: str | None = "auto", setting: str = "device") -> str:
    """``auto`` (or `None`) -> ``cuda`` when CUDA is available, else ``cpu``; ``cpu`` / ``cuda`` as given; else a
    DeviceError naming the recipe ``setting`` (also for ``cuda`` without CUDA)."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{setting} is 'cuda' but CUDA is not available here. Fix: set {setting}: auto (or cpu).")
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"unknown {setting} {device!r}. Fix: use 'auto', 'cpu' or 'cuda'.")
    return device


def gpu_dtype():
    """The half precision of this GPU: bfloat16 where it has it (Ampere or newer), else float16 (T4, V100)."""
    import torch

    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def compute_dtype(device: str):
    """The dtype models load and compute in: :func:`gpu_dtype` on ``cuda``, float32 on CPU (half is slow there)."""
    import torch

    return gpu_dtype() if str(device).startswith("cuda") else torch.float32
