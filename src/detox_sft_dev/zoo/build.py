"""The offline zoo: small models and corpora built by code on first use, so the whole pipeline runs without the hub.

What gets built (into ``<cache>/zoo-<hash>``, where the hash covers this module's and :mod:`detox_sft_dev.zoo.corpus`'s source
and the versions of the libraries that write the files):

* ``rtp/train.jsonl`` and ``wiki_toxic/{train,validation,test}.jsonl``: synthetic corpora in the schemas of
  allenai/real-toxicity-prompts and OxAISH-AL-LLM/wiki_toxic (see :mod:`detox_sft_dev.zoo.corpus`);
* ``tokenizer/``: a byte-level BPE trained here with OPT's special tokens (``<s>``=0, ``<pad>``=1, ``</s>``=2,
  ``<unk>``=3; ``</s>`` is prepended as bos, as OPT's tokenizer does); ``bart-tokenizer/`` is the same vocabulary
  with ``<mask>`` appended and BART's ``<s> ... </s>`` framing;
* ``opt/``: a small :class:`~transformers.OPTForCausalLM` with opt-350m's quirks (``word_embed_proj_dim`` !=
  ``hidden_size`` so ``project_in``/``project_out`` exist, ``do_layer_norm_before=False``), pretrained briefly on
  web-like text of the corpus family (a third of it toxic, so the base model is somewhat toxic, like a real one);
* ``llama/``: a small :class:`~transformers.LlamaForCausalLM` (grouped-query attention, RMSNorm, rotary positions,
  SwiGLU) pretrained briefly on the same texts with the same tokenizer: a second architecture for "your own model"
  (``training.base_model: zoo:llama``). Built last, on its own seed, so the other artifacts stay bit-identical;
* ``bart-base/``: a small :class:`~transformers.BartForConditionalGeneration` pretrained by mask infilling;
  ``expert/`` and ``anti-expert/``: the base fine-tuned on the non-toxic and on the toxic part of the RTP corpus, with
  the very input format TMaRCo's ``score`` and ``rephrase`` build (one token replaced by ``</s><mask>``,
  ``<pad><mask>`` or ``<mask>``). With a build budget of a few hundred steps, each expert's own half is masked at its
  slot words (where the halves differ), and both replay the same context masks (non-slot positions) from the whole
  corpus, so they stay equally fluent around words one half never shows and disagree where toxic words sit;
* ``lexicon.json``: the words only the generator's toxic fillers use (``{"toxic_words": [...]}``, from
  :func:`detox_sft_dev.zoo.corpus.toxic_lexicon`): the synthetic world's exact judge, ``zoo:lexicon`` as a scorer;
* ``manifest.json``: what was built, the scorer that built the corpus (``profanity-check``), sizes, seconds.

The build runs in a temporary directory that is renamed into place when complete (a crash never leaves a half zoo
that looks done), under a file lock (two processes never build at once), and prints its progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detox_sft.prompts import format_sample
from detox_sft_dev.zoo import corpus
from detox_sft_dev.zoo.corpus import BENIGN_WORDS, CORPUS_SCORER, TOXIC_WORDS

__all__ = ["ZOO_NAMES", "Zoo", "ZooError", "build_hash", "cache_root", "ensure_zoo", "resolve", "zoo_dir"]

# The build code as it was when imported: a process that imported an older version must not build it under the hash
# of the file now on disk. (corpus is stdlib-only and cheap to import.)
_SOURCES_AT_IMPORT = [inspect.getsource(sys.modules[__name__]), inspect.getsource(corpus)]

ZOO_NAMES = (
    "opt",
    "bart-base",
    "expert",
    "anti-expert",
    "tokenizer",
    "bart-tokenizer",
    "rtp",
    "wiki_toxic",
    "lexicon",
    "llama",
)

# Sizes: small enough that training/generation tests run in seconds on CPU, big enough to be real language models.
_SEED = 1234
_RTP_SIZE = 4000
_PRETRAIN_SIZE = 4000
_VOCAB_SIZE = 4096
_OPT = {
    "hidden_size": 128,
    "word_embed_proj_dim": 64,
    "num_hidden_layers": 2,
    "ffn_dim": 512,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    # Post-LN (opt-350m's do_layer_norm_before=False) with tied embeddings barely trains from OPT's 0.02 init in the
    # build budget (held-out loss 4.1 nats/token, worse than a bigram model's 2.6: a near-unigram model whose
    # generations ignore the prompt); 0.05 reaches 1.0 in the same 250 steps, and the model learns the sentences.
    "init_std": 0.05,
}
# Llama-shaped, about opt's size; pre-norm trains from the default init in one epoch (held-out-like loss ~1.1).
_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
_BART = {
    "d_model": 128,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_ffn_dim": 256,
    "decoder_ffn_dim": 256,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "max_position_embeddings": 128,
}


class ZooError(RuntimeError):
    """The zoo cannot be built or an artifact name is unknown."""


@dataclass
class Zoo:
    """Paths of the offline zoo's artifacts.

    Attributes:
        root: the zoo directory (``<cache>/zoo-<hash>``).
        opt: small OPT (model + tokenizer), loadable with ``AutoModelForCausalLM``.
        bart_base, expert, anti_expert: small BARTs (model + tokenizer + generation config) for TMaRCo.
        tokenizer: the OPT tokenizer alone; bart_tokenizer: the BART one (with ``<mask>``).
        rtp: JSONL file in the allenai/real-toxicity-prompts schema (split ``train``).
        wiki_toxic: directory of ``train/validation/test.jsonl`` in the OxAISH-AL-LLM/wiki_toxic schema.
        lexicon: ``lexicon.json``, the toxic fillers' own words (the exact judge; a scorer as ``zoo:lexicon``).
        llama: small Llama (model + the OPT tokenizer), loadable with ``AutoModelForCausalLM``.
        build_seconds: how long the build took (from the manifest).
        manifest: the build manifest (sizes, versions, scorer, timings).
    """

    root: Path
    opt: Path
    bart_base: Path
    expert: Path
    anti_expert: Path
    tokenizer: Path
    bart_tokenizer: Path
    rtp: Path
    wiki_toxic: Path
    lexicon: Path
    llama: Path
    build_seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path) -> Zoo:
        """The zoo whose files live under ``root`` (read its manifest)."""
        manifest = json.loads((root / "manifest.json").read_text())
        return cls(
            root=root,
            opt=root / "opt",
            bart_base=root / "bart-base",
            expert=root / "expert",
            anti_expert=root / "anti-expert",
            tokenizer=root / "tokenizer",
            bart_tokenizer=root / "bart-tokenizer",
            rtp=root / "rtp" / "train.jsonl",
            wiki_toxic=root / "wiki_toxic",
            lexicon=root / "lexicon.json",
            llama=root / "llama",
            build_seconds=float(manifest.get("build_seconds", 0.0)),
            manifest=manifest,
        )

    def path(self, name: str) -> Path:
        """The path of an artifact by its zoo name (``opt``, ``bart-base``, ``expert``, ``rtp``, ...)."""
        key = name.strip().lower().replace("-", "_")
        if key not in {n.replace("-", "_") for n in ZOO_NAMES}:
            raise ZooError(f"unknown zoo artifact {name!r}. Fix: use one of {', '.join(ZOO_NAMES)} (as zoo:<name>).")
        return getattr(self, key)


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def build_hash(sources: Sequence[str] | None = None, versions: dict[str, str] | None = None) -> str:
    """Hash of the build code and library versions: a change in either means a new zoo directory.

    Args:
        sources: source texts to hash (default: this module and :mod:`detox_sft_dev.zoo.corpus`).
        versions: library versions (default: torch, transformers, tokenizers as installed).

    Returns:
        12 hex digits.
    """
    if sources is None:
        sources = _SOURCES_AT_IMPORT
    versions = _versions() if versions is None else versions
    h = hashlib.sha256()
    for src in sources:
        h.update(src.encode())
        h.update(b"\0")
    h.update(json.dumps(versions, sort_keys=True).encode())
    return h.hexdigest()[:12]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory that holds zoos: ``cache_dir``, else ``$DETOX_SFT_CACHE``, else ``~/.cache/detox-sft``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("DETOX_SFT_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "detox-sft"


def zoo_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the zoo for the current build code lives (whether built or not)."""
    return cache_root(cache_dir) / f"zoo-{build_hash()}"


