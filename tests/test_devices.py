"""One device rule for every step: auto picks CUDA when present, a bad value names the setting and the fix, and the
one error type it raises is a bad setting to the command line (exit 2, the message and no traceback)."""

from __future__ import annotations

import pytest
import torch

from detox_sft import cli
from detox_sft.devices import DeviceError, resolve_device


def test_auto_and_none_follow_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == expected
    assert resolve_device("cpu") == "cpu"


def test_unknown_device_names_the_setting_and_the_fix():
    with pytest.raises(DeviceError, match=r"unknown evaluation.device 'tpu'.*'auto', 'cpu' or 'cuda'"):
        resolve_device("tpu", "evaluation.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_a_gpu_is_a_clear_error_that_the_command_line_reports_as_a_bad_setting():
    with pytest.raises(DeviceError, match=r"training.device is 'cuda' but CUDA is not available.*Fix"):
        resolve_device("cuda", "training.device")
    assert issubclass(DeviceError, cli.INPUT_ERRORS) and not issubclass(DeviceError, cli.STEP_ERRORS)
