"""Merge the detox adapter into the base model; write the Hugging Face directory (vLLM) and the Caikit one (TGIS).

Layout (instructions.md, "5. Deploy the model")::

    <run_dir>/export/hf/                      merged model + tokenizer + README.md (vLLM serves it as is)
    <run_dir>/export/caikit/<model_id>/       README.md + config.yml + artifacts/ (caikit-nlp bootstrap + save; the folder
                                              name is the model id of the local caikit runtime)

Both directories hold a model card, ``README.md`` (:func:`model_card`): the run's own evaluation as the card's
``model-index``, the training data and its detoxification, the recipe, the licences, intended use and limits.

Both ``tokenizer.json`` files are written with their BPE merges as ``"a b"`` strings (:func:`write_legacy_merges`),
the form the TGIS image's tokenizers 0.19 reads. The Caikit directory is checked by loading it back with caikit-nlp
and generating. CLI: ``detox-sft export --recipe R [--run-dir D] [--arm detox] [--export.dtype float32]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
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
from detox_sft.files import dir_writer
from detox_sft.prompts import generation_prompt
from detox_sft.refs import resolve_ref, revision_kwargs

__all__ = [
    "ExportError",
    "ExportResult",
    "save_tokenizer",
    "write_legacy_merges",
    "merge_adapter",
    "convert_to_caikit",
    "check_caikit_model",
    "export_model",
    "model_card",
    "quiet_caikit",
]

CHECK_PROMPT = generation_prompt("The weather today is")
# The licences as README.md's table "Licences of the data and models" states them (tests/test_export.py holds the two
# equal); an artefact not listed is "not established here".
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
CONTENT_WARNING = (
    "**Content warning:** this model was trained on, and evaluated with, toxic and offensive text; it can still "
    "produce such text."
)


class ExportError(RuntimeError):
    """An export step cannot run or produced something unusable; the message says what to do."""


@contextlib.contextmanager
def quiet_caikit() -> Iterator[None]:
    """Run caikit-nlp calls (import, ``bootstrap``, ``save``, ``load``, ``run``) without upstream noise that is not ours.

    Dropped, each where it comes from: caikit 0.28's import-time notice that ``register_backend_type`` "is still in the
    BETA phase"; the notice that ``torch_dtype`` is deprecated (caikit-nlp 0.5.15 passes it to transformers 5 on every
    load); transformers flagging the model's ``top_p`` as unused when caikit-nlp decodes greedily, and saying that it
    skips the clean-up of spaces caikit-nlp asks for when decoding (BPE); and transformers' 'Loading weights' /
    'Writing model shards' bars. Everything else passes.
    """
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
    """What :func:`export_model` wrote.

    Attributes:
        hf_dir (`Path`): the merged Hugging Face directory.
        caikit_dir (`Path`): the Caikit model directory (holds ``config.yml``).
        sample (`str`): the text the reloaded Caikit model generated for :data:`CHECK_PROMPT`.
    """

    hf_dir: Path
    caikit_dir: Path
    sample: str


def _paths(recipe: Recipe, run_dir: str | os.PathLike[str] | None) -> RunPaths:
    return RunPaths(Path(run_dir)) if run_dir is not None else recipe.paths


def _legacy_merge(pair: list[str], path: Path, rank: int) -> str:
    a, b = pair
    # tokenizers 0.19 splits each merge on " " into exactly two parts and skips lines that start with "#version"
    if " " in a or " " in b or not a or not b or a.startswith("#version"):
        raise ExportError(
            f"{path}: BPE merge {rank} {pair!r} has a token with a space (or an empty one), which the TGIS image's "
            "tokenizers 0.19.1 cannot read: it reads merges only as 'a b' strings. Fix: serve the Hugging Face "
            "directory (export/hf) with the vLLM runtime, whose tokenizers reads merges as pairs."
        )
    return f"{a} {b}"


def write_legacy_merges(tokenizer_json: str | os.PathLike[str], strict: bool = True) -> bool:
    """Rewrite a BPE ``tokenizer.json``'s merges from pairs to ``"a b"`` strings, the form every tokenizers reads.

    tokenizers >= 0.20 writes merges as ``[["a", "b"], ...]`` and reads both forms. The TGIS image's tokenizers
    0.19.1 (its Rust router and its transformers 4.40.2) reads only strings: on pairs ``Tokenizer.from_file`` and
    ``AutoTokenizer`` fail with "data did not match any variant of untagged enum ModelWrapper" (measured on the
    offline export). tokenizers has no option to write the old form, hence this rewrite; the new file must load as
    the same tokenizer before it replaces the old one (atomically).

    Args:
        tokenizer_json: the file, rewritten in place.
        strict: when a merge cannot be written as a string (a token holds a space), raise; else warn and leave the
            file as it is.

    Returns:
        Whether the file was rewritten (`False`: merges already strings, no BPE merges, or left as pairs).

    Raises:
        ExportError: ``strict`` and a merge that tokenizers 0.19 cannot read.
    """
    from tokenizers import Tokenizer

    path = Path(tokenizer_json)
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or isinstance(merges[0], str):
        return False
    try:
        model["merges"] = [_legacy_merge(pair, path, rank) for rank, pair in enumerate(merges)]
    except ExportError as exc:
        if strict:
            raise
        warnings.warn(f"{exc} Left as pairs: TGIS cannot serve this tokenizer.", UserWarning, stacklevel=2)
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
        os.chmod(tmp, path.stat().st_mode & 0o777)  # mkstemp's file is private; keep the original's mode
        if Tokenizer.from_file(tmp).to_str() != Tokenizer.from_str(text).to_str():
            raise ExportError(f"{path}: the rewritten merges load as a different tokenizer; the file is left as it was")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def save_tokenizer(tokenizer, out_dir: str | os.PathLike[str]) -> Path:
    """``tokenizer.save_pretrained(out_dir)``, its ``tokenizer.json`` rewritten by :func:`write_legacy_merges`.

    Not strict: vLLM reads merges as pairs, so a tokenizer that cannot be written the old way still serves from
    this directory (with a warning); :func:`convert_to_caikit` refuses it.

    Args:
        tokenizer: a transformers tokenizer.
        out_dir: the model directory.

    Returns:
        ``out_dir``.
    """
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
    """Merge the ``arm`` LoRA adapter into the base model and save model + tokenizer to ``<run_dir>/export/hf``.

    The base (``training.base_model``) is loaded unquantized in ``export.dtype``: QLoRA trains on a 4-bit base, but
    the served model is the full-precision base with the low-rank update added in. The directory is built beside its
    place and swapped in when complete, so an interrupted merge leaves the previous one (or none), never half a model.

    Args:
        recipe: the run's recipe.
        run_dir: the run directory; `None` uses ``recipe.run_path``.
        arm: which adapter (``detox`` or ``raw``).
        out_dir: where to write; `None` is ``<run_dir>/export/hf``.

    Returns:
        The Hugging Face directory.

    Raises:
        ExportError: no adapter at ``<run_dir>/adapters/<arm>``.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _paths(recipe, run_dir).adapter(arm)
    if not _paths(recipe, run_dir).adapter_config(arm).is_file():
        raise ExportError(
            f"No adapter in {adapter} — run notebooks/1-sft.ipynb first (or `detox-sft train --recipe {recipe.name}`)."
        )
    dtype = getattr(torch, recipe.export.dtype)
    cfg = recipe.training
    base = resolve_ref(cfg.base_model)
    pinned = revision_kwargs(cfg.base_model, cfg.base_model_revision, "training.base_model_revision")
    with library_progress_bars_off(), ignore_warnings(PEFT_READS_IS_GRADIENT_CHECKPOINTING):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **pinned)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    leftover = [name for name, _ in model.named_modules() if "lora_" in name]
    if leftover:
        raise ExportError(f"LoRA layers left after merging ({leftover[:3]}...). Fix: check the adapter's peft version.")
    # the adapter folder holds the tokenizer training used (pad token set); fall back to the base's
    own = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter)) if own else AutoTokenizer.from_pretrained(base, **pinned)
    out = Path(out_dir) if out_dir is not None else _paths(recipe, run_dir).hf_export
    with dir_writer(out) as building, library_progress_bars_off():  # 'Writing model shards'
        model.save_pretrained(str(building))
        save_tokenizer(tokenizer, building)
    return out