def _log(msg: str) -> None:
    print(f"[detox-sft zoo] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is building the zoo; waiting for the lock {path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_zoo(cache_dir: str | os.PathLike[str] | None = None) -> Zoo:
    """Return the offline zoo, building it first if this build code has not built it yet.

    Args:
        cache_dir: directory that holds zoos (default ``$DETOX_SFT_CACHE`` or ``~/.cache/detox-sft``).

    Returns:
        The :class:`Zoo` with the artifacts' paths.

    Raises:
        ZooError: the build failed (the message says why; nothing half-built is left behind as done).
    """
    target = zoo_dir(cache_dir)
    if (target / "manifest.json").is_file():
        return Zoo.at(target)
    with _file_lock(target.parent / f"{target.name}.lock"):
        if (target / "manifest.json").is_file():  # built by another process while we waited
            return Zoo.at(target)
        if target.exists():  # a directory without manifest is not ours to trust
            shutil.rmtree(target)
        for stale in target.parent.glob(f".{target.name}-build-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
        try:
            _log(f"building the offline zoo in {target} (once; about a minute or two on CPU)")
            _build(tmp)
            os.rename(tmp, target)
        except BaseException as exc:  # Ctrl-C too: the half-built directory is removed, then the error goes on
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Exception):
                raise ZooError(
                    f"building the offline zoo failed: {exc!r}. Fix: see the traceback above; remove "
                    f"{target.parent} to start clean."
                ) from exc
            raise
    zoo = Zoo.at(target)
    _log(f"done in {zoo.build_seconds:.1f} s: {target}")
    return zoo


def resolve(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local path of a zoo artifact by name (building the zoo on first use).

    Args:
        name: one of ``opt``, ``bart-base``, ``expert``, ``anti-expert``, ``tokenizer``, ``bart-tokenizer``, ``rtp``,
            ``wiki_toxic``, ``lexicon``, ``llama`` (dashes and underscores are interchangeable).
        cache_dir: see :func:`ensure_zoo`.

    Raises:
        ZooError: unknown name.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in {n.replace("-", "_") for n in ZOO_NAMES}:
        raise ZooError(f"unknown zoo artifact {name!r}. Fix: use one of {', '.join(ZOO_NAMES)} (as zoo:<name>).")
    return ensure_zoo(cache_dir).path(key)


# --------------------------------------------------------------------------------------------------------- build


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


# A recipe's cpu_isa -> the environment that pins each library's CPU kernels to that instruction set. Float results
# (and so the sampled tokens) depend on the vector width a library dispatches to: torch's ATen kernels (softmax,
# layer norm, reductions), oneDNN's, MKL's GEMM; numpy's own SIMD loops (exp, sums: the perplexities' last digit
# differed on AVX-512) and OpenBLAS's kernels. Read when each library loads, so they are set for child processes
# (the notebook kernels, the model server, the zoo's build), never in a process that has loaded them already.
# The zoo is always built under the AVX2 pins, so every x86-64 machine with AVX2 builds the same weights.
CPU_PINS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy 2.4's dispatch targets above AVX2
        "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS's AVX2 kernels (numpy's and scipy's)
    },
}


