"""Each shim in detox_sft.compat and detox_sft_dev.caikit_shims is tested twice: it works, and the upstream breakage it
covers is still there."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest

# TrustyAI TMaRCo shims ---------------------------------------------------------------------------------------------

_UPSTREAM_PROBE = """
import json, transformers
facts = {"has_conversation": hasattr(transformers, "Conversation")}
import sys
try:  # without the shim the module prints a warning and defines no TMaRCo, so the package import fails
    import trustyai.language.detoxify.tmarco
except ImportError:
    pass
facts["tmarco_defined_without_shim"] = hasattr(sys.modules["trustyai.language.detoxify.tmarco"], "TMaRCo")
print("FACTS" + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def upstream_facts():
    """What a fresh interpreter (no shim) sees in transformers and trustyai."""
    out = subprocess.run([sys.executable, "-c", _UPSTREAM_PROBE], capture_output=True, text=True, timeout=300)
    line = next(x for x in out.stdout.splitlines() if x.startswith("FACTS"))
    return json.loads(line[len("FACTS") :])


def test_conversation_shim_still_needed(upstream_facts):
    # fails when transformers brings Conversation back or trustyai stops importing it: drop the shim then
    assert upstream_facts == {"has_conversation": False, "tmarco_defined_without_shim": False}


def test_conversation_shim_makes_tmarco_importable():
    from detox_sft import compat

    with contextlib.suppress(ImportError):  # a stale half-import (before the shim) must not stop import_tmarco
        import trustyai.language.detoxify  # noqa: F401

    tmarco_cls = compat.import_tmarco()
    assert tmarco_cls.__name__ == "TMaRCo"
    assert {"score", "mask", "rephrase"} <= set(dir(tmarco_cls))
    import transformers

    assert compat.ensure_transformers_conversation() is False  # idempotent: already installed
    with pytest.raises(NotImplementedError, match="reflect"):
        transformers.Conversation("hi")


def test_tmarco_argmax_shim_still_needed():
    import inspect

    import numpy as np
    import torch

    from detox_sft import compat

    # fails when trustyai stops picking tokens with numpy from torch logits: drop the shim then
    source = inspect.getsource(compat.import_tmarco().rephrase)
    assert "np.argmax(log_prob)" in source and "log_prob = next_token_logits" in source
    # numpy reads a tensor only where torch lets it (CPU, no autograd); on CUDA it raises TypeError, here the
    # autograd case stands in for it
    with pytest.raises(RuntimeError, match="requires grad"):
        np.argmax(torch.tensor([0.0, 2.0, 1.0], requires_grad=True))
    if torch.cuda.is_available():
        with pytest.raises(TypeError, match="cuda"):
            np.argmax(torch.tensor([0.0, 2.0, 1.0], device="cuda"))


def test_tmarco_argmax_shim_picks_numpys_token_from_any_tensor():
    import sys

    import numpy as np
    import torch

    from detox_sft import compat

    compat.import_tmarco()
    module = sys.modules[compat.TMARCO_MODULE]
    assert compat.ensure_tmarco_argmax_on_cuda(module) is False  # installed by import_tmarco, once
    shimmed = module.np
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert shimmed.argmax(logits).item() == np.argmax(logits).item() == int(logits.argmax())
    assert shimmed.argmax(logits.clone().requires_grad_()).item() == int(logits.argmax())  # numpy alone raises
    assert shimmed.argmax([1, 5, 2]) == 1 and shimmed.average is np.average and shimmed.ndarray is np.ndarray
    if torch.cuda.is_available():
        assert shimmed.argmax(logits.cuda()).item() == int(logits.argmax())


@pytest.mark.parametrize("kwarg", [{"max_length": 150}, {"forced_bos_token_id": 0}])
def test_bart_from_pretrained_still_rejects_generation_kwargs(tiny_bart, kwarg):
    # trustyai passes these to from_pretrained; fails when transformers accepts them again (shim not needed)
    from transformers import BartForConditionalGeneration

    with pytest.raises(TypeError, match=next(iter(kwarg))):
        BartForConditionalGeneration.from_pretrained(tiny_bart.bart_base, **kwarg)


def test_load_tmarco_model_puts_settings_in_generation_config(tiny_bart):
    from transformers import BartForConditionalGeneration

    from detox_sft.compat import load_tmarco_model

    model = load_tmarco_model(str(tiny_bart.bart_base), forced_bos_token_id=0, max_length=150)
    assert isinstance(model, BartForConditionalGeneration)
    assert model.generation_config.forced_bos_token_id == 0
    assert model.generation_config.max_length == 150
    assert not model.training


def test_trustyai_still_loads_bare_relative_expert_as_decoder_only(tiny_bart, monkeypatch):
    # trustyai's load_models reads "expert" (no directory part) as a hub id for AutoModelForCausalLM, with a kwarg
    # transformers 5 rejects: fails when trustyai fixes its routing (then load_models could be used again)
    from detox_sft.compat import import_tmarco

    tmarco_cls = import_tmarco()
    tmarco = tmarco_cls(base_model=object(), tokenizer=str(tiny_bart.bart_base), device="cpu")
    monkeypatch.chdir(tiny_bart.expert.parent)
    import transformers

    calls = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, name, **kw: calls.append((name, kw)) or object()),
    )
    tm_module = sys.modules[tmarco_cls.__module__]
    monkeypatch.setattr(tm_module, "AutoModelForCausalLM", transformers.AutoModelForCausalLM)
    tmarco.load_models(["expert"])
    assert calls and calls[0][0] == "expert" and "forced_bos_token_id" in calls[0][1]


