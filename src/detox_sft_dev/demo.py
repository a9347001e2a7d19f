"""`make demo` / `detox-sft-dev demo`: the four notebooks, headless, end to end, with a local S3 and model server.

Flow: start SeaweedFS (S3) on 127.0.0.1 -> notebooks 1-3 with papermill (3 uploads the Caikit model to the bucket)
-> the caikit runtime downloads it from S3 (as KServe's storage initializer does) and serves it -> notebook 4 queries
it -> everything stops -> ``runs/<timestamp>/`` holds the executed notebooks and ``report.html``.

It also holds ``provenance.json`` (the commit, clean tree, command and measured files, taken as the demo starts) and
``kernels/<notebook>.json`` (torch's CPU capability as each kernel saw it, and the CPU pins of the recipe's
``cpu_isa``), which ``benchmarks/record_run.py`` copies into the record.
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from detox_sft import evaluation
from detox_sft.config import RECIPES_DIR, RunPaths, load_recipe
from detox_sft.files import atomic_write_text
from detox_sft_dev import provenance
from detox_sft_dev.model_server import LocalModelServer
from detox_sft_dev.s3 import LocalS3
from detox_sft_dev.zoo.build import CPU_PINS

__all__ = [
    "NOTEBOOKS",
    "NOTEBOOKS_DIR",
    "CPU_PINS",
    "execute_notebook",
    "kernel_setup",
    "run_demo",
    "text_progress_bars",
    "write_report",
]

NOTEBOOKS_DIR = RECIPES_DIR.parent / "notebooks"
NOTEBOOKS = ("1-sft", "2-eval", "3-save_convert_model", "4-inference_request")


# the recipe's cpu_isa applies zoo.build.CPU_PINS to the kernels and the model server (set for child processes,
# never in a process that has loaded the libraries already); each kernel records what it saw
_RECORDED_ENV = sorted({name for pins in CPU_PINS.values() for name in pins})


def kernel_setup(record: str) -> None:
    """Run before the first cell of a headless kernel: the package's progress bars as text (:func:`text_progress_bars`),
    and ``record`` (a JSON file) says which CPU capability torch dispatches to in this kernel, with the pins set."""
    import torch

    text_progress_bars()
    seen = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}
    seen["env"] = {name: os.environ[name] for name in _RECORDED_ENV if name in os.environ}
    atomic_write_text(Path(record), json.dumps(seen, indent=2) + "\n")


def text_progress_bars() -> None:
    """Make ``tqdm.auto`` draw text bars on ``sys.stdout``, redrawn at most every 2 s.

    A saved ipywidgets bar keeps the text of its first frame ("0%") and no one watches a papermill kernel's widgets; the
    text lines end at 100%, and _tidy_streams keeps each bar's last state. (stdout: notebooks show stderr in red.)
    """
    import tqdm.auto
    import tqdm.std

    class TextBar(tqdm.std.tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("file", sys.stdout)
            kwargs.setdefault("mininterval", 2.0)
            kwargs.setdefault("ncols", 100)
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = TextBar
    tqdm.auto.trange = lambda *args, **kwargs: TextBar(range(*args), **kwargs)


def _kernel_config() -> Any:
    from traitlets.config import Config

    # The kernel talks to papermill over local IPC sockets, not TCP: nothing listens on a port, and ipykernel's
    # "Kernel is running over TCP without encryption" warning (printed in every executed notebook) has no cause.
    return Config({"KernelManager": {"transport": "ipc"}})


def _overwritten(text: str) -> str:
    """What a terminal shows of ``text``: on each line, the part after the last carriage return (a redrawn bar)."""
    return "\n".join(next((p for p in reversed(line.split("\r")) if p), "") for line in text.split("\n"))


def _tidy_streams(path: Path) -> None:
    """Merge each cell's consecutive stream outputs (one per write, as the kernel sent them) and keep only the last
    state of every redrawn line: a finished progress bar reads 100%, once."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        outputs: list[dict[str, Any]] = []
        for out in cell.get("outputs", []):
            text = "".join(out["text"]) if out.get("output_type") == "stream" else None
            last = outputs[-1] if outputs else {}
            if text is not None and last.get("output_type") == "stream" and last["name"] == out["name"]:
                last["text"] += text
            elif text is not None:
                outputs.append({**out, "text": text})
            else:
                outputs.append(out)
        for out in outputs:
            if out.get("output_type") == "stream":
                out["text"] = _overwritten(out["text"])
        if "outputs" in cell:
            cell["outputs"] = [o for o in outputs if o.get("output_type") != "stream" or o["text"].strip()]
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def execute_notebook(name: str, out_dir: Path, parameters: dict[str, Any], notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """Run one notebook headless with papermill; the executed copy goes to ``out_dir/<name>.ipynb``."""
    import papermill

    source = notebooks_dir / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run the demo from a checkout of detox-sft")
    target = out_dir / f"{name}.ipynb"
    kernel_record = out_dir / "kernels" / f"{name}.json"
    kernel_record.parent.mkdir(parents=True, exist_ok=True)
    setup = f"__import__('detox_sft_dev.demo', fromlist=['_']).kernel_setup({str(kernel_record)!r})"
    print(f"\n=== notebook {name} ===", flush=True)
    started = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(target),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(notebooks_dir),
            # the cells' own output (progress bars of rephrasing, training, generation) streams to this terminal
            log_output=True,
            progress_bar=False,
            stdout_file=sys.stdout,
            stderr_file=sys.stderr,
            config=_kernel_config(),
            extra_arguments=[f"--IPKernelApp.exec_lines={setup}"],
        )
    finally:
        if target.is_file():
            _tidy_streams(target)
    print(f"=== {name} done in {time.perf_counter() - started:.0f} s ===", flush=True)
    return target


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}"><figcaption>'
        f"{html.escape(path.name)}</figcaption></figure>"
    )


