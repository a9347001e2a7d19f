"""Shims for upstream breakages (README.md, "Development"), all in one place.

Each shim has a test in tests/test_compat.py that fails when the shim is no longer right or no longer needed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

from detox_sft.refs import resolve_ref, revision_kwargs

# --- TrustyAI TMaRCo (trustyai 0.6.4 without its [detoxify] extra, transformers 5) -------------------------------
# trustyai.language.detoxify.tmarco imports `transformers.Conversation` inside one try-block; transformers removed it
# in 4.42, so the import fails, the module prints a warning and simply never defines TMaRCo. Its loaders pass
# `max_length` / `forced_bos_token_id` to `from_pretrained`, which transformers 5 forwards to the model constructor and
# BART rejects (TypeError); and `load_models` reads an expert given as a bare relative name as a hub id of a
# decoder-only model (AutoModelForCausalLM). We load the models ourselves and hand TMaRCo the objects.

TMARCO_MODULE = "trustyai.language.detoxify.tmarco"
TMARCO_MAX_LENGTH = 150  # TMaRCo.__init__'s default max_length for the base model


class _ConversationPlaceholder:
    """Stands in for the removed ``transformers.Conversation``; only TMaRCo.reflect() would use it (unsupported)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "transformers.Conversation was removed in transformers 4.42; TMaRCo.reflect() cannot run with "
            "transformers 5 — use TMaRCo.score / mask / rephrase."
        )


def ensure_transformers_conversation() -> bool:
    """Give ``transformers`` a placeholder ``Conversation`` so that trustyai defines TMaRCo; True if installed now."""
    import transformers

    if hasattr(transformers, "Conversation"):
        return False
    transformers.Conversation = _ConversationPlaceholder
    return True


class _NumpyArgmaxOnAnyDevice:
    """trustyai's ``np`` with an ``argmax`` that takes a torch tensor on any device; everything else is numpy's."""

    def __init__(self, numpy_module):
        self._np = numpy_module

    def __getattr__(self, name):
        return getattr(self._np, name)

    def argmax(self, a, *args, **kwargs):
        import torch

        if isinstance(a, torch.Tensor):  # numpy can read a tensor only on the CPU and outside autograd
            a = a.detach().cpu()
        return self._np.argmax(a, *args, **kwargs)


def ensure_tmarco_argmax_on_cuda(module) -> bool:
    """Let TMaRCo.rephrase pick its tokens from logits on a GPU; True if installed now.

    trustyai's ``rephrase`` calls ``np.argmax`` on torch logits, which numpy cannot read on CUDA (TypeError, seen on an
    H200): the module's ``np`` gets an ``argmax`` that moves a tensor to the CPU first (the same index).
    """
    if isinstance(module.np, _NumpyArgmaxOnAnyDevice):
        return False
    module.np = _NumpyArgmaxOnAnyDevice(module.np)
    return True


def import_tmarco() -> type:
    """Import trustyai's ``TMaRCo`` class with the ``Conversation`` and ``argmax`` shims applied."""
    import importlib
    import sys

    ensure_transformers_conversation()
    stale = sys.modules.get(TMARCO_MODULE)
    if stale is not None and not hasattr(stale, "TMaRCo"):
        # imported before the shim (TMaRCo silently missing, the package import failed): import both afresh
        for name in (TMARCO_MODULE, TMARCO_MODULE.rsplit(".", 1)[0]):
            sys.modules.pop(name, None)
    module = importlib.import_module(TMARCO_MODULE)
    if not hasattr(module, "TMaRCo"):
        raise ImportError(f"{TMARCO_MODULE} did not define TMaRCo; check that torch, scipy and datasets import")
    ensure_tmarco_argmax_on_cuda(module)
    return module.TMaRCo


def load_tmarco_model(
    ref: str,
    *,
    forced_bos_token_id: int | None,
    max_length: int | None = None,
    device: str = "cpu",
    dtype=None,
    revision: str | None = None,
):
    """Load a TMaRCo base or expert (hub id, local directory or ``zoo:<name>``) as trustyai means to, on transformers 5.

    ``max_length`` / ``forced_bos_token_id`` go into ``model.generation_config`` (BART's ``from_pretrained`` rejects
    them); ``revision`` is the hub commit (ignored for ``zoo:``).
    """
    from transformers import AutoModelForSeq2SeqLM

    path = resolve_ref(ref)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    kwargs |= revision_kwargs(ref, revision)
    try:
        with library_progress_bars_off():  # transformers' 'Loading weights' bar, three times per TMaRCo
            model = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise OSError(
            f"cannot load TMaRCo model {ref!r} ({path}): {exc}. Fix: give a local model directory or a "
            "zoo: reference (offline recipe), or make the Hugging Face hub reachable."
        ) from exc
    model.generation_config.forced_bos_token_id = forced_bos_token_id
    if max_length is not None:
        model.generation_config.max_length = max_length
    return model.to(device).eval()


