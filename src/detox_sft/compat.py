"""Shims for upstream breakages, all in one place; each has a test in tests/test_compat.py that fails when the shim is
no longer right or no longer needed."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import re
import sys
import warnings
from collections.abc import Iterator

from detox_sft.refs import resolve_ref, revision_kwargs

# --- TrustyAI TMaRCo (trustyai 0.6.4 without its [detoxify] extra, transformers 5) -------------------------------
# trustyai's tmarco module imports `transformers.Conversation` (removed in 4.42) in the try-block that defines TMaRCo,
# so it only warns and defines no TMaRCo. Its loaders pass `max_length` / `forced_bos_token_id` to `from_pretrained`,
# which BART's constructor rejects on transformers 5, and `load_models` reads a bare relative expert name as a hub id
# of a causal LM: we load the models ourselves and hand TMaRCo the objects.

TMARCO_MODULE = "trustyai.language.detoxify.tmarco"


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
    """Let TMaRCo.rephrase's ``np.argmax`` take torch logits on CUDA (numpy's TypeError); True if installed now."""
    if isinstance(module.np, _NumpyArgmaxOnAnyDevice):
        return False
    module.np = _NumpyArgmaxOnAnyDevice(module.np)
    return True


def import_tmarco() -> type:
    """Import trustyai's ``TMaRCo`` class with the ``Conversation`` and ``argmax`` shims applied."""
    ensure_transformers_conversation()
    if TMARCO_MODULE in sys.modules and not hasattr(sys.modules[TMARCO_MODULE], "TMaRCo"):
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
    revision: str | None = None,
):
    """Load a TMaRCo base or expert (hub id, local directory or ``zoo:<name>``) as trustyai means to, on transformers 5,
    with ``max_length`` / ``forced_bos_token_id`` in its ``generation_config`` (BART's ``from_pretrained`` rejects them)."""
    from transformers import AutoModelForSeq2SeqLM

    path = resolve_ref(ref)
    try:
        with library_progress_bars_off():  # transformers' 'Loading weights' bar, three times per TMaRCo
            model = AutoModelForSeq2SeqLM.from_pretrained(path, **revision_kwargs(ref, revision))
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
    max_length: int = 150,  # TMaRCo.__init__'s default for the base model
    revisions: tuple[str | None, str | None, str | None] = (None, None, None),
):
    """trustyai's own ``TMaRCo`` with its models loaded by :func:`load_tmarco_model` (``revisions``: base, expert,
    anti-expert); call ``rephrase(texts, scores=..., masked_outputs=...)`` by keyword."""
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
    # on this one object, without transformers' notice about rephrase's decoding arguments (a context decorator)
    tmarco.rephrase = drop_log_messages(*BPE_CLEANUP_NOTICE)(tmarco.rephrase)
    return tmarco


# --- bitsandbytes 0.50 4-bit layers on CPU (QLoRA training without CUDA) -------------------------------------------
# On CPUs with AVX512-BF16, `Linear4bit.forward` repacks its weight in place into an inference-only layout the first
# time it runs in eval mode without grad (an eval pass), then calls `gemv_4bit`, which has no autograd: every LoRA
# adapter below the last layer silently stops learning (torch only warns). The repacking also fails outright for layers
# narrower than the quantisation block (64), such as a small OPT's `project_in`.