def _build(out: Path) -> None:
    """Build into ``out`` in a child process of this Python, which runs torch on one thread (``OMP_NUM_THREADS=1``).

    Why a child: one thread is a process-wide setting (these models are tiny, and on a shared 2-core machine two
    threads contend and run ~10x slower), and library code must not change it in the caller's process; the child
    gets it from its environment at start-up, so no code sets it.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **CPU_PINS["avx2"]}
    # offline by construction; and transformers writes the flag into each tokenizer_config.json as local_files_only,
    # so leaving it to the caller's environment made two builds of one hash differ in those files
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    src = str(Path(__file__).resolve().parents[2])  # the directory holding detox_sft, importable in the child
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    code = "import sys; from detox_sft_dev.zoo.build import _build_here; _build_here(sys.argv[1], sys.argv[2])"
    run = subprocess.run([sys.executable, "-c", code, str(out), build_hash()], env=env, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"the zoo build process exited with code {run.returncode}")


def _build_here(out: str, expected_hash: str) -> None:
    """The child's side of :func:`_build`: check that it runs the build code its parent hashed, then build."""
    import torch

    if build_hash() != expected_hash:
        raise ZooError(
            f"the zoo build code on disk (hash {build_hash()}) is not the one the calling process imported "
            f"({expected_hash}). Fix: restart the calling process (a notebook: restart the kernel)."
        )
    if torch.get_num_threads() != 1:  # the bytes of the zoo depend on it (float sums): never build on another count
        raise ZooError(f"the zoo build runs on {torch.get_num_threads()} threads, not 1: start it through _build.")
    _build_steps(Path(out), time.perf_counter(), {})


