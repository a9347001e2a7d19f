"""Shared fixtures: the offline recipe in a temporary run directory, and the offline zoo (built once, cached)."""

from __future__ import annotations

import os

import pytest

from detox_sft_dev.zoo import ensure_zoo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def zoo():
    """The offline zoo (small OPT, BART base, expert / anti-expert, corpora), built on first use and cached."""

    return ensure_zoo()


@pytest.fixture
def offline_recipe(tmp_path):
    """The offline recipe with its run directory in a temporary folder."""
    from detox_sft.config import load_recipe

    return load_recipe("offline", run_dir=str(tmp_path / "run"))


def build_tiny_bart(root, max_positions: int = 128, seed: int = 0):
    """Build a tiny BART tokenizer (byte-level BPE with BART's special tokens) and three random BART models.

    Stands in for TMaRCo's base / expert / anti-expert where the offline zoo is not needed (compat and parity tests).
    Returns a namespace with Paths ``bart_base``, ``expert``, ``anti_expert`` (each a model dir with the tokenizer).
    """
    import json
    import types
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    root = Path(root)
    sentence = (
        "you are a stupid idiot and what lovely day it is the quick brown fox jumps over lazy dog I think this "
        "article should be deleted because nobody cares about your opinion thanks for the help damn hell shut "
        "up please read sources again"
    )
    words = sentence.split(" ")
    corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    vocab["<mask>"] = len(vocab)  # BART keeps <mask> as the last id
    tokenizer = BartTokenizer(vocab=vocab, merges=merges)
    config = BartConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=max_positions,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        init_std=0.3,  # peaked random distributions: experts disagree on some tokens, so TMaRCo masks some
    )
    paths = {}
    for offset, name in enumerate(("bart_base", "expert", "anti_expert")):
        torch.manual_seed(seed + offset)
        model = BartForConditionalGeneration(config).eval()
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return types.SimpleNamespace(**paths)


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory):
    """Three tiny random BART models sharing one tokenizer (TMaRCo base, expert, anti-expert) in a temp dir."""
    return build_tiny_bart(tmp_path_factory.mktemp("tiny_bart"))


@pytest.fixture(scope="session")
def s3_server():
    """A real local S3 server (SeaweedFS on 127.0.0.1, bucket ``detox-sft``) for the session; stopped after.

    Use ``s3_server.settings()`` (an S3Settings), ``s3_server.env()`` (the data-connection variables),
    ``s3_server.endpoint``, ``.access_key``, ``.secret_key``, ``.bucket``. Give each test its own key prefix.
    """
    from detox_sft_dev.s3 import LocalS3

    server = LocalS3(bucket="detox-sft").start()
    yield server
    server.stop()


def _make_adapter(recipe, base_path, arm: str = "detox", seed: int = 0):
    """Save a LoRA adapter (non-zero update) on ``base_path`` to ``<run_dir>/adapters/<arm>`` like training does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    lora = {k: v for k, v in recipe.training.lora.items() if k != "target_modules"}
    model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", target_modules=recipe.training.lora["target_modules"], **lora)
    )
    with torch.no_grad():  # a fresh LoRA's B is zero (no-op): give it a small update so merging changes weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    out = recipe.run_path / "adapters" / arm
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(base_path)).save_pretrained(out)
    return out


@pytest.fixture
def make_adapter():
    """``make_adapter(recipe, base_path, arm="detox")``: a LoRA adapter where training would write it (tests only)."""
    return _make_adapter


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test session (2 CPUs, no dashboard; 5-30 s to start), shut down at the end.

    The steps find it running (``ray.is_initialized()``) and reuse it instead of starting their own.
    """
    import ray

    from detox_sft.scale import start_local_ray

    start_local_ray(num_cpus=2, attempts=5)  # a busy machine can need more than one try (see start_local_ray)
    yield ray
    ray.shutdown()


# A bearer token for notebook 4's requests in the demo run: the local caikit runtime ignores it, the tests check that it
# never shows in an executed notebook.
DEMO_TOKEN = "nbtest-token-0123456789abcdef"


def small_recipe(tmp_path):
    """The offline recipe, shrunk so that the four notebooks run in a few minutes."""
    from pathlib import Path

    import yaml

    from detox_sft.config import RECIPES_DIR

    values = yaml.safe_load((RECIPES_DIR / "offline.yaml").read_text())
    values["name"] = "nbtest"
    values["data"].update(num_train_samples=240, num_eval_prompts=12)
    values["training"]["sft"].update(num_train_epochs=1, per_device_train_batch_size=16, logging_steps=2)
    values["evaluation"].update(num_samples=2, bootstrap_samples=200)
    path = Path(tmp_path) / "nbtest.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, zoo):
    """`make demo` once per session, on :func:`small_recipe`: the four notebooks executed headless with the local S3
    and caikit servers. Returns ``runs/<stamp>`` (executed notebooks, report.html, ``run/``); the notebook tests and
    the slide tests read this same run. Notebook 1 runs with the package's arm loop patched to fail
    (:data:`REFUSE_ARM_LOOP`): its adapters can only come from its own trainer cells."""
    from detox_sft_dev import demo

    root = tmp_path_factory.mktemp("demo")
    guard = root / "arm-loop-refused"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(REFUSE_ARM_LOOP)
    execute = demo.execute_notebook

    def execute_guarded(name, *args, **kwargs):
        with pytest.MonkeyPatch.context() as env:
            if name == "1-sft":  # the kernel inherits the environment: Python imports sitecustomize at its start
                env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")])))
            return execute(name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MODEL_TOKEN", DEMO_TOKEN)
        env.setattr(demo, "execute_notebook", execute_guarded)
        return demo.run_demo(str(small_recipe(root)), runs_root=root / "runs", stamp="t")


# Test-only, for notebook 1's kernel in demo_run: the package's arm loop raises, and a marker says the patch ran.
REFUSE_ARM_LOOP = """
from pathlib import Path

from detox_sft import training


def refuse(*args, **kwargs):
    raise AssertionError("notebook 1 called the package's arm loop; it must train in its own SFTTrainer cells")


training.train_arms = training.train_arm = refuse
(Path(__file__).parent / "active").write_text("detox_sft.training.train_arms and train_arm raise\\n")
"""