def load_tmarco(
    base_model: str,
    expert: str,
    anti_expert: str,
    device: str = "cpu",
    expert_weights: list[float] | None = None,
    max_length: int = TMARCO_MAX_LENGTH,
    revisions: tuple[str | None, str | None, str | None] = (None, None, None),
):
    """trustyai's own ``TMaRCo`` with its three models loaded by :func:`load_tmarco_model`.

    ``expert_weights`` is ``[anti_expert_weight, expert_weight]`` (`None`: TMaRCo's ``[-0.5, 0.5]``); ``revisions`` the
    hub commits of base, expert, anti-expert. Call ``rephrase(texts, scores=..., masked_outputs=...)`` by keyword.
    """
    from transformers import AutoTokenizer

    tmarco_cls = import_tmarco()
    base_revision, expert_revision, anti_expert_revision = revisions
    # what TMaRCo does with a tokenizer given by name, plus the revision it cannot pass
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_ref(base_model),
        is_split_into_words=True,
        add_prefix_space=True,
        **revision_kwargs(base_model, base_revision),
    )
    tokenizer.pad_token_id = tokenizer.eos_token_id
    # TMaRCo builds the tokenizer before the base model; give it a stand-in base and load the real one with its BOS id
    tmarco = tmarco_cls(
        base_model=object(), tokenizer=tokenizer, expert_weights=expert_weights, max_length=max_length, device=device
    )
    bos = tmarco.tokenizer.bos_token_id
    tmarco.base = load_tmarco_model(
        base_model, forced_bos_token_id=bos, max_length=max_length, device=device, revision=base_revision
    )
    tmarco.experts = [
        load_tmarco_model(ref, forced_bos_token_id=bos, device=device, revision=revision)
        for ref, revision in ((anti_expert, anti_expert_revision), (expert, expert_revision))
    ]
    tmarco.rephrase = _without_bpe_cleanup_notice(tmarco.rephrase)
    return tmarco


def _without_bpe_cleanup_notice(rephrase):
    """TMaRCo.rephrase, on this one object, without transformers' notice about its decoding arguments."""
    import functools

    @functools.wraps(rephrase)
    def run(*args, **kwargs):
        with drop_log_messages(*BPE_CLEANUP_NOTICE):
            return rephrase(*args, **kwargs)

    return run


# --- bitsandbytes 0.50 4-bit layers on CPU (QLoRA training without CUDA) -------------------------------------------
# On CPUs with AVX512-BF16, `Linear4bit.forward` repacks its weight in place into an inference-only layout the first
# time it runs in eval mode without grad (an evaluation pass). From then on it calls `gemv_4bit`, which has no
# autograd: after the first eval loss, no gradient flows through the frozen 4-bit layers, so every LoRA adapter below
# the last layer silently stops learning (torch only warns). The repacking also fails outright for layers narrower
# than the quantisation block (64), such as a small OPT's `project_in`.


def keep_bnb_4bit_trainable_on_cpu(model) -> int:
    """Keep ``model``'s 4-bit layers on the differentiable dequantise + matmul path; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


# --- caikit-nlp 0.5.15 (caikit installed --no-deps on NumPy 2) ------------------------------------------------
# caikit-nlp 0.5.15's local text generation builds `generate` arguments that go wrong on transformers 5 / our models:
# (1) it passes `seed` straight to `model.generate` when sampling; transformers 5 validates generate's keyword arguments
# and rejects it ("model_kwargs are not used by the model: ['seed']"), so every seeded sampling request fails with 400;
# (2) for GREEDY it sets no `do_sample`, so a model whose generation_config.json says `do_sample: true` (the offline
# zoo's OPT) samples although the request asked for greedy decoding (TGIS semantics: GREEDY is greedy).


def fix_caikit_nlp_generate_args() -> bool:
    """Make caikit-nlp seed torch's RNG (not ``generate``) and decode GREEDY greedily; True if installed now."""
    import inspect

    import torch
    from caikit_nlp.toolkit.text_generation import model_run_utils

    name = "__process_gen_args"
    original = getattr(model_run_utils, name)
    if getattr(original, "_detox_sft_wrapped", False):
        return False
    signature = inspect.signature(original)

    def process_gen_args(*args, **kwargs):
        params = original(*args, **kwargs)
        decoding = signature.bind(*args, **kwargs).arguments.get("decoding_method")
        if decoding != "SAMPLING":
            params["do_sample"] = False
        seed = params.pop("seed", None)
        if seed is not None:  # called right before model.generate: seed the sampling that follows
            torch.manual_seed(int(seed))
        return params

    process_gen_args._detox_sft_wrapped = True
    setattr(model_run_utils, name, process_gen_args)
    return True


