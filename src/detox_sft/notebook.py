"""Small helpers the notebooks call: start a step, guard on an earlier step's output, record results.

They keep the notebooks thin (one call per cell) and let the tests read back what a headless run produced.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from detox_sft.config import Recipe, load_recipe

__all__ = [
    "StepMissing",
    "hub_reachable",
    "start",
    "require",
    "record",
    "read_records",
    "sample_prompts",
    "ask",
    "ask_grpc",
    "compare_arms",
]

_STEP_HINTS = {
    "1-sft": "run notebooks/1-sft.ipynb first (or `detox-sft rephrase` and `detox-sft train`)",
    "2-eval": "run notebooks/2-eval.ipynb first (or `detox-sft evaluate`)",
    "3-save_convert_model": "run notebooks/3-save_convert_model.ipynb first (or `detox-sft export` and `detox-sft upload`)",
}


class StepMissing(FileNotFoundError):
    """An earlier step's output is missing; the message names the step to run."""


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (respects HF_HUB_OFFLINE=1 as 'no')."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start(recipe: str | os.PathLike[str], run_dir: str | None = None, **overrides: Any) -> Recipe:
    """Load the notebook's recipe, create its run directory and say which profile runs where.

    For the tutorial profile without a reachable hub, prints how to run the offline profile instead.
    """
    loaded = load_recipe(recipe, run_dir=run_dir, **overrides)
    loaded.run_path.mkdir(parents=True, exist_ok=True)
    print(f"recipe {loaded.name!r} (profile {loaded.profile}); outputs in {loaded.run_path}")
    if loaded.profile == "tutorial" and not hub_reachable():
        print(
            "The Hugging Face hub cannot be reached from here, and the tutorial profile downloads facebook/opt-350m,\n"
            'bart-large and the datasets from it. Run the offline profile instead: set recipe = "offline" in the\n'
            "parameters cell, or run the whole tutorial headless with `make demo`."
        )
    return loaded


def require(path: str | os.PathLike[str], step: str) -> Path:
    """Return ``path`` if it exists, else raise :class:`StepMissing` naming the notebook that produces it."""
    path = Path(path)
    if not path.exists():
        hint = _STEP_HINTS.get(step, f"run {step} first")
        raise StepMissing(f"{path} is missing: {hint}.")
    return path


def _plain(value: Any) -> Any:
    """Dataclasses and paths as JSON-able data."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def record(recipe: Recipe, notebook: str, **values: Any) -> Path:
    """Save a notebook's headline results (JSON) under ``<run_dir>/notebooks/<notebook>.json``."""
    out = recipe.run_path / "notebooks" / f"{notebook}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(out.read_text()) if out.exists() else {}
    current.update(_plain(values))
    out.write_text(json.dumps(current, indent=2, default=str))
    return out


def read_records(run_dir: str | os.PathLike[str], notebook: str) -> dict[str, Any]:
    """Read what :func:`record` saved for a notebook."""
    return json.loads((Path(run_dir) / "notebooks" / f"{notebook}.json").read_text())


def sample_prompts(recipe: Recipe, n: int = 5) -> list[str]:
    """The first ``n`` evaluation prompts of the recipe (the same ones notebook 2 used)."""
    from detox_sft.data import load_eval_prompts

    return load_eval_prompts(recipe.data, recipe.seed)[:n]


def _served_input(prompt: str) -> str:
    # The served model was tuned on "Prompt: ...\nContinuation: ..."; it is queried in the same format.
    from detox_sft.training import generation_prompt

    return generation_prompt(prompt)


def ask(client: Any, model_id: str, prompts: list[str], max_new_tokens: int = 20) -> Any:
    """Greedy answers of a served model to ``prompts`` (a DataFrame: prompt, answer, tokens, seconds)."""
    import time

    import pandas as pd

    rows = []
    for prompt in prompts:
        started = time.perf_counter()
        result = client.generate(model_id, _served_input(prompt), max_new_tokens=max_new_tokens, decoding="greedy")
        rows.append(
            {
                "prompt": prompt,
                "answer": result.text,
                "tokens": result.generated_tokens,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    return pd.DataFrame(rows)


def ask_grpc(recipe: Recipe, model_id: str, prompts: list[str], max_new_tokens: int = 20) -> Any:
    """The same greedy answers over gRPC; `None` (with a message) when no gRPC endpoint is configured."""
    if not recipe.serving.grpc_target:
        print("No gRPC endpoint configured (serving.grpc_target / the grpc_target parameter): skipped.")
        return None
    from detox_sft.clients import connect

    client = connect(recipe, url=recipe.serving.url, grpc_target=recipe.serving.grpc_target)
    return ask(client, model_id, prompts, max_new_tokens=max_new_tokens)


def compare_arms(recipe: Recipe, answers: Any, max_new_tokens: int = 20) -> Any:
    """The served (detox) model's answers beside the raw arm's greedy answers to the same prompts, with toxicity.

    The raw arm is generated locally from its adapter (``<run_dir>/adapters/raw``) with the same greedy decoding.
    """
    import dataclasses

    import pandas as pd

    from detox_sft import evaluation
    from detox_sft.toxicity import load_scorer

    require(recipe.run_path / "adapters" / "raw" / "adapter_config.json", "1-sft")
    prompts = list(answers["prompt"])
    model, tokenizer = evaluation.load_arm_model(recipe, recipe.run_path, "raw")
    cfg = dataclasses.replace(recipe.evaluation, max_new_tokens=max_new_tokens)
    raw = [
        c[0]
        for c in evaluation.generate_continuations(
            model, tokenizer, [_served_input(p) for p in prompts], cfg, recipe.seed, greedy=True, progress=False
        )
    ]
    scorer = load_scorer(recipe.evaluation.scorers[0])
    detox = list(answers["answer"])
    return pd.DataFrame(
        {
            "prompt": prompts,
            "raw answer": raw,
            "detox answer (served)": detox,
            "raw toxicity": scorer(raw).round(3),
            "detox toxicity": scorer(detox).round(3),
        }
    )
