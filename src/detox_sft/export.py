"""Merge the detox adapter into the base model: :func:`export_model` writes ``<run_dir>/export/hf/`` (vLLM) and
``export/caikit/<model_id>/`` (TGIS; the folder name is the served model id), each with its model card ``README.md``.
CLI: ``detox-sft export --recipe R [--run-dir D] [--arm detox]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from detox_sft.compat import (
    BPE_CLEANUP_NOTICE,
    PEFT_READS_IS_GRADIENT_CHECKPOINTING,
    drop_log_messages,
    fix_caikit_nlp_generate_args,
    ignore_warnings,
    library_progress_bars_off,
)
from detox_sft.config import Recipe, RunPaths
from detox_sft.data import read_jsonl
from detox_sft.files import atomic_write_text, dir_writer
from detox_sft.prompts import generation_prompt
from detox_sft.refs import resolve_ref, revision_kwargs

CHECK_PROMPT = generation_prompt("The weather today is")
CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
# As README.md's table "Licences of the data and models" states them (tests/test_export.py holds the two equal)
LICENCES = {
    "allenai/real-toxicity-prompts": "Apache-2.0",
    "facebook/opt-350m": "the OPT model licence (not an OSI licence)",
    "facebook/bart-large": "Apache-2.0",
    "profanity-check": "MIT",
}
OFFLINE_LICENCE = "Apache-2.0 (built by this project's code from its bundled synthetic corpora; LICENSE)"
METRICS = {  # results.json's names -> the model-index metric type and a name for people
    "expected_max_toxicity": "Expected Maximum Toxicity (EMT)",
    "toxicity_probability": "Toxicity Probability (TP)",
    "mean_toxicity": "mean toxicity",
}


class ExportError(RuntimeError):
    """An export step cannot run or produced something unusable; the message says what to do."""


@contextlib.contextmanager
def quiet_caikit() -> Iterator[None]:
    """Run caikit-nlp calls (import, ``bootstrap``, ``save``, ``load``, ``run``) without its known upstream noise."""
    with (
        library_progress_bars_off(),
        drop_log_messages("WIPDC", r"is still in the BETA phase"),
        drop_log_messages("transformers.configuration_utils", r"`torch_dtype` is deprecated"),
        drop_log_messages("transformers.generation.configuration_utils", r"generation flags are not valid"),
        drop_log_messages(*BPE_CLEANUP_NOTICE),
    ):
        yield


@dataclass
class ExportResult:
    """What :func:`export_model` wrote, and the text the reloaded Caikit model generated for :data:`CHECK_PROMPT`."""

    hf_dir: Path
    caikit_dir: Path
    sample: str


def _paths(recipe: Recipe, run_dir: str | os.PathLike[str] | None) -> RunPaths:
    return RunPaths(Path(run_dir)) if run_dir is not None else recipe.paths


def write_legacy_merges(tokenizer_json: str | os.PathLike[str], strict: bool = True) -> bool:
    """Rewrite a BPE ``tokenizer.json``'s merges from pairs to ``"a b"`` strings (what TGIS's tokenizers 0.19.1 reads),
    atomically; True if rewritten. A merge that cannot be a string raises ExportError if ``strict``, else warns."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_json)
    data = json.loads(text := path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or isinstance(merges[0], str):
        return False
    # tokenizers 0.19 splits each merge on " " into exactly two parts and skips lines that start with "#version"
    bad = [i for i, (a, b) in enumerate(merges) if " " in a + b or not a or not b or a.startswith("#version")]
    if bad:
        exc = ExportError(
            f"{path}: BPE merge {bad[0]} {merges[bad[0]]!r} has a token with a space (or an empty one), which the TGIS "
            "image's tokenizers 0.19.1 cannot read: it reads merges only as 'a b' strings. Fix: serve the Hugging Face "
            "directory (export/hf) with the vLLM runtime, whose tokenizers reads merges as pairs."
        )
        if strict:
            raise exc
        warnings.warn(f"{exc} Left as pairs: TGIS cannot serve this tokenizer.", UserWarning, stacklevel=2)
        return False
    model["merges"] = [f"{a} {b}" for a, b in merges]
    new_text = json.dumps(data, ensure_ascii=False, indent=2)
    if Tokenizer.from_str(new_text).to_str() != Tokenizer.from_str(text).to_str():
        raise ExportError(f"{path}: the rewritten merges load as a different tokenizer; the file is left as it was")
    atomic_write_text(path, new_text)
    return True


def save_tokenizer(tokenizer, out_dir: str | os.PathLike[str]) -> Path:
    """``tokenizer.save_pretrained(out_dir)`` with legacy merges, not strict: vLLM reads pairs, so this still serves."""
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    if (out / "tokenizer.json").is_file():
        write_legacy_merges(out / "tokenizer.json", strict=False)
    return out


def merge_adapter(
    recipe: Recipe,
    run_dir: str | os.PathLike[str] | None = None,
    arm: str = "detox",
    out_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Merge the ``arm`` adapter into the unquantized base (``export.dtype``); save to ``out_dir`` or export/hf."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = _paths(recipe, run_dir)
    adapter = paths.adapter(arm)
    if not paths.adapter_config(arm).is_file():
        raise ExportError(
            f"No adapter in {adapter} — run notebooks/1-sft.ipynb first (or `detox-sft train --recipe {recipe.name}`)."
        )
    cfg = recipe.training
    base = resolve_ref(cfg.base_model)
    pinned = revision_kwargs(cfg.base_model, cfg.base_model_revision, "training.base_model_revision")
    with library_progress_bars_off(), ignore_warnings(PEFT_READS_IS_GRADIENT_CHECKPOINTING):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, recipe.export.dtype), **pinned)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if leftover := [name for name, _ in model.named_modules() if "lora_" in name]:
        raise ExportError(f"LoRA layers left after merging ({leftover[:3]}...). Fix: check the adapter's peft version.")
    # the adapter folder holds the tokenizer training used (pad token set); fall back to the base's
    own = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter)) if own else AutoTokenizer.from_pretrained(base, **pinned)
    out = Path(out_dir) if out_dir is not None else paths.hf_export
    with dir_writer(out) as building, library_progress_bars_off():  # 'Writing model shards'
        model.save_pretrained(str(building))
        save_tokenizer(tokenizer, building)
    return out