def keep_bnb_4bit_trainable_on_cpu(model) -> int:
    """Keep ``model``'s 4-bit layers on the differentiable dequantise + matmul path; returns how many were changed."""
    layers = [module for module in model.modules() if getattr(module, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# --- caikit-nlp 0.5.15 (caikit installed --no-deps on NumPy 2) ------------------------------------------------
# caikit-nlp 0.5.15's local text generation builds `generate` arguments that go wrong on transformers 5 / our models:
# (1) it passes `seed` to `model.generate`, which transformers 5 rejects ("model_kwargs are not used by the model:
# ['seed']"): every seeded sampling request fails with 400; (2) GREEDY sets no `do_sample`, so a model whose
# generation_config.json says `do_sample: true` (the zoo's OPT) samples, though TGIS's GREEDY is greedy.


def fix_caikit_nlp_generate_args() -> bool:
    """Make caikit-nlp seed torch's RNG (not ``generate``) and decode GREEDY greedily; True if installed now."""
    import torch
    from caikit_nlp.toolkit.text_generation import model_run_utils

    name = "__process_gen_args"
    original = getattr(model_run_utils, name)
    if getattr(original, "_detox_sft_wrapped", False):
        return False
    signature = inspect.signature(original)

    def process_gen_args(*args, **kwargs):
        params = original(*args, **kwargs)
        if signature.bind(*args, **kwargs).arguments.get("decoding_method") != "SAMPLING":
            params["do_sample"] = False
        if (seed := params.pop("seed", None)) is not None:  # called right before model.generate: seed what follows
            torch.manual_seed(int(seed))
        return params

    process_gen_args._detox_sft_wrapped = True
    setattr(model_run_utils, name, process_gen_args)
    return True


# --- HateSonar 0.1.0 (its ONNX model needs the en_US.UTF-8 locale) ------------------------------------------------
# The shipped model/model.onnx's StringNormalizer (lower-casing) has no `locale`, so onnxruntime constructs en_US.UTF-8
# and fails on machines without that locale (CI's: only C, C.utf8 and POSIX). Its tokenizer keeps [a-zA-Z0-9_]+ only,
# so lower-casing under C.UTF-8 gives the same tokens.


def hatesonar_session():
    """An onnxruntime session of HateSonar's shipped model with the normaliser's locale set to C.UTF-8."""
    from importlib.resources import files

    import onnx
    import onnxruntime

    model = onnx.load_from_string(files("hatesonar").joinpath("model", "model.onnx").read_bytes())
    for node in model.graph.node:
        if node.op_type == "StringNormalizer" and not any(a.name == "locale" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --- Known upstream noise: silenced where it arises, and nowhere else ----------------------------------------------
# Each caller says which upstream call makes the noise it silences. Everything is undone when the block ends: the
# caller's warnings filters, loggers and progress-bar settings are as they were (importing the package changes none).


@contextlib.contextmanager
def drop_log_messages(logger_name: str, pattern: str) -> Iterator[None]:
    """Drop the records of the logger ``logger_name`` (that one only) whose message matches the regex ``pattern``."""
    logger = logging.getLogger(logger_name)
    regex = re.compile(pattern)
    dropper = lambda record: not regex.search(record.getMessage())  # noqa: E731
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
    """No progress bars from datasets, transformers and huggingface_hub inside the block (ours and the Trainer's stay);
    restored afterwards, and the ``HF_*_DISABLE_PROGRESS_BARS`` variables keep their say."""
    import datasets
    import huggingface_hub.utils as hub
    from huggingface_hub import constants as hub_constants
    from transformers.utils import logging as tf_logging

    with contextlib.ExitStack() as restore:  # its callbacks run last-in, first-out
        if datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None and not datasets.are_progress_bars_disabled():
            datasets.disable_progress_bars()
            restore.callback(datasets.enable_progress_bars)
        # transformers' switch turns huggingface_hub's bars off and on with its own
        if hub_constants.HF_HUB_DISABLE_PROGRESS_BARS is None and tf_logging.is_progress_bar_enabled():
            if hub.are_progress_bars_disabled():
                restore.callback(hub.disable_progress_bars)
            tf_logging.disable_progress_bar()
            restore.callback(tf_logging.enable_progress_bar)
        yield


# TMaRCo.rephrase (and the batched engine, to give the same texts) decodes with clean_up_tokenization_spaces=True,
# which transformers 5 skips for BPE tokenizers, saying so on the first decode. For drop_log_messages().
BPE_CLEANUP_NOTICE = (
    "transformers.tokenization_utils_tokenizers",
    r"Ignoring clean_up_tokenization_spaces=True for BPE",
)

# transformers 5.24 deprecated PreTrainedModel.is_gradient_checkpointing (a FutureWarning on every read); peft 0.21's
# PeftModel.__init__ still reads it, so building or loading any adapter warns. For ignore_warnings().
PEFT_READS_IS_GRADIENT_CHECKPOINTING = (r"`is_gradient_checkpointing` is deprecated", FutureWarning)
