"""The exported tokenizer and config load, and tokenize as the main stack does, under the serving images' libraries.

The export is written with the main stack (transformers 5, tokenizers 0.23); the TGIS image reads it with
transformers 4.40.2 / tokenizers 0.19.1 and the vLLM image with its own pair. Each such stack gets an isolated venv
(transformers and its light dependencies, no torch: enough for tokenizer and config), cached under
``<cache>/serving-envs/<stack>-<hash of the pins>``; building one needs PyPI, reusing it does not. A subprocess in
that venv loads the tokenizer (``tokenizers.Tokenizer.from_file`` as TGIS's router does, and ``AutoTokenizer``) and
the config (``AutoConfig``) of the exported Hugging Face directory and of the Caikit ``artifacts/``, and reports the
ids; the tests compare them with the main stack's. Deselect with ``-m 'not serving_versions'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from detox_sft.export import ExportError, convert_to_caikit, save_tokenizer, write_legacy_merges
from detox_sft_dev.zoo import cache_root

pytestmark = pytest.mark.serving_versions


@dataclass(frozen=True)
class ServingStack:
    """The tokenizer-side libraries of one serving image, as exact pins.

    Attributes:
        name (`str`): short id, part of the venv's folder name.
        source (`str`): where the transformers / tokenizers pins were read.
        pins (`tuple[str, ...]`): ``name==version`` for transformers and its light dependencies, installed with
            ``--no-deps`` (transformers' own list minus torch; ``huggingface_hub``'s needs for the 1.x line).
    """

    name: str
    source: str
    pins: tuple[str, ...]

    @property
    def versions(self) -> dict[str, str]:
        """``{"transformers": ..., "tokenizers": ...}`` as pinned."""
        pinned = dict(pin.split("==") for pin in self.pins)
        return {"transformers": pinned["transformers"], "tokenizers": pinned["tokenizers"]}


TGIS = ServingStack(
    name="tgis",
    # transformers pinned in server/pyproject.toml, the rest as locked in server/poetry.lock; the router's own
    # tokenizers crate (router/Cargo.toml, Cargo.lock) is the same 0.19.1, so Tokenizer.from_file stands in for it.
    source="opendatahub-io/text-generation-inference@1db8cf0c54f5e0b5e8ddb61185501fcc186396ce server/poetry.lock",
    pins=(
        "transformers==4.40.2",
        "tokenizers==0.19.1",
        "huggingface-hub==0.31.1",
        "safetensors==0.4.5",
        "numpy==1.26.4",
        "filelock==3.18.0",
        "fsspec==2024.6.1",
        "packaging==25.0",
        "pyyaml==6.0.2",
        "regex==2024.11.6",
        "requests==2.32.3",
        "tqdm==4.67.1",
        "typing-extensions==4.13.2",
        "certifi==2025.4.26",
        "charset-normalizer==3.4.2",
        "idna==3.10",
        "urllib3==2.4.0",
    ),
)

VLLM = ServingStack(
    name="vllm-0.21.0",
    # ODH's vllm-cuda-runtime-template carries runtime-version v0.21.0 (opendatahub-io/odh-model-controller
    # config/runtimes/vllm/vllm-cuda-template.yaml). The vllm 0.21.0 wheel (built 2026-05-15) requires
    # transformers >=4.56.0 (not 5.0-5.5.0) and tokenizers >=0.21.1; its image resolves them at build time: the newest
    # then were transformers 5.8.1 (which caps tokenizers <=0.23.0, so 0.22.2) and huggingface-hub 1.14.0.
    source="vllm==0.21.0 METADATA Requires-Dist + PyPI upload times at its release",
    pins=(
        "transformers==5.8.1",
        "tokenizers==0.22.2",
        "huggingface-hub==1.14.0",
        "safetensors==0.8.0",
        "numpy==2.4.6",
        "filelock==4.3.1",
        "fsspec==2026.9.0",
        "packaging==26.4",
        "pyyaml==6.0.4",
        "regex==2026.11.19",
        "tqdm==4.70.1",
        "typing-extensions==4.16.0",
        "httpx==0.28.1",
        "httpcore==1.0.9",
        "h11==0.16.0",
        "anyio==4.16.0",
        "idna==3.20",
        "certifi==2026.10.19.post1",
    ),
)

VLLM_OLDEST = ServingStack(
    name="vllm-0.21.0-oldest",
    # The oldest pair vllm 0.21.0 accepts: transformers 4.56.0, which needs tokenizers >=0.22.0.
    source="vllm==0.21.0 METADATA Requires-Dist (lower bounds) + transformers==4.56.0 METADATA",
    pins=(
        "transformers==4.56.0",
        "tokenizers==0.22.0",
        "huggingface-hub==0.36.0",
        "safetensors==0.7.0",
        "numpy==2.3.5",
        "filelock==3.20.0",
        "fsspec==2025.12.0",
        "packaging==25.0",
        "pyyaml==6.0.3",
        "regex==2025.11.3",
        "requests==2.32.5",
        "tqdm==4.67.1",
        "typing-extensions==4.15.0",
        "certifi==2025.11.12",
        "charset-normalizer==3.4.4",
        "idna==3.11",
        "urllib3==2.6.0",
    ),
)

STACKS = (TGIS, VLLM, VLLM_OLDEST)

PROMPTS = (
    "Prompt: The weather today is\nContinuation: ",
    "  two leading spaces, tabs\tand a URL https://example.com/a?b=1 ",
    "Ünïcödé, emoji 🙂 and CJK 漢字 — dashes",
    "you are a stupid idiot, shut up!!!",
    "Hello , world . Isn 't it ?",
)

# Runs in the serving venv (python -I: nothing of the main stack leaks in); prints one JSON report.
PROBE = r"""
import json, sys
import tokenizers, transformers
from transformers import AutoConfig, AutoTokenizer

