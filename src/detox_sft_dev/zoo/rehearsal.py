"""Rehearsal models: the tutorial's hub models at their exact published sizes, with random weights, built locally.

``recipes/rehearsal.yaml`` is the tutorial recipe with every hub model replaced by one of these, so that the whole
tutorial runs at full size (time, memory, disk) where the hub cannot be reached. The numbers such a run produces mean
nothing: the weights are random.

* ``zoo:rehearsal-opt``: facebook/opt-350m's :class:`~transformers.OPTConfig` (hidden 1024, 24 layers, 16 heads, FFN
  4096, ``word_embed_proj_dim`` 512, ``do_layer_norm_before`` false, 2048 positions, 50272 embedding rows), saved in
  float16 as the hub's checkpoint is;
* ``zoo:rehearsal-bart``, ``zoo:rehearsal-expert``, ``zoo:rehearsal-anti-expert``: facebook/bart-large's
  :class:`~transformers.BartConfig` (d_model 1024, 12+12 layers, 16 heads, FFN 4096, vocabulary 50265, 1024
  positions), three seeds (trustyai/gplus and gminus are fine-tuned bart-large models), float32 as on the hub;
* ``zoo:rehearsal-scorer``: facebook/roberta-hate-speech-dynabench-r4-target's
  :class:`~transformers.RobertaConfig` (roberta-base-sized: hidden 768, 12 layers, 12 heads, intermediate 3072,
  vocabulary 50265, 514 positions; labels ``nothate``/``hate``), float32. A random classifier scores about 0.5
  everywhere, so the rehearsal gates with the offline scorer; this one only costs what the real one costs.

The tokenizer is a byte-level BPE trained on the zoo corpora's sentence family and general English, with the real
special ids (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, BART's and RoBERTa's ``<mask>``=50264) and the real
vocabulary size (50265 entries): the BPE learns what it can from the text, and the rest of the ids are placeholder
tokens that no merge produces (each decodes to a word of its own), so every id a random model emits decodes.

Random initialisation needs no training: building is config + save (safetensors), each artifact on first use, into
``<cache>/rehearsal-<hash>/`` (5.7 GiB for all five; never in the repository), under a file lock and through a
temporary directory renamed into place. The demo zoo's build (:mod:`detox_sft_dev.zoo.build`) never builds these.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detox_sft_dev.zoo import corpus
from detox_sft_dev.zoo.build import ZooError, _file_lock, _general_english, _log, _versions, cache_root

__all__ = [
    "BART_LARGE",
    "OPT_350M",
    "REHEARSAL_NAMES",
    "ROBERTA_HATE_SPEECH",
    "TOKENIZER_VOCAB",
    "ensure_rehearsal",
    "is_rehearsal_name",
    "rehearsal_dir",
]

# facebook/opt-350m's config.json (as its fine-tunes on the hub copy it; the hub is unreachable here)
OPT_350M: dict[str, Any] = {
    "vocab_size": 50272,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "ffn_dim": 4096,
    "num_attention_heads": 16,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": 512,
    "do_layer_norm_before": False,
    "activation_function": "relu",
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "layerdrop": 0.0,
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
    "init_std": 0.02,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
}
# facebook/bart-large's config.json
BART_LARGE: dict[str, Any] = {
    "vocab_size": 50265,
    "d_model": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "max_position_embeddings": 1024,
    "activation_function": "gelu",
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "init_std": 0.02,
    "scale_embedding": False,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "forced_eos_token_id": 2,
}
# facebook/roberta-hate-speech-dynabench-r4-target's config.json (its copies on the hub; 499 MB of float32 weights)
ROBERTA_HATE_SPEECH: dict[str, Any] = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "id2label": {0: "nothate", 1: "hate"},
    "label2id": {"nothate": 0, "hate": 1},
    "problem_type": "single_label_classification",
}
# entries of GPT-2's byte-level BPE as RoBERTa, BART and OPT ship it (<mask> last, 50264)
TOKENIZER_VOCAB = 50265
_SEED = 2024
# Bump when the build code changes what it writes: the directory's hash covers this, the sizes above and the library
# versions, not the source (a comment, or an edit of the corpus generator, whose exact text the tokenizer does not
# need, never rebuilds 6 GB; and a process never sees its own models' directory move while it runs).
_BUILD_VERSION = 1

REHEARSAL_NAMES = ("rehearsal-opt", "rehearsal-bart", "rehearsal-expert", "rehearsal-anti-expert", "rehearsal-scorer")


def is_rehearsal_name(name: str) -> bool:
    """Whether ``name`` (without ``zoo:``) is one of :data:`REHEARSAL_NAMES` (dashes and underscores alike)."""
    return name.strip().lower().replace("_", "-") in REHEARSAL_NAMES


def _hash() -> str:
    spec = {
        "build": _BUILD_VERSION,
        "opt": OPT_350M,
        "bart": BART_LARGE,
        "roberta": {k: v for k, v in ROBERTA_HATE_SPEECH.items() if k != "id2label"},
        "vocab": TOKENIZER_VOCAB,
        "seed": _SEED,
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def rehearsal_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the rehearsal models of this build live (whether built or not): ``<cache>/rehearsal-<hash>``."""
    return cache_root(cache_dir) / f"rehearsal-{_hash()}"