def _hf_dtype(hf_dir: Path) -> str:
    config = json.loads((hf_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).replace("torch.", "")


def convert_to_caikit(
    hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str | None = None
) -> Path:
    """Write the Caikit text-generation model for ``hf_dir``: ``TextGeneration.bootstrap(hf_dir).save(out_dir)``.

    Args:
        hf_dir: a Hugging Face causal-LM directory with its tokenizer.
        out_dir: the Caikit model directory to (re)create; its name is the served model id. It is built beside its
            place and swapped in when complete.
        dtype: weights dtype; `None` keeps the HF directory's (caikit-nlp would otherwise upcast to float32).

    Returns:
        ``out_dir`` (holding ``config.yml`` and ``artifacts/``).

    Raises:
        ExportError: no model in ``hf_dir``; or a tokenizer the TGIS image cannot read (see
            :func:`write_legacy_merges`).
    """
    import yaml

    with quiet_caikit():
        from caikit_nlp.modules.text_generation import TextGeneration

    hf_dir = Path(hf_dir).resolve()
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"No model in {hf_dir}. Fix: run merge_adapter first (or `detox-sft export`).")
    out = Path(out_dir)
    with dir_writer(out) as building:
        with quiet_caikit():
            TextGeneration.bootstrap(str(hf_dir), torch_dtype=dtype or _hf_dtype(hf_dir)).save(str(building))
        if not (building / "config.yml").is_file():
            raise ExportError(f"caikit-nlp wrote no config.yml for {out}")
        # caikit-nlp saves the tokenizer again, with the main stack's tokenizers: merges as pairs once more
        artifacts = building / yaml.safe_load((building / "config.yml").read_text())["artifact_path"]
        if (artifacts / "tokenizer.json").is_file():
            write_legacy_merges(artifacts / "tokenizer.json")
    return out