def test_load_tmarco_relative_path_and_scores(tiny_bart, monkeypatch):
    from transformers import BartForConditionalGeneration

    from detox_sft.compat import load_tmarco

    monkeypatch.chdir(tiny_bart.expert.parent)  # relative paths must still load the seq2seq models
    tmarco = load_tmarco("bart_base", "expert", "anti_expert", device="cpu", expert_weights=[-0.5, 4.0])
    assert all(isinstance(m, BartForConditionalGeneration) for m in [tmarco.base, *tmarco.experts])
    assert tmarco.base.generation_config.max_length == 150
    assert tmarco.tokenizer.pad_token_id == tmarco.tokenizer.eos_token_id  # TMaRCo's own tokenizer setup
    texts = ["you are a stupid idiot", "thanks for the help"]
    scores = tmarco.score(texts)
    assert [len(s) for s in scores] == [len(tmarco.tokenizer.tokenize(t)) for t in texts]
    masked = tmarco.mask(texts, scores=scores, threshold=1.2)
    out = tmarco.rephrase(texts, scores=scores, masked_outputs=masked, combine_original=True)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_load_tmarco_unknown_hub_id_says_what_to_do(tiny_bart):
    from detox_sft.compat import load_tmarco_model

    with pytest.raises(OSError, match="Fix:"):
        load_tmarco_model("no-such-org/no-such-model", forced_bos_token_id=0)


# bitsandbytes 4-bit on CPU ------------------------------------------------------------------------------------------


def _linear4bit_after_eval(shim: bool):
    """A 4-bit layer trained, evaluated once (no grad), then trained again: is the input gradient still there?"""
    import bitsandbytes as bnb
    import torch

    from detox_sft import compat

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    if shim:
        assert compat.keep_bnb_4bit_trainable_on_cpu(torch.nn.Sequential(layer)) in (0, 1)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    before = x.grad.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 128))
    layer.train()
    x.grad = None
    with contextlib.suppress(Exception):
        layer(x).sum().backward()
    packed = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
    return packed, before, x.grad