request = json.loads(sys.argv[1])

def attempt(fn):
    try:
        return fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

def tokenizer_json(d):
    tok = tokenizers.Tokenizer.from_file(d + "/tokenizer.json")
    ids = [e.ids for e in tok.encode_batch(request["prompts"])]
    return {"ids": ids, "decoded": tok.decode_batch(ids, skip_special_tokens=True)}

def auto(d):
    tok = AutoTokenizer.from_pretrained(d)
    ids = [tok(p)["input_ids"] for p in request["prompts"]]
    return {"ids": ids, "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]}

def config(d):
    c = AutoConfig.from_pretrained(d)
    return {k: getattr(c, k, None) for k in request["config_keys"]}

report = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}, "dirs": {}}
for d in request["dirs"]:
    report["dirs"][d] = {
        "tokenizer_json": attempt(lambda: tokenizer_json(d)),
        "auto": attempt(lambda: auto(d)),
        "config": attempt(lambda: config(d)),
    }
print(json.dumps(report))
"""

CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "word_embed_proj_dim",
    "do_layer_norm_before",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def serving_env(stack: ServingStack) -> Path:
    """The stack's venv, built on first use (python -m venv, pip --no-deps) and cached by the hash of its pins."""
    key = hashlib.sha256("\n".join([sys.version, *stack.pins]).encode()).hexdigest()[:12]
    root = cache_root() / "serving-envs"
    env = root / f"{stack.name}-{key}"
    if (env / "READY").is_file():
        return env
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{env.name}-build-", dir=root))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(build)], check=True)
        # the main venv's pip installs into the new one (pip --python): no pip bootstrapped per venv
        pip = [sys.executable, "-m", "pip", "--python", str(build / "bin" / "python"), "install", "--quiet"]
        done = subprocess.run([*pip, "--no-deps", "--no-compile", *stack.pins], capture_output=True, text=True)
        if done.returncode:
            pytest.fail(
                f"could not build the {stack.name} venv (it needs PyPI once, then lives in {env}):\n{done.stderr}"
            )
        (build / "READY").write_text(json.dumps({"source": stack.source, "pins": stack.pins}, indent=2))
        try:
            build.rename(env)  # whole, or not at all: a half-built venv is never reused
        except OSError:
            if not (env / "READY").is_file():  # another session won the race; anything else is a real error
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return env


def probe(stack: ServingStack, dirs: list[Path]) -> dict:
    """Run :data:`PROBE` in the stack's venv on ``dirs``; returns its report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false"
    )
    request = {"dirs": [str(d) for d in dirs], "prompts": list(PROMPTS), "config_keys": list(CONFIG_KEYS)}
    python = serving_env(stack) / "bin" / "python"
    done = subprocess.run(
        [str(python), "-I", "-c", PROBE, json.dumps(request)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def main_stack_expected(d: Path) -> dict:
    """What the main stack reads from ``d``, in :data:`PROBE`'s shape."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    fast = Tokenizer.from_file(str(d / "tokenizer.json"))
    fast_ids = [e.ids for e in fast.encode_batch(list(PROMPTS))]
    tok = AutoTokenizer.from_pretrained(d)
    config = AutoConfig.from_pretrained(d)
    return {
        "tokenizer_json": {"ids": fast_ids, "decoded": fast.decode_batch(fast_ids, skip_special_tokens=True)},
        "auto": {
            "ids": [tok(p)["input_ids"] for p in PROMPTS],
            "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id],
        },
        "config": {k: getattr(config, k, None) for k in CONFIG_KEYS},
    }


