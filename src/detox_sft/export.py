"""Merge the detox adapter into the base model; write the Hugging Face directory (vLLM) and the Caikit one (TGIS).

Layout (``../shared/DESIGN.md`` §6)::

    <run_dir>/export/hf/                      merged model + tokenizer (the vLLM runtime serves it as is)
    <run_dir>/export/caikit/<model_id>/       config.yml + artifacts/ (caikit-nlp bootstrap + save; the folder
                                              name is the model id of the local caikit runtime)

The Caikit directory is checked by loading it back with caikit-nlp and generating. CLI:
``detox-sft export --recipe R [--run-dir D] [--arm detox]``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from detox_sft.config import Recipe, load_recipe, resolve_ref

__all__ = [
    "ExportError",
    "ExportResult",
    "adapter_path",
    "hf_export_path",
    "caikit_export_path",
    "merge_adapter",
    "convert_to_caikit",
    "check_caikit_model",
    "export_model",
    "add_arguments",
    "main",
]

CHECK_PROMPT = "Prompt: The weather today is\nContinuation: "


class ExportError(RuntimeError):
    """An export step cannot run or produced something unusable; the message says what to do."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote.

    Attributes:
        hf_dir (`Path`): the merged Hugging Face directory.
        caikit_dir (`Path`): the Caikit model directory (holds ``config.yml``).
        sample (`str`): the text the reloaded Caikit model generated for :data:`CHECK_PROMPT`.
    """

    hf_dir: Path
    caikit_dir: Path
    sample: str


def _run_dir(recipe: Recipe, run_dir: str | os.PathLike[str] | None) -> Path:
    return Path(run_dir) if run_dir is not None else recipe.run_path


def adapter_path(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None, arm: str = "detox") -> Path:
    """``<run_dir>/adapters/<arm>``, where training writes the LoRA adapter."""
    return _run_dir(recipe, run_dir) / "adapters" / arm


def hf_export_path(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<run_dir>/export/hf``."""
    return _run_dir(recipe, run_dir) / "export" / "hf"


def caikit_export_path(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<run_dir>/export/caikit/<export.model_id>``."""
    return _run_dir(recipe, run_dir) / "export" / "caikit" / recipe.export.model_id


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def merge_adapter(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None, arm: str = "detox") -> Path:
    """Merge the ``arm`` LoRA adapter into the base model and save model + tokenizer to ``<run_dir>/export/hf``.

    The base (``training.base_model``) is loaded unquantized in ``export.dtype``: QLoRA trains on a 4-bit base, but
    the served model is the full-precision base with the low-rank update added in.

    Args:
        recipe: the run's recipe.
        run_dir: the run directory; `None` uses ``recipe.run_path``.
        arm: which adapter (``detox`` or ``raw``).

    Returns:
        The Hugging Face directory.

    Raises:
        ExportError: no adapter at ``<run_dir>/adapters/<arm>``.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_path(recipe, run_dir, arm)
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(
            f"No adapter in {adapter} — run notebooks/1-sft.ipynb first (or `detox-sft train --recipe {recipe.name}`)."
        )
    dtype = getattr(torch, recipe.export.dtype)
    base = resolve_ref(recipe.training.base_model)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    leftover = [name for name, _ in model.named_modules() if "lora_" in name]
    if leftover:
        raise ExportError(f"LoRA layers left after merging ({leftover[:3]}...). Fix: check the adapter's peft version.")
    # the adapter folder holds the tokenizer training used (pad token set); fall back to the base's
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    out = _fresh_dir(hf_export_path(recipe, run_dir))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _hf_dtype(hf_dir: Path) -> str:
    import json

    config = json.loads((hf_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).replace("torch.", "")


def convert_to_caikit(
    hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str | None = None
) -> Path:
    """Write the Caikit text-generation model for ``hf_dir``: ``TextGeneration.bootstrap(hf_dir).save(out_dir)``.

    Args:
        hf_dir: a Hugging Face causal-LM directory with its tokenizer.
        out_dir: the Caikit model directory to (re)create; its name is the served model id.
        dtype: weights dtype; `None` keeps the HF directory's (caikit-nlp would otherwise upcast to float32).

    Returns:
        ``out_dir`` (holding ``config.yml`` and ``artifacts/``).
    """
    from caikit_nlp.modules.text_generation import TextGeneration

    hf_dir = Path(hf_dir).resolve()
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"No model in {hf_dir}. Fix: run merge_adapter first (or `detox-sft export`).")
    out = _fresh_dir(Path(out_dir))
    TextGeneration.bootstrap(str(hf_dir), torch_dtype=dtype or _hf_dtype(hf_dir)).save(str(out))
    if not (out / "config.yml").is_file():
        raise ExportError(f"caikit-nlp wrote no config.yml in {out}")
    return out


def check_caikit_model(caikit_dir: str | os.PathLike[str], prompt: str = CHECK_PROMPT, max_new_tokens: int = 8) -> str:
    """Load the Caikit directory back with caikit-nlp and generate greedily; returns the new text.

    Raises:
        ExportError: the model generated no token.
    """
    from caikit_nlp.modules.text_generation import TextGeneration

    from detox_sft.compat import fix_caikit_nlp_generate_args

    fix_caikit_nlp_generate_args()  # greedy means greedy, as in the served runtime
    model = TextGeneration.load(str(caikit_dir))
    result = model.run(prompt, max_new_tokens=max_new_tokens, preserve_input_text=False)
    if not result.generated_tokens:
        raise ExportError(f"the Caikit model in {caikit_dir} generated nothing for {prompt!r}")
    return result.generated_text


def export_model(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None, arm: str = "detox") -> ExportResult:
    """Merge, convert and check: the whole export step (notebook 3 and ``detox-sft export``)."""
    hf_dir = merge_adapter(recipe, run_dir, arm)
    caikit_dir = convert_to_caikit(hf_dir, caikit_export_path(recipe, run_dir), recipe.export.dtype)
    return ExportResult(hf_dir, caikit_dir, check_caikit_model(caikit_dir))


def add_arguments(parser) -> None:
    """Flags of ``detox-sft export``."""
    parser.add_argument("--recipe", default="offline", help="recipe name or path (default %(default)s)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--arm", default="detox", choices=("detox", "raw"), help="adapter to export")


def main(args) -> int:
    """Run ``detox-sft export``."""
    recipe = load_recipe(args.recipe, run_dir=args.run_dir)
    try:
        result = export_model(recipe, arm=args.arm)
    except ExportError as exc:
        print(f"detox-sft export: {exc}", file=sys.stderr)
        return 1
    print(f"Hugging Face directory: {result.hf_dir}")
    print(f"Caikit directory:       {result.caikit_dir}")
    print(f"check generation:       {result.sample!r}")
    return 0