def _build_steps(out: Path, t0: float, timings: dict[str, float]) -> None:
    import torch

    torch.manual_seed(_SEED)
    random.seed(_SEED)

    def tick(step: str) -> None:
        timings[step] = round(time.perf_counter() - t0 - sum(timings.values()), 2)
        _log(f"{step}: {timings[step]:.1f} s")

    rtp = corpus.make_rtp_records(_RTP_SIZE, seed=_SEED)
    _write_jsonl(out / "rtp" / "train.jsonl", rtp)
    wiki = corpus.make_wiki_toxic_records(seed=_SEED + 7)
    for split, rows in wiki.items():
        _write_jsonl(out / "wiki_toxic" / f"{split}.jsonl", rows)
    (out / "lexicon.json").write_text(json.dumps({"toxic_words": corpus.toxic_lexicon()}, indent=2))
    pretrain = corpus.make_pretraining_texts(_PRETRAIN_SIZE, seed=_SEED + 11)
    tick("corpora")

    formatted = [format_sample(r["prompt"]["text"], r["continuation"]["text"]) for r in rtp[:500]]
    opt_tok, bart_tok = _train_tokenizers([*pretrain, *formatted, *_general_english()], out)
    tick("tokenizers")

    _build_opt(opt_tok, pretrain, out / "opt")
    tick("opt")

    # Whole sentences, as the rephrase step sees them (prompt + continuation). Continuations alone (slot word first)
    # taught the experts to disagree at every sentence's first token.
    texts = [f"{r['prompt']['text']} {r['continuation']['text']}" for r in rtp]
    toxic = [max(r["prompt"]["toxicity"] or 0.0, r["continuation"]["toxicity"]) >= 0.5 for r in rtp]
    replay = [texts[i] for i in random.Random(_SEED).sample(range(len(texts)), len(rtp))]
    base = _train_bart(bart_tok, pretrain, None, epochs=1, lr=3e-3, seed=_SEED, copy_loss=True)
    _save_bart(base, bart_tok, out / "bart-base")
    tick("bart-base")
    for name, keep in (("expert", False), ("anti-expert", True)):
        part = [t for t, tox in zip(texts, toxic, strict=True) if tox == keep]
        # Each expert learns the slot fillers of its half; both replay the same context masks from the whole corpus
        # so that they stay equally fluent around words one half never shows (and disagree only where it matters).
        model = _train_bart(
            bart_tok,
            part,
            out / "bart-base",
            epochs=1,
            lr=1e-3,
            seed=_SEED + len(name),
            replay=replay,
        )
        _save_bart(model, bart_tok, out / name)
        tick(name)

    # Last: nothing built above depends on it, and its seed is its own (see _build_llama).
    _build_llama(opt_tok, pretrain, out / "llama")
    tick("llama")

    manifest = {
        "hash": build_hash(),
        "scorer": CORPUS_SCORER,
        "versions": _versions(),
        "seed": _SEED,
        "sizes": {
            "rtp": len(rtp),
            **{f"wiki_toxic/{k}": len(v) for k, v in wiki.items()},
            "pretraining_texts": len(pretrain),
            "vocab": len(opt_tok),
            "bart_vocab": len(bart_tok),
        },
        "opt": _OPT,
        "bart": _BART,
        "llama": _LLAMA,
        "timings": timings,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _general_english() -> list[str]:
    """General English prose for the tokenizer (Python's own reference text, shipped with every CPython).

    The corpora use a few hundred words; without other text the BPE would spell most English words letter by letter.
    """
    import pydoc_data.topics

    return [line.strip() for text in pydoc_data.topics.topics.values() for line in text.splitlines() if line.strip()]


def _train_tokenizers(texts: Sequence[str], out: Path) -> tuple[Any, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # OPT prepends </s> as bos and appends nothing.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    opt_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=_OPT["max_position_embeddings"],
    )
    opt_tok.save_pretrained(out / "tokenizer")

    btok = Tokenizer.from_str(tok.to_str())
    # TMaRCo loads BART tokenizers with add_prefix_space=True: every word, the first too, starts with a space.
    btok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    btok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    from tokenizers import AddedToken

    btok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
    bart_tok = PreTrainedTokenizerFast(
        tokenizer_object=btok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=_BART["max_position_embeddings"],
    )
    bart_tok.save_pretrained(out / "bart-tokenizer")
    # Name the classes that opt-350m and bart-large use (GPT2Tokenizer / BartTokenizer), so the saved files say what
    # they are; reload so that every model directory saved from here carries the same class.
    from transformers import AutoTokenizer

    for name, cls in (("tokenizer", "GPT2Tokenizer"), ("bart-tokenizer", "BartTokenizer")):
        cfg_path = out / name / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = cls
        if name == "bart-tokenizer":  # as TMaRCo loads it: without this, the first word loses its leading space
            cfg["add_prefix_space"] = True
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return AutoTokenizer.from_pretrained(out / "tokenizer"), AutoTokenizer.from_pretrained(out / "bart-tokenizer")


def _batches(n: int, batch_size: int, rng: random.Random, epochs: int) -> Iterator[list[int]]:
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]


