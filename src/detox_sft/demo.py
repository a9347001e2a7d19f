"""`make demo` / `detox-sft demo`: the four notebooks, headless, end to end, with a local S3 and model server.

Flow: start SeaweedFS (S3) on 127.0.0.1 -> notebooks 1-3 with papermill (3 uploads the Caikit model to the bucket)
-> the caikit runtime downloads it from S3 (as KServe's storage initializer does) and serves it -> notebook 4 queries
it -> everything stops -> ``runs/<timestamp>/`` holds the executed notebooks and ``report.html``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from detox_sft.config import RECIPES_DIR, load_recipe

__all__ = ["NOTEBOOKS", "NOTEBOOKS_DIR", "execute_notebook", "run_demo", "write_report", "add_arguments", "main"]

NOTEBOOKS_DIR = RECIPES_DIR.parent / "notebooks"
NOTEBOOKS = ("1-sft", "2-eval", "3-save_convert_model", "4-inference_request")


def execute_notebook(name: str, out_dir: Path, parameters: dict[str, Any], notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """Run one notebook headless with papermill; the executed copy goes to ``out_dir/<name>.ipynb``."""
    import papermill

    source = notebooks_dir / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run the demo from a checkout of detox-sft")
    target = out_dir / f"{name}.ipynb"
    print(f"\n=== notebook {name} ===", flush=True)
    started = time.perf_counter()
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
    )
    print(f"=== {name} done in {time.perf_counter() - started:.0f} s ===", flush=True)
    return target


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}"><figcaption>'
        f"{html.escape(path.name)}</figcaption></figure>"
    )


def write_report(out_dir: Path, run_dir: Path, recipe_name: str, seconds: float | None = None) -> Path:
    """A one-page HTML report: the metrics table with intervals, the reading of the result, the figures."""
    summary = run_dir / "eval" / "summary.md"
    results_path = run_dir / "eval" / "results.json"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>detox-sft demo report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "img{max-width:100%}figure{margin:1em 0}pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}</style>",
        "</head><body>",
        f"<h1>detox-sft demo report</h1><p>recipe <b>{html.escape(recipe_name)}</b>, run directory "
        f"<code>{html.escape(str(run_dir))}</code>"
        + (f", {seconds / 60:.1f} min end to end" if seconds else "")
        + ". Reproduce with <code>make demo</code>.</p>",
    ]
    if results_path.is_file():
        from detox_sft import evaluation

        results = evaluation.load_results(run_dir)
        parts.append("<h2>Toxicity of the generations (95% bootstrap intervals)</h2>")
        parts.append(evaluation.results_table(results).to_html(index=False, float_format=lambda v: f"{v:.4f}"))
        parts.append("<h2>Paired differences</h2>")
        parts.append(evaluation.differences_table(results).to_html(index=False, float_format=lambda v: f"{v:.4f}"))
        parts.append(f"<h2>Reading</h2><p>{html.escape(evaluation.describe_result(results))}</p>")
    elif summary.is_file():
        parts.append(f"<pre>{html.escape(summary.read_text())}</pre>")
    else:
        parts.append("<p><b>No evaluation results: notebook 2 did not finish.</b></p>")
    figures = sorted((run_dir / "figures").glob("*.png"))
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

    Starts and stops its own S3 server and model server on free ports of 127.0.0.1.
    """
    from detox_sft.local import LocalS3
    from detox_sft.serving import LocalModelServer

    started = time.perf_counter()
    out_dir = Path(runs_root).resolve() / (stamp or time.strftime("%Y%m%d-%H%M%S"))
    run_dir = out_dir / "run"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_recipe(recipe, run_dir=str(run_dir))
    (out_dir / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    params = {"recipe": str(recipe), "run_dir": str(run_dir)}
    saved_env = dict(os.environ)
    with ExitStack() as stack:
        print("starting the local S3 server (SeaweedFS)...", flush=True)
        s3 = stack.enter_context(LocalS3(bucket="detox-sft"))
        # The kernels inherit this process's environment: the notebooks see a data connection, as on the cluster.
        os.environ.update(s3.env())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `detox-sft demo`."""
    parser.add_argument("--recipe", default="offline", help="recipe name or path (default: offline)")
    parser.add_argument("--runs-root", default="runs", help="where runs/<timestamp>/ is created")


def main(args: argparse.Namespace) -> int:
    """`detox-sft demo`: run the four notebooks headless and print the run directory."""
    run_demo(args.recipe, args.runs_root)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(argparse.Namespace(recipe="offline", runs_root="runs")))