# --- HateSonar 0.1.0 (its ONNX model needs the en_US.UTF-8 locale) ------------------------------------------------
# The package ships its classifier (TF-IDF + logistic regression, Davidson et al. 2017) as model/model.onnx. The
# graph's StringNormalizer (lower-casing) has no `locale` attribute, so onnxruntime constructs en_US.UTF-8 and fails to
# create the session on machines without that locale (CI's, this one's: only C, C.utf8 and POSIX exist). Its tokenizer
# keeps [a-zA-Z0-9_]+ only, so lower-casing under C.UTF-8 gives the same tokens.

HATESONAR_LOCALE = "C.UTF-8"


def hatesonar_session():
    """An onnxruntime session of HateSonar's shipped model with the normaliser's locale set to C.UTF-8."""
    from importlib.resources import files

    import onnx
    import onnxruntime

    model = onnx.load_from_string(files("hatesonar").joinpath("model", "model.onnx").read_bytes())
    for node in model.graph.node:
        if node.op_type == "StringNormalizer" and not any(a.name == "locale" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("locale", HATESONAR_LOCALE))
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --- Known upstream noise: silenced where it arises, and nowhere else ----------------------------------------------
# Each caller says which upstream call makes the noise it silences. Everything is undone when the block ends: the
# caller's warnings filters, loggers and progress-bar settings are as they were (importing the package changes none).


@contextlib.contextmanager
def drop_log_messages(logger_name: str, pattern: str) -> Iterator[None]:
    """Drop the records of the logger ``logger_name`` (that one only) whose message matches the regex ``pattern``."""
    logger = logging.getLogger(logger_name)
    regex = re.compile(pattern)

    def dropper(record: logging.LogRecord) -> bool:
        return not regex.search(record.getMessage())

    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


@contextlib.contextmanager
def ignore_warnings(*filters: tuple[str, type[Warning]]) -> Iterator[None]:
    """Ignore the warnings matching ``(message regex, category)`` pairs inside the block; the caller's filters stay."""
    with warnings.catch_warnings():
        for message, category in filters:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """No progress bars from datasets, transformers and huggingface_hub inside the block; restored afterwards.

    Our own bars and the Trainer's are unaffected; ``HF_DATASETS_DISABLE_PROGRESS_BARS`` / ``HF_HUB_...`` keep their say.
    """
    import datasets
    import huggingface_hub.utils as hub
    from huggingface_hub import constants as hub_constants
    from transformers.utils import logging as tf_logging

    datasets_on = (
        datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None and not datasets.are_progress_bars_disabled()
    )
    # transformers' switch turns huggingface_hub's bars off and on with its own
    transformers_on = hub_constants.HF_HUB_DISABLE_PROGRESS_BARS is None and tf_logging.is_progress_bar_enabled()
    hub_was_off = hub.are_progress_bars_disabled()
    if datasets_on:
        datasets.disable_progress_bars()
    if transformers_on:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            tf_logging.enable_progress_bar()
            if hub_was_off:
                hub.disable_progress_bars()


# TMaRCo.rephrase decodes with clean_up_tokenization_spaces=True (explicitly, and by BART's tokenizer default), which
# transformers 5 skips for BPE tokenizers, saying so on the first decode. The batched engine decodes the same way, to
# give the same texts. For drop_log_messages().
BPE_CLEANUP_NOTICE = (
    "transformers.tokenization_utils_tokenizers",
    r"Ignoring clean_up_tokenization_spaces=True for BPE",
)

# transformers 5.24 deprecated PreTrainedModel.is_gradient_checkpointing (a FutureWarning on every read); peft 0.21's
# PeftModel.__init__ still reads it, so building or loading any adapter warns. For ignore_warnings().
PEFT_READS_IS_GRADIENT_CHECKPOINTING = (r"`is_gradient_checkpointing` is deprecated", FutureWarning)