_REPORT_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:14px;max-width:100%}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}figure{margin:1em 0}pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}"
    ".reading li{margin:0.3em 0}"
)


def _table(frame: Any) -> str:
    return frame.to_html(border=0, na_rep="", float_format=lambda v: f"{v:.3f}")


def write_report(out_dir: Path, run_dir: Path, recipe_name: str, seconds: float | None = None) -> Path:
    """A one-page HTML report: the metrics as ``value [low, high]`` (as notebook 2 shows them), the paired
    differences, every scorer and their agreement, the reading of the result as formatted text, the figures."""
    from markdown_it import MarkdownIt

    summary = RunPaths(run_dir).eval / "summary.md"
    results_path = RunPaths(run_dir).results
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>detox-sft-dev demo report</title>",
        f"<style>{_REPORT_CSS}</style>",
        "</head><body>",
        f"<h1>detox-sft-dev demo report</h1><p>recipe <b>{html.escape(recipe_name)}</b>, run directory "
        f"<code>{html.escape(str(run_dir))}</code>"
        + (f", {seconds / 60:.1f} min end to end" if seconds else "")
        + ". Reproduce with <code>make demo</code>.</p>",
    ]
    if results_path.is_file():
        results = evaluation.load_results(run_dir)
        reading = MarkdownIt("commonmark").render(evaluation.describe_result(results, markdown=True))
        parts += [
            "<h2>Toxicity of the generations</h2><p>Each cell: value [95% bootstrap interval over prompts].</p>",
            _table(evaluation.metrics_table(results)),
            f"<p>{html.escape(evaluation.judge_note(results) or '')}</p>",
            f"<p>{html.escape(evaluation.fluency_note(results) or '')}</p>",
            "<h2>Paired differences</h2><p>Prompt by prompt; * marks an interval that excludes zero.</p>",
            _table(evaluation.paired_table(results)),
            f'<h2>Reading</h2><div class="reading">{reading}</div>',
        ]
        if len(results.scorers) > 1:
            parts += [
                "<h2>Every scorer</h2>",
                _table(evaluation.scorer_table(results)),
                "<h3>Agreement between scorers (same continuations)</h3>",
                _table(evaluation.agreement_table(results)),
            ]
        if results.summary.get("nontoxic"):
            parts += ["<h2>Non-toxic prompts</h2>", _table(evaluation.metrics_table(results.summary["nontoxic"]))]
    elif summary.is_file():
        parts.append(f"<pre>{html.escape(summary.read_text())}</pre>")
    else:
        parts.append("<p><b>No evaluation results: notebook 2 did not finish.</b></p>")
    figures = sorted(RunPaths(run_dir).figures.glob("*.png"))
    if figures:
        parts.append("<h2>Figures</h2>")
        parts.extend(_img(f) for f in figures)
    notebooks = sorted(out_dir.glob("*.ipynb"))
    parts.append("<h2>Executed notebooks</h2><ul>")
    parts.extend(f'<li><a href="{html.escape(nb.name)}">{html.escape(nb.name)}</a></li>' for nb in notebooks)
    parts.append("</ul></body></html>")
    report = out_dir / "report.html"
    report.write_text("\n".join(parts))
    return report


def run_demo(recipe: str = "offline", runs_root: str | os.PathLike[str] = "runs", stamp: str | None = None) -> Path:
    """Run the whole tutorial headless on ``recipe``; return ``runs_root/<timestamp>``.

    Starts and stops its own S3 server and model server on free ports of 127.0.0.1. The recipe's ``cpu_isa`` pins
    the arithmetic of the kernels and the model server (:data:`CPU_PINS`).
    """

    started = time.perf_counter()
    out_dir = Path(runs_root).resolve() / (stamp or time.strftime("%Y%m%d-%H%M%S"))
    run_dir = out_dir / "run"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_recipe(recipe, run_dir=str(run_dir))
    (out_dir / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    recipe_file = Path(recipe) if Path(recipe).is_file() else RECIPES_DIR / f"{recipe}.yaml"
    measured = [__file__, *(NOTEBOOKS_DIR / f"{n}.ipynb" for n in NOTEBOOKS), recipe_file]
    # the zoo is reached through an entry point (detox_sft.refs), not an import
    prov = provenance.capture(*measured, modules=["detox_sft_dev.zoo"])
    atomic_write_text(out_dir / "provenance.json", json.dumps(prov, indent=2) + "\n")
    params = {"recipe": str(recipe), "run_dir": str(run_dir)}
    saved_env = dict(os.environ)
    with ExitStack() as stack:
        print("starting the local S3 server (SeaweedFS)...", flush=True)
        s3 = stack.enter_context(LocalS3(bucket="detox-sft"))
        # The kernels inherit this process's environment: the notebooks see a data connection, as on the cluster.
        os.environ.update(s3.env())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.update(CPU_PINS.get(cfg.cpu_isa, {}))
        try:
            for name in NOTEBOOKS[:3]:
                execute_notebook(name, out_dir, params)
            print("starting the local caikit runtime, model downloaded from S3...", flush=True)
            server = stack.enter_context(
                LocalModelServer(
                    out_dir / "serving" / "models", from_s3=f"{cfg.storage.prefix}/caikit", model_id=cfg.export.model_id
                )
            )
            execute_notebook(
                NOTEBOOKS[3],
                out_dir,
                {**params, "url": server.http_url, "grpc_target": server.grpc_target, "verify_tls": False},
            )
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
    report = write_report(out_dir, run_dir, cfg.name, time.perf_counter() - started)
    print(f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} min; report: {report}")
    print(out_dir)
    return out_dir


if __name__ == "__main__":  # pragma: no cover
    run_demo()