def test_bnb_cpu_eval_shim_still_needed():
    from bitsandbytes.backends.cpu.ops import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("the repacking only happens on CPUs with AVX512-BF16")
    packed, _, grad = _linear4bit_after_eval(shim=False)
    # fails when bitsandbytes stops repacking in eval (or gives gemv_4bit a backward): drop the shim then
    assert packed and grad is None


def test_bnb_cpu_eval_shim_keeps_gradient():
    packed, before, grad = _linear4bit_after_eval(shim=True)
    assert not packed
    assert grad is not None and torch_allclose(grad, before)


def torch_allclose(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, b, atol=1e-5))


# caikit runtime shims ----------------------------------------------------------------------------------------------

_CAIKIT_PROBE = """
import importlib.util, json, pathlib
import numpy as np
import torch

def src(module):
    return pathlib.Path(importlib.util.find_spec(module).origin).read_text()

facts = {
    "numpy_has_issubclass_": hasattr(np, "issubclass_"),
    "caikit_calls_np_issubclass_": "np.issubclass_(" in src("caikit.runtime.http_server.pydantic_wrapper"),
    "caikit_http_binds_all": '"host": "0.0.0.0"' in src("caikit.runtime.http_server.http_server"),
    "caikit_grpc_binds_all": 'f"[::]:{self.port}"' in src("caikit.runtime.grpc_server"),
}
from caikit_nlp.toolkit.text_generation import model_run_utils
params = getattr(model_run_utils, "__process_gen_args")(None, 4, 0, "SAMPLING", 0, 1.0, 1.0, 1.0, 3, 1.0, None, None, None)
facts["caikit_nlp_passes_seed_to_generate"] = params.get("seed") == 3
greedy = getattr(model_run_utils, "__process_gen_args")(None, 4, 0, "GREEDY", 0, 1.0, 1.0, 1.0, None, 1.0, None, None, None)
facts["caikit_nlp_greedy_leaves_do_sample_to_model"] = "do_sample" not in greedy
from transformers import OPTConfig, OPTForCausalLM
model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, word_embed_proj_dim=16, ffn_dim=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32))
try:
    model.generate(torch.tensor([[2, 5, 7]]), do_sample=True, max_new_tokens=2, seed=3)
    facts["transformers_rejects_seed"] = False
except ValueError as exc:
    facts["transformers_rejects_seed"] = "seed" in str(exc)
print("FACTS" + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def caikit_facts():
    """What a fresh interpreter (no shim) sees in NumPy, caikit, caikit-nlp and transformers."""
    out = subprocess.run([sys.executable, "-c", _CAIKIT_PROBE], capture_output=True, text=True, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("FACTS")), None)
    assert line, out.stderr[-2000:]
    return json.loads(line[len("FACTS") :])


def test_numpy_issubclass_shim_still_needed(caikit_facts):
    # fails when NumPy brings issubclass_ back or caikit stops calling it: drop restore_numpy_issubclass then
    assert not caikit_facts["numpy_has_issubclass_"]
    assert caikit_facts["caikit_calls_np_issubclass_"]


def test_numpy_issubclass_shim_behaves_like_numpy_1():
    import numpy as np

    from detox_sft_dev import caikit_shims

    caikit_shims.restore_numpy_issubclass()
    assert np.issubclass_(np.int64, np.integer) and np.issubclass_(np.float32, np.floating)
    assert not np.issubclass_(np.float32, np.integer)
    assert np.issubclass_(3, int) is False  # NumPy 1.x returned False instead of raising TypeError
    assert caikit_shims.restore_numpy_issubclass() is False  # idempotent


def test_bind_to_host_shim_still_needed(caikit_facts):
    # fails when caikit makes its bind address configurable / local: use that instead of bind_caikit_to_host
    assert caikit_facts["caikit_http_binds_all"] and caikit_facts["caikit_grpc_binds_all"]


_BIND_PROBE = """
import json, socket, grpc, uvicorn
from detox_sft_dev import caikit_shims
caikit_shims.bind_caikit_to_host("127.0.0.1")
config = uvicorn.Config(app=None, host="0.0.0.0", port=1)
server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
port = server.add_insecure_port("[::]:0")
server.start()
# bound on 127.0.0.1 only: connecting through another local address of the host fails
with socket.socket() as s:
    s.settimeout(1)
    loopback = s.connect_ex(("127.0.0.1", port)) == 0