def check_caikit_model(caikit_dir: str | os.PathLike[str], prompt: str = CHECK_PROMPT, max_new_tokens: int = 8) -> str:
    """Load the Caikit directory back with caikit-nlp and generate greedily; returns the new text.

    Raises:
        ExportError: the model generated no token.
    """
    with quiet_caikit():
        from caikit_nlp.modules.text_generation import TextGeneration

        fix_caikit_nlp_generate_args()  # greedy means greedy, as in the served runtime
        model = TextGeneration.load(str(caikit_dir))
        result = model.run(prompt, max_new_tokens=max_new_tokens, preserve_input_text=False)
    if not result.generated_tokens:
        raise ExportError(f"the Caikit model in {caikit_dir} generated nothing for {prompt!r}")
    return result.generated_text


def export_model(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None, arm: str = "detox") -> ExportResult:
    """Merge, convert and check: the whole export step (notebook 3 and ``detox-sft export``).

    The whole ``export/`` directory is built beside its place (a hidden temporary directory) and swapped in only once
    the Caikit model has loaded back and generated: an interrupted or failed export leaves the previous export (or
    none), never a half one that ``upload`` would ship.
    """
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
    if not stat:
        return "-"
    return f"{stat['value']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def _eval_section(results: dict | None, recipe: dict) -> tuple[list, str]:
    """The model-index entries (detox arm, every judge) and the body's table with intervals and paired differences."""
    from huggingface_hub import EvalResult

    data = recipe["data"]
    if results is None:
        return [], (
            "No evaluation results yet: this export ran before the evaluation. Run notebooks/2-eval.ipynb (or "
            "`detox-sft evaluate`), then export again; the card then carries the run's own numbers."
        )
    prompts = (
        f"{results['num_prompts']} prompts from `{data['eval_dataset']}` (split `{data['eval_split']}`, "
        f"`{data['eval_label_field']}` == {data['eval_label']}), {results['num_samples']} sampled continuations each "
        f"(top_p {results['config']['top_p']}, at most {results['config']['max_new_tokens']} new tokens); only the "
        f"continuation is scored."
    )
    entries, rows = [], []
    for judge in results["scorers"]:
        for key, name in METRICS.items():
            detox = results["metrics"]["detox"]["toxicity"][judge][key]
            entries.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="continuation of toxic prompts",
                    dataset_type=data["eval_dataset"],
                    dataset_name=data["eval_dataset"],
                    dataset_split=data["eval_split"],
                    dataset_revision=data["eval_revision"],
                    dataset_args={
                        "prompts": results["num_prompts"],
                        "continuations_per_prompt": results["num_samples"],
                    },
                    metric_type=key,
                    metric_name=f"{name}, judged by {judge}",
                    metric_config=judge,
                    metric_value=detox["value"],
                )
            )
            paired = results["comparisons"].get("detox_vs_raw", {}).get(judge, {}).get(key)
            rows.append(
                {
                    "judge": judge + (" (headline)" if judge == results["headline_scorer"] else ""),
                    "metric": name,
                    "detox": _interval(detox),
                    "raw": _interval(results["metrics"]["raw"]["toxicity"][judge][key]),
                    "base": _interval(results["metrics"].get("base", {}).get("toxicity", {}).get(judge, {}).get(key)),
                    "detox - raw (paired)": _interval(paired),
                }
            )
    import pandas as pd

    interval = f"{results['config']['confidence']:.0%} bootstrap intervals ({results['config']['interval']})"
    body = f"{prompts}\n\nValue [{interval}]; lower is less toxic.\n\n{pd.DataFrame(rows).to_markdown(index=False)}"
    return entries, body