@pytest.fixture(scope="module")
def exported(zoo, tmp_path_factory):
    """The zoo OPT written as export.py writes it, and as the main stack alone would.

    Returns ``{"hf": ..., "caikit": ..., "plain": ...}``: the Hugging Face directory (tokenizer by save_tokenizer),
    the ``artifacts/`` of the Caikit directory convert_to_caikit makes from it, and a plain ``save_pretrained``.
    """
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serving_versions")
    tokenizer = AutoTokenizer.from_pretrained(zoo.opt)
    hf, plain = root / "hf", root / "plain"
    for d in (hf, plain):
        d.mkdir()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(zoo.opt / name, d / name)  # merged or not, the weights do not matter here: the formats do
    save_tokenizer(tokenizer, hf)
    tokenizer.save_pretrained(plain)
    caikit = convert_to_caikit(hf, root / "caikit" / "opt-350m-detox")
    return {"hf": hf, "caikit": caikit / "artifacts", "plain": plain}


@pytest.fixture(scope="module")
def reports(exported):
    """``{stack name: probe report}`` on the exported directories (one subprocess per stack)."""
    return {stack.name: probe(stack, list(exported.values())) for stack in STACKS}


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: s.name)
def test_serving_venv_has_the_pinned_versions(stack, reports):
    assert reports[stack.name]["versions"] == stack.versions


@pytest.mark.parametrize("which", ["hf", "caikit"])
@pytest.mark.parametrize("stack", STACKS, ids=lambda s: s.name)
def test_exported_tokenizer_and_config_read_the_same_in_the_serving_stack(stack, which, exported, reports, zoo):
    """Claim: the serving image's libraries load the exported tokenizer and config, and see what the main stack sees."""
    d = exported[which]
    got = reports[stack.name]["dirs"][str(d)]
    expected = main_stack_expected(d)
    assert expected == main_stack_expected(zoo.opt)  # and the main stack sees in the export what it saved
    # TGIS's router encodes and decodes with its tokenizers crate (Tokenizer::from_file, decode): no Python in between
    assert got["tokenizer_json"] == expected["tokenizer_json"]
    # TGIS's Python shard and vLLM load AutoTokenizer. Its decode is not compared: transformers 4.40.2 cleans up
    # tokenization spaces by default ("a , b" -> "a, b"; 4.56 and 5.x do not), and TGIS decodes in the router.
    assert got["auto"] == expected["auto"]
    assert got["config"] == expected["config"]


def test_main_stack_writes_pair_merges_that_only_tgis_cannot_read(exported, reports):
    """Why write_legacy_merges exists. If this fails, upstream changed: the rewrite may no longer be needed."""
    plain = exported["plain"]
    merges = json.loads((plain / "tokenizer.json").read_text())["model"]["merges"]
    assert isinstance(merges[0], list)  # tokenizers >= 0.20 writes [["a", "b"], ...]
    tgis = reports[TGIS.name]["dirs"][str(plain)]
    assert "untagged enum ModelWrapper" in tgis["tokenizer_json"]
    assert "untagged enum ModelWrapper" in tgis["auto"]
    expected = main_stack_expected(plain)
    for stack in (VLLM, VLLM_OLDEST):  # tokenizers >= 0.20 reads pairs: vLLM would serve even the plain save
        assert reports[stack.name]["dirs"][str(plain)]["tokenizer_json"] == expected["tokenizer_json"]


def test_legacy_merges_keep_the_main_stack_encoding(zoo, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(zoo.opt).save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.json"
    before = Tokenizer.from_file(str(path))
    assert write_legacy_merges(path) is True
    merges = json.loads(path.read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    after = Tokenizer.from_file(str(path))
    assert after.to_str() == before.to_str()  # the same model once loaded: vocab, merge ranks, specials
    for prompt in PROMPTS:
        assert after.encode(prompt).ids == before.encode(prompt).ids
    assert write_legacy_merges(path) is False  # already strings: left alone


def _tokenizer_json_with_space_merge(path: Path) -> Path:
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b c": 1, "ab c": 2}, merges=[("a", "b c")])).save(str(path))
    return path


def test_legacy_merges_refuse_a_token_with_a_space(tmp_path):
    path = _tokenizer_json_with_space_merge(tmp_path / "tokenizer.json")
    text = path.read_text()
    with pytest.raises(ExportError, match="space"):
        write_legacy_merges(path)
    assert path.read_text() == text  # untouched


def test_legacy_merges_can_leave_a_token_with_a_space_for_vllm(tmp_path):
    path = _tokenizer_json_with_space_merge(tmp_path / "tokenizer.json")
    text = path.read_text()
    with pytest.warns(UserWarning, match="TGIS"):
        assert write_legacy_merges(path, strict=False) is False
    assert path.read_text() == text