server.stop(0)
print("FACTS" + json.dumps({"http_host": config.host, "grpc_loopback": loopback, "grpc_port": port}))
"""


def test_bind_to_host_shim_rebinds_http_and_grpc():
    out = subprocess.run([sys.executable, "-c", _BIND_PROBE], capture_output=True, text=True, timeout=120)
    line = next((x for x in out.stdout.splitlines() if x.startswith("FACTS")), None)
    assert line, out.stderr[-2000:]
    facts = json.loads(line[len("FACTS") :])
    assert facts["http_host"] == "127.0.0.1"
    assert facts["grpc_loopback"] and facts["grpc_port"] > 0
    # tests/test_serving.py::test_server_listens_on_localhost_only checks the running runtime with `ss`


def test_generate_args_shim_still_needed(caikit_facts):
    # fails when caikit-nlp stops passing `seed` to generate (or transformers accepts it) and sets do_sample for
    # GREEDY itself: drop fix_caikit_nlp_generate_args then
    assert caikit_facts["caikit_nlp_passes_seed_to_generate"] and caikit_facts["transformers_rejects_seed"]
    assert caikit_facts["caikit_nlp_greedy_leaves_do_sample_to_model"]


def test_generate_args_shim_seeds_and_decodes_greedily():
    import torch
    from caikit_nlp.toolkit.text_generation import model_run_utils

    from detox_sft import compat

    compat.fix_caikit_nlp_generate_args()
    process = getattr(model_run_utils, "__process_gen_args")
    params = process(None, 4, 0, "SAMPLING", 0, 1.0, 1.0, 1.0, 11, 1.0, None, None, None)
    assert "seed" not in params and params["do_sample"] is True
    first = torch.rand(3)
    process(None, 4, 0, "SAMPLING", 0, 1.0, 1.0, 1.0, 11, 1.0, None, None, None)
    assert torch.equal(first, torch.rand(3))  # the seed now drives torch's RNG, as TGIS's seed drives sampling
    rest = {"top_k": 0, "top_p": 1.0, "typical_p": 1.0, "temperature": 1.0, "seed": None, "repetition_penalty": 1.0}
    rest |= {"max_time": None, "exponential_decay_length_penalty": None, "stop_sequences": None}
    greedy = process(None, 4, 0, decoding_method="GREEDY", **rest)  # by keyword: the shim handles both
    assert greedy["do_sample"] is False  # overrides a generation_config.json that says do_sample: true
    assert compat.fix_caikit_nlp_generate_args() is False


# HateSonar's ONNX model and the en_US.UTF-8 locale --------------------------------------------------------------------


def test_hatesonar_shim_still_needed():
    # fails when hatesonar's shipped graph names a locale itself: drop compat.hatesonar_session then
    from importlib.resources import files

    import onnx

    model = onnx.load_from_string(files("hatesonar").joinpath("model", "model.onnx").read_bytes())
    normalizers = [n for n in model.graph.node if n.op_type == "StringNormalizer"]
    assert normalizers and not any(a.name == "locale" for n in normalizers for a in n.attribute)


def test_hatesonar_shim_gives_sonars_probabilities():
    import numpy as np

    from detox_sft import compat

    session = compat.hatesonar_session()
    texts = np.array(["have a lovely day", "shut up you stupid bitch"], dtype=object)
    labels, probs = session.run(None, {"text": texts})
    assert [sorted(p) for p in probs] == [[0, 1, 2], [0, 1, 2]]  # hate speech, offensive language, neither
    assert all(abs(sum(p.values()) - 1.0) < 1e-5 for p in probs)
    assert labels[0] == 2 and labels[1] != 2