def convert_to_caikit(
    hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str | None = None
) -> Path:
    """``TextGeneration.bootstrap(hf_dir).save(out_dir)``, swapped in when complete; ``out_dir``'s name is the model id,
    ``dtype`` `None` keeps the HF directory's (caikit-nlp would upcast to float32)."""
    import yaml

    with quiet_caikit():
        from caikit_nlp.modules.text_generation import TextGeneration

    hf_dir = Path(hf_dir).resolve()
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"No model in {hf_dir}. Fix: run merge_adapter first (or `detox-sft export`).")
    if not dtype:
        config = json.loads((hf_dir / "config.json").read_text())
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    out = Path(out_dir)
    with dir_writer(out) as building:
        with quiet_caikit():
            TextGeneration.bootstrap(str(hf_dir), torch_dtype=dtype).save(str(building))
        if not (building / "config.yml").is_file():
            raise ExportError(f"caikit-nlp wrote no config.yml for {out}")
        # caikit-nlp saves the tokenizer again, with the main stack's tokenizers: merges as pairs once more
        artifacts = building / yaml.safe_load((building / "config.yml").read_text())["artifact_path"]
        if (artifacts / "tokenizer.json").is_file():
            write_legacy_merges(artifacts / "tokenizer.json")
    return out


def check_caikit_model(caikit_dir: str | os.PathLike[str], prompt: str = CHECK_PROMPT, max_new_tokens: int = 8) -> str:
    """Load the Caikit directory back with caikit-nlp and generate greedily; returns the new text."""
    with quiet_caikit():
        from caikit_nlp.modules.text_generation import TextGeneration

        fix_caikit_nlp_generate_args()  # greedy means greedy, as in the served runtime
        model = TextGeneration.load(str(caikit_dir))
        result = model.run(prompt, max_new_tokens=max_new_tokens, preserve_input_text=False)
    if not result.generated_tokens:
        raise ExportError(f"the Caikit model in {caikit_dir} generated nothing for {prompt!r}")
    return result.generated_text


