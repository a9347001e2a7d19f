"""One device rule for every step: auto picks CUDA when present, a bad value names the setting and the fix."""

from __future__ import annotations

import pytest
import torch

from detox_sft.devices import resolve_device
from detox_sft.evaluation import EvaluationError
from detox_sft.rephrase import RephraseError
from detox_sft.rephrase import resolve_device as rephrase_device
from detox_sft.training import TrainingError
from detox_sft.training import resolve_device as training_device


def test_auto_and_none_follow_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == expected
    assert resolve_device("cpu") == "cpu"


def test_unknown_device_names_the_setting_and_the_fix():
    with pytest.raises(EvaluationError, match=r"unknown evaluation.device 'tpu'.*'auto', 'cpu' or 'cuda'"):
        resolve_device("tpu", "evaluation.device", EvaluationError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_a_gpu_is_a_clear_error_of_each_step():
    with pytest.raises(TrainingError, match=r"training.device is 'cuda' but CUDA is not available.*Fix"):
        training_device("cuda")
    with pytest.raises(RephraseError, match=r"rephrase.device is 'cuda'"):
        rephrase_device("cuda")
