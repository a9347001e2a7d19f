"""CUDA checks (`pytest -m gpu`): they need a GPU and skip, saying so, without one. CI has none; benchmarks/gpu.sh runs
them on a lent GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detox_sft.compat import _NumpyArgmaxOnAnyDevice

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine"),
]


def test_tmarco_argmax_shim_takes_cuda_logits():
    """TrustyAI's rephrase calls np.argmax on CUDA logits; the shim gives numpy's answer for them."""
    logits = torch.randn(3, 50, device="cuda", requires_grad=True)
    shimmed = _NumpyArgmaxOnAnyDevice(np)
    assert shimmed.argmax(logits, axis=-1).tolist() == logits.detach().cpu().numpy().argmax(axis=-1).tolist()
    with pytest.raises(TypeError):
        np.argmax(logits.detach(), axis=-1)  # what the shim is for: numpy cannot read a CUDA tensor


def test_half_precision_logits_stay_close_to_float32(zoo):
    """The batched engine runs BART in float16 on a GPU: its logits stay within 5e-2 of float32 on the zoo's BART."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.bart_base)
    enc = tok(["you are such a <mask> person"], return_tensors="pt").to("cuda")
    full = AutoModelForSeq2SeqLM.from_pretrained(zoo.bart_base).to("cuda").eval()
    half = AutoModelForSeq2SeqLM.from_pretrained(zoo.bart_base, dtype=torch.float16).to("cuda").eval()
    with torch.no_grad():
        a = full(**enc).logits.float()
        b = half(**enc).logits.float()
    assert torch.max(torch.abs(a - b)).item() < 5e-2
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_four_bit_training_runs_on_cuda(tmp_path, offline_recipe):
    """Real QLoRA on CUDA: one arm trains a few steps in 4-bit NF4 and saves its adapter."""
    from detox_sft import training
    from detox_sft.data import load_train_dataset

    offline_recipe.training.device = "cuda"
    offline_recipe.training.sft["max_steps"] = 2
    offline_recipe.data.num_train_samples = 32
    data = load_train_dataset(offline_recipe.data, offline_recipe.seed)
    result = training.train_arm(offline_recipe, "raw", data)
    assert offline_recipe.paths.adapter_config("raw").is_file() and result.metrics