def ensure_rehearsal(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of a rehearsal model (model + tokenizer), building it first if needed (config + save).

    Args:
        name: one of :data:`REHEARSAL_NAMES` (``rehearsal-opt``, ...).
        cache_dir: directory that holds zoos (default ``$DETOX_SFT_CACHE`` or ``~/.cache/detox-sft``).

    Raises:
        ZooError: unknown name, or the build failed (nothing half-built is left behind as done).
    """
    key = name.strip().lower().replace("_", "-")
    if key not in REHEARSAL_NAMES:
        raise ZooError(f"unknown rehearsal model {name!r}. Fix: use one of {', '.join(REHEARSAL_NAMES)}.")
    root = rehearsal_dir(cache_dir)
    tokenizers = _built(root, "tokenizer", _build_tokenizers)
    kind = key.removeprefix("rehearsal-")
    return _built(root, kind, lambda out: _BUILDERS[kind](tokenizers, out))


def _built(root: Path, kind: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """``root/kind``, built by ``build(tmp)`` in a temporary directory renamed into place once complete."""
    target = root / kind
    if (target / "manifest.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / f"{root.name}-{kind}.lock"):
        if (target / "manifest.json").is_file():  # built by another process while we waited
            return target
        _remove_stale(root)
        shutil.rmtree(target, ignore_errors=True)  # without a manifest it is not ours to trust
        for stale in root.glob(f".{kind}-build-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-build-", dir=root))
        started = time.perf_counter()
        _log(f"building the rehearsal {kind} in {target} (random weights: config + save)")
        try:
            manifest = build(tmp)
            manifest.update(
                hash=root.name.removeprefix("rehearsal-"),
                bytes_on_disk=sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()),
                build_seconds=round(time.perf_counter() - started, 1),
                versions=_versions(),
            )
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            os.rename(tmp, target)
        except BaseException as exc:  # Ctrl-C too: the half-built directory is removed, then the error goes on
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Exception):
                raise ZooError(
                    f"building the rehearsal {kind} failed: {exc!r}. Fix: see the traceback above; remove {target} "
                    "to start clean."
                ) from exc
            raise
        _log(f"rehearsal {kind}: {manifest['bytes_on_disk'] / 2**30:.2f} GiB in {manifest['build_seconds']} s")
    return target


def _remove_stale(root: Path) -> None:
    """Rehearsal directories of other builds (gigabytes nothing uses any more) and their lock files."""
    for other in root.parent.glob("rehearsal-*"):
        if other.is_dir() and other != root:
            _log(f"removing the stale rehearsal models {other}")
            shutil.rmtree(other, ignore_errors=True)
        elif other.suffix == ".lock" and not other.name.startswith(f"{root.name}-"):
            other.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------- build


def _tokenizer_texts() -> list[str]:
    """The zoo corpora's sentence family (toxic and not) and Python's reference prose (general English)."""
    return [*corpus.make_pretraining_texts(8000, seed=_SEED), *_general_english()]


def _placeholder_vocab(vocab: dict[str, int], size: int) -> dict[str, int]:
    """``vocab`` filled up to ``size`` ids with tokens no merge produces; each decodes to a word of its own."""
    filled = dict(vocab)
    i = 0
    while len(filled) < size:
        token = f"\u0120x{i}"  # byte-level BPE's space marker: decodes to " x<i>"
        if token not in filled:
            filled[token] = len(filled)
        i += 1
    return filled


def _build_tokenizers(out: Path) -> dict[str, Any]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - 1,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_texts(), trainer=trainer)
    spec = json.loads(bpe.to_str())
    learned = len(spec["model"]["vocab"])

    def tokenizer(prefix_space: bool, template: processors.TemplateProcessing, mask: bool) -> Tokenizer:
        # BART's and RoBERTa's last id is <mask>; OPT's tokenizer has as many entries, all of them BPE tokens
        filled = {**spec, "model": {**spec["model"]}}
        filled["model"]["vocab"] = _placeholder_vocab(spec["model"]["vocab"], TOKENIZER_VOCAB - int(mask))
        tok = Tokenizer.from_str(json.dumps(filled))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
        tok.post_processor = template
        if mask:
            tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
        return tok

    pair = "<s> $A </s> </s> $B </s>"
    framing = processors.TemplateProcessing(single="<s> $A </s>", pair=pair, special_tokens=[("<s>", 0), ("</s>", 2)])
    saved = {
        # OPT prepends </s> as bos and appends nothing
        "opt": (
            tokenizer(
                False,
                processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]),
                mask=False,
            ),
            {"bos_token": "</s>", "eos_token": "</s>"},
            "GPT2Tokenizer",
            OPT_350M["max_position_embeddings"],
        ),
        # TMaRCo loads BART's tokenizer with add_prefix_space=True
        "bart": (tokenizer(True, framing, mask=True), {"bos_token": "<s>", "eos_token": "</s>"}, "BartTokenizer", 1024),
        "roberta": (
            tokenizer(False, framing, mask=True),
            {"bos_token": "<s>", "eos_token": "</s>"},
            "RobertaTokenizer",
            512,
        ),
    }
    for name, (tok, ends, cls, max_length) in saved.items():
        masks = {"mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"} if name != "opt" else {}
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", model_max_length=max_length, **ends, **masks
        )
        fast.save_pretrained(out / name)
        cfg_path = out / name / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = cls  # the class the hub model's files name
        if name == "bart":
            cfg["add_prefix_space"] = True
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if len(AutoTokenizer.from_pretrained(out / name)) != TOKENIZER_VOCAB:
            raise ZooError(f"the rehearsal {name} tokenizer does not have {TOKENIZER_VOCAB} entries")
    return {"learned_tokens": learned, "tokenizer_entries": TOKENIZER_VOCAB}


def _save(model: Any, tokenizer_dir: Path, out: Path, dtype: Any = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)  # safetensors
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "weights": "random (the config's initialisation), no training",
    }


def _build_opt(tokenizers: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, OPTConfig, OPTForCausalLM

    torch.manual_seed(_SEED)
    model = OPTForCausalLM(OPTConfig(**OPT_350M)).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1)
    return {"config": "facebook/opt-350m", **_save(model, tokenizers / "opt", out, dtype=torch.float16)}


def _bart(seed: int) -> Callable[[Path, Path], dict[str, Any]]:
    def build(tokenizers: Path, out: Path) -> dict[str, Any]:
        import torch
        from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

        torch.manual_seed(seed)
        model = BartForConditionalGeneration(BartConfig(**BART_LARGE)).eval()
        # max_length / forced_bos_token_id belong in the generation config (transformers 5 rejects them as config
        # kwargs), as in the zoo's BARTs
        model.generation_config = GenerationConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            decoder_start_token_id=2,
            forced_bos_token_id=0,
            forced_eos_token_id=2,
            max_length=BART_LARGE["max_position_embeddings"],
        )
        return {"config": "facebook/bart-large", "seed": seed, **_save(model, tokenizers / "bart", out)}

    return build


def _build_scorer(tokenizers: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(_SEED + 10)
    model = RobertaForSequenceClassification(RobertaConfig(**ROBERTA_HATE_SPEECH)).eval()
    return {"config": "facebook/roberta-hate-speech-dynabench-r4-target", **_save(model, tokenizers / "roberta", out)}


# the three BARTs differ by seed: two identical experts would never disagree (every score 0/0)
_BUILDERS: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
    "opt": _build_opt,
    "bart": _bart(_SEED + 1),
    "expert": _bart(_SEED + 2),
    "anti-expert": _bart(_SEED + 3),
    "scorer": _build_scorer,
}