def model_card(recipe: Recipe, run_dir: str | os.PathLike[str] | None = None):
    """The model card of the run's detox model: ``huggingface_hub.ModelCard`` with a ``model-index``.

    The numbers are read from the run's ``eval/results.json`` (EMT, TP and mean toxicity of the detox arm under every
    judge, as ``model-index`` entries; the intervals and the paired difference to the raw arm in the body) and its
    rephrase summary (``data/rephrase_summary.jsonl``). Without results the card says so.

    Returns:
        A ``huggingface_hub.ModelCard``; ``card.save(dir / "README.md")`` writes it.
    """
    import pandas as pd
    from huggingface_hub import ModelCard, ModelCardData

    paths, cfg = _paths(recipe, run_dir), recipe.to_dict()
    data, rephrase, training = cfg["data"], cfg["rephrase"], cfg["training"]
    offline = recipe.profile == "offline"
    results = json.loads(paths.results.read_text()) if paths.results.is_file() else None
    entries, evaluation = _eval_section(results, cfg)
    summary_file = paths.data / "rephrase_summary.jsonl"
    summary = read_jsonl(summary_file)[0] if summary_file.is_file() else None
    if summary:
        detox_data = (
            f"{summary['rephrased']} of {summary['total']} training samples "
            f"({summary['rephrased'] / max(summary['total'], 1):.1%}) were rewritten: the gate scorer "
            f"`{rephrase['scorer']}` sent the {summary['gated']} scoring >= {summary['gate_threshold']} to TMaRCo "
            f"(mask threshold {summary['mask_threshold']}); their mean toxicity went from "
            f"{summary['gated_toxicity_before']:.3f} to {summary['gated_toxicity_after']:.3f} under the gate scorer."
        )
    else:
        detox_data = f"No rephrase summary in {summary_file}: the detoxification's figures were not recorded."
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
    licences = pd.DataFrame(
        [
            {
                "artefact": f"{what}: `{ref}`",
                "licence as upstream states it": OFFLINE_LICENCE
                if ref.startswith("zoo:")
                else LICENCES.get(ref, "not established here: read its card"),
            }
            for what, ref in used
        ]
    ).to_markdown(index=False)
    shown = (
        "learning_rate",
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_length",
    )
    sft = ", ".join(f"{k} {training['sft'][k]}" for k in shown if k in training["sft"])
    lora = ", ".join(f"{k} {v}" for k, v in training["lora"].items())
    revision = training["base_model_revision"] or "not pinned"
    synthetic = (
        "\n\n**Made from synthetic data.** This is the offline profile: the base model, the TMaRCo models, the "
        "corpora and the judges are small ones built by detox-sft's code on this machine. The model shows the "
        "pipeline end to end; it is no language model to use.\n"
        if offline
        else ""
    )
    body = f"""
# {recipe.export.model_id}

{CONTENT_WARNING}{synthetic}

`{training["base_model"]}` (revision {revision}) fine-tuned with QLoRA on a detoxified training set: toxic
continuations rewritten by TrustyAI's TMaRCo before training. Made by detox-sft, recipe `{recipe.name}`.

## Evaluation

{evaluation}

## Training data and its detoxification

`{data["train_dataset"]}` (split `{data["train_split"]}`, revision {data["train_revision"] or "not pinned"}).
{detox_data}

## Recipe

QLoRA: 4-bit base {training["load_in_4bit"]}; LoRA {lora}; SFT {sft}; seed {cfg["seed"]}. The merged model (this
directory) is the full-precision base with the adapter added in, saved as {recipe.export.dtype}.

## Licences

{licences}

## Intended use and limits

For learning and research on detoxifying fine-tuning data. Toxicity is reduced, not removed: judged by automatic
classifiers (with their own biases and blind spots), on one set of prompts, in English. Do not use it unsupervised
with people, nor as a moderation tool.
"""
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
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