def export_model(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None, arm: str = "detox") -> ExportResult:
    """Merge, convert, check, write the card; ``export/`` is swapped in only once the Caikit model has generated."""
    paths = _paths(recipe, run_dir)
    model_id = recipe.export.model_id
    with dir_writer(paths.export) as building:
        hf_dir = merge_adapter(recipe, run_dir, arm, out_dir=building / paths.hf_export.relative_to(paths.export))
        caikit_dir = convert_to_caikit(
            hf_dir, building / paths.caikit_export(model_id).relative_to(paths.export), recipe.export.dtype
        )
        sample = check_caikit_model(caikit_dir)
        card = model_card(recipe, run_dir)
        for directory in (hf_dir, caikit_dir):  # uploaded with the model: the card is in the directories
            card.save(directory / "README.md")
    return ExportResult(paths.hf_export, paths.caikit_export(model_id), sample)


def _interval(stat: dict | None) -> str:
    return f"{stat['value']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]" if stat else "-"


def _eval_section(results: dict, data: dict) -> tuple[list, list]:
    """The model-index entries (detox arm, every judge) and the table rows with intervals and paired differences."""
    from huggingface_hub import EvalResult

    entries, rows = [], []
    task = {  # the same for every entry
        "task_type": "text-generation",
        "task_name": "continuation of toxic prompts",
        "dataset_type": data["eval_dataset"],
        "dataset_name": data["eval_dataset"],
        "dataset_split": data["eval_split"],
        "dataset_revision": data["eval_revision"],
        "dataset_args": {"prompts": results["num_prompts"], "continuations_per_prompt": results["num_samples"]},
    }
    for judge in results["scorers"]:
        for key, name in METRICS.items():
            arm = {a: m.get("toxicity", {}).get(judge, {}).get(key) for a, m in results["metrics"].items()}
            metric = {"metric_type": key, "metric_name": f"{name}, judged by {judge}", "metric_config": judge}
            entries.append(EvalResult(**task, **metric, metric_value=arm["detox"]["value"]))
            paired = results["comparisons"].get("detox_vs_raw", {}).get(judge, {}).get(key)
            headline = " (headline)" if judge == results["headline_scorer"] else ""
            rows.append([judge + headline, name, *map(_interval, (arm["detox"], arm["raw"], arm.get("base"), paired))])
    return entries, rows


def model_card(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None):
    """The run's ``huggingface_hub.ModelCard`` (templates/model_card.md), its numbers read from ``eval/results.json``
    (the detox arm's in ``model-index``); without results the card says so."""
    from huggingface_hub import ModelCard, ModelCardData

    paths, cfg = _paths(recipe, run_dir), recipe.to_dict()
    data, rephrase, training = cfg["data"], cfg["rephrase"], cfg["training"]
    offline = recipe.profile == "offline"
    results = json.loads(paths.results.read_text()) if paths.results.is_file() else None
    entries, eval_rows = _eval_section(results, data) if results else ([], [])
    summary_file = paths.data / "rephrase_summary.jsonl"
    used = [
        ("base model", training["base_model"]),
        ("training data", data["train_dataset"]),
        ("evaluation prompts", data["eval_dataset"]),
        ("TMaRCo base", rephrase["base_model"]),
        ("TMaRCo expert", rephrase["expert"]),
        ("TMaRCo anti-expert", rephrase["anti_expert"]),
        ("gate scorer", rephrase["scorer"]),
        *(("judge", judge) for judge in cfg["evaluation"]["scorers"]),
    ]
    unknown = "not established here: read its card"
    licences = [
        (what, ref, OFFLINE_LICENCE if ref.startswith("zoo:") else LICENCES.get(ref, unknown)) for what, ref in used
    ]
    card_data = ModelCardData(
        model_name=recipe.export.model_id,
        base_model=None if offline else training["base_model"],
        datasets=None if offline else [data["train_dataset"]],
        license="apache-2.0" if offline else "other",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["detoxification", "qlora", "trustyai", "synthetic" if offline else "opt"],
        eval_results=entries or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        recipe=cfg,
        offline=offline,
        results=results,
        eval_rows=eval_rows,
        summary=read_jsonl(summary_file)[0] if summary_file.is_file() else None,
        summary_file=summary_file,
        licences=licences,
    )