def _pad(seqs: Sequence[Sequence[int]], value: int) -> Any:
    import torch

    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs])


def _build_opt(tok: Any, texts: Sequence[str], out: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tok),
        do_layer_norm_before=False,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        **_OPT,
    )
    torch.manual_seed(_SEED)
    model = OPTForCausalLM(config)
    _pretrain(model, tok, texts, random.Random(_SEED), epochs=2, lr=2e-3, name="opt")
    _save_causal_lm(model, tok, out)


def _pretrain(
    model: Any, tok: Any, texts: Sequence[str], rng: random.Random, epochs: int, lr: float, name: str
) -> None:
    """Next-token pretraining on ``texts`` (each ending in eos), batches of 32 drawn with ``rng``, one-cycle LR."""
    import torch

    ids = [tok(t + tok.eos_token, add_special_tokens=True)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = list(_batches(len(ids), 32, rng, epochs=epochs))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(steps), pct_start=0.1)
    model.train()
    for step, batch in enumerate(steps):
        input_ids = _pad([ids[i] for i in batch], 1)
        attn = (input_ids != 1).long()
        labels = input_ids.masked_fill(attn == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == len(steps) - 1:
            _log(f"  {name} pretraining step {step + 1}/{len(steps)} loss {loss.item():.3f}")
    model.eval()


def _save_causal_lm(model: Any, tok: Any, out: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=2, pad_token_id=1, do_sample=True, top_p=0.9, max_new_tokens=20
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_llama(tok: Any, texts: Sequence[str], out: Path) -> None:
    """A small Llama on the OPT tokenizer (``</s>`` as bos and eos, ``<pad>`` = 1), pretrained for one epoch.

    Its initial weights come from its own seed inside :func:`torch.random.fork_rng`, so building it neither depends
    on nor changes the global RNG state the other artifacts are built with.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), pad_token_id=1, bos_token_id=2, eos_token_id=2, **_LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED + 1)
        model = LlamaForCausalLM(config)
    _pretrain(model, tok, texts, random.Random(_SEED + 1), epochs=1, lr=3e-3, name="llama")
    _save_causal_lm(model, tok, out)


def _mask_examples(
    tok: Any,
    texts: Sequence[str],
    rng: random.Random,
    per_text: int,
    slots_only: bool = False,
    exclude_slots: bool = False,
) -> list[tuple[list[int], int, int]]:
    """(input ids, mask position, original token id), built the way TMaRCo builds its masked inputs.

    TMaRCo's ``score`` replaces one token by ``pad_token + mask_token`` (its tokenizer's pad is set to eos, so
    ``</s><mask>``; ``<pad><mask>`` when it is not) and ``rephrase`` by ``<mask>`` alone; the experts learn all three.
    """

    variants = ["</s><mask>", "<pad><mask>", "<mask>"]
    # The build budget is a few hundred steps: masks go to the slot words (where the corpus halves differ), or
    # elsewhere (context replay), or one slot word plus random positions (the base).
    slot_words = {w.split()[-1].lower() for words in (*TOXIC_WORDS.values(), *BENIGN_WORDS.values()) for w in words}
    strings, meta = [], []
    for text in texts:
        tokens = tok.tokenize(text)
        starts = [i for i, t in enumerate(tokens) if t.startswith("\u0120")] + [len(tokens)]
        slots = [
            i
            for i, j in zip(starts, starts[1:], strict=False)
            if "".join(tokens[i:j]).lstrip("\u0120").strip(",.?!").lower() in slot_words
        ]
        picks = rng.sample(range(len(tokens)), min(per_text, len(tokens)))
        if exclude_slots:
            others = [i for i in range(len(tokens)) if i not in set(slots)]
            picks = rng.sample(others, min(per_text, len(others)))
        elif slots:
            picks = [rng.choice(slots)] if slots_only else [rng.choice(slots), *picks[1:]]
        for idx in dict.fromkeys(picks):
            masked = list(tokens)
            masked[idx] = rng.choice(variants)
            strings.append(tok.convert_tokens_to_string(masked))
            meta.append(tok.convert_tokens_to_ids(tokens[idx]))
    enc = tok(strings)["input_ids"]
    out = []
    for ids, original in zip(enc, meta, strict=True):
        if tok.mask_token_id in ids:
            out.append((ids, ids.index(tok.mask_token_id), original))
    return out


def _train_bart(
    tok: Any,
    texts: Sequence[str],
    init: Path | None,
    epochs: int,
    lr: float,
    seed: int,
    copy_loss: bool = False,
    replay: Sequence[str] = (),
) -> Any:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration
    from transformers.models.bart.modeling_bart import shift_tokens_right

    torch.manual_seed(seed)
    if init is None:
        config = BartConfig(
            vocab_size=len(tok),
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_bos_token_id=0,
            dropout=0.0,
            attention_dropout=0.0,
            **_BART,
        )
        model = BartForConditionalGeneration(config)
    else:
        model = BartForConditionalGeneration.from_pretrained(init)
    rng = random.Random(seed)
    examples = _mask_examples(tok, texts, rng, per_text=1, slots_only=not copy_loss)
    if replay:
        # identical for both experts (own seed): they learn the same context, and differ only at the slots
        examples += _mask_examples(tok, replay, random.Random(_SEED), per_text=1, exclude_slots=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = list(_batches(len(examples), 32, rng, epochs=epochs))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(steps), pct_start=0.1)
    model.train()
    for step, batch in enumerate(steps):
        rows = [examples[i] for i in batch]
        input_ids = _pad([r[0] for r in rows], 1)
        attn = (input_ids != 1).long()
        # The decoder sees the shifted *input* (as in TMaRCo's forward without labels); the target at the mask is
        # the original token. The base also learns to copy the other tokens (TMaRCo reads its unmasked logits).
        labels = input_ids.masked_fill(attn == 0, -100) if copy_loss else torch.full_like(input_ids, -100)
        for j, (_, pos, original) in enumerate(rows):
            labels[j, pos] = original
        dec = shift_tokens_right(input_ids, 1, 2)
        logits = model(input_ids=input_ids, attention_mask=attn, decoder_input_ids=dec).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == len(steps) - 1:
            _log(f"  bart step {step + 1}/{len(steps)} loss {loss.item():.3f}")
    model.eval()
    return model


def _save_bart(model: Any, tok: Any, out: Path) -> None:
    from transformers import GenerationConfig

    # max_length / forced_bos_token_id belong in the generation config (transformers 5 rejects them as config kwargs).
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2, forced_bos_token_id=0, max_length=128
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
