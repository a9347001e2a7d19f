"""The `detox-sft-dev` command: the development side of the tutorial, apart from what a workbench user imports.

    detox-sft-dev demo --recipe offline          # the four notebooks headless, with a local S3 and model server
    detox-sft-dev serve --models-dir ./models    # the caikit runtime on 127.0.0.1 (optionally from S3)
    detox-sft-dev slides slides/                 # the deck, rendered from the latest run
    detox-sft-dev rehearsal --recipe rehearsal-cpu

Errors of the helper package reach the user as `detox-sft` prints them (its exit codes too).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from detox_sft.cli import INPUT_ERRORS, STEP_ERRORS, _optional_recipe
from detox_sft.config import ExportConfig, StorageConfig
from detox_sft_dev.demo import run_demo
from detox_sft_dev.model_server import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, LocalModelServer, ServingError

__all__ = ["main"]


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", required=True, help="folder whose sub-folders are Caikit models (id = name)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP port (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (default %(default)s)")
    parser.add_argument(
        "--from-s3",
        nargs="?",
        const="",
        default=None,
        metavar="PREFIX",
        help="first download the Caikit model from this S3 prefix into MODELS_DIR/<model id> (default prefix: "
        "<storage.prefix>/caikit of the recipe); S3 settings from the data-connection variables AWS_*",
    )
    parser.add_argument("--model-id", default=None, help="served model id for --from-s3 (default: export.model_id)")
    parser.add_argument("--recipe", default=None, help="recipe name or path (model id and S3 prefix)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the model")


def _serve(args: argparse.Namespace) -> int:
    """(Download,) start, print the endpoints, serve until Ctrl-C or SIGTERM."""
    recipe = _optional_recipe(args)
    export_cfg = recipe.export if recipe else ExportConfig()
    storage_cfg = recipe.storage if recipe else StorageConfig()
    model_id = args.model_id or export_cfg.model_id
    from_s3 = None
    if args.from_s3 is not None:
        from_s3 = args.from_s3 or f"{storage_cfg.prefix}/caikit"
        target = Path(args.models_dir) / model_id
        print(f"downloading s3 prefix {from_s3!r} into {target} (as KServe's storage initializer)", flush=True)
    server = LocalModelServer(
        args.models_dir,
        args.http_port,
        args.grpc_port,
        startup_timeout=args.startup_timeout,
        from_s3=from_s3,
        model_id=model_id,
    )

    def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: stop the runtime cleanly
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        server.start()
        print(f"serving {', '.join(server.model_ids)}", flush=True)
        print(f"  HTTP  {server.http_url}  (POST /api/v1/task/text-generation, GET /health)", flush=True)
        print(f"  gRPC  {server.grpc_target}  (caikit.runtime.Nlp.NlpService, metadata mm-model-id)", flush=True)
        print("Ctrl-C to stop.", flush=True)
        code = server.wait()
        print(f"detox-sft-dev serve: the caikit runtime exited with code {code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the caikit runtime", flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="offline", help="recipe name or path (default: offline)")
    parser.add_argument("--runs-root", default="runs", help="where runs/<timestamp>/ is created")


def _demo(args: argparse.Namespace) -> int:
    """Run the four notebooks headless; prints the run directory."""
    run_demo(args.recipe, args.runs_root)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `detox-sft-dev` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["slides"]:  # the slide builder has its own parser
        from detox_sft_dev import slides

        return slides.main(argv[1:])
    if argv[:1] == ["rehearsal"]:
        from detox_sft_dev import rehearsal

        return rehearsal.main(argv[1:])
    parser = argparse.ArgumentParser(prog="detox-sft-dev", description="The tutorial's development side.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {
        "demo": ("run the four notebooks end to end on a recipe, with local S3 and model server", _add_demo, _demo),
        "serve": ("run the caikit runtime on 127.0.0.1 with a model directory (or from S3)", _add_serve, _serve),
    }
    for name, (help_text, add, _) in commands.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    sub.add_parser("slides", help="render the deck with the latest run's figures (see slides --help)")
    sub.add_parser("rehearsal", help="the notebooks on the full-size rehearsal recipe, timed (see rehearsal --help)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(commands[args.command][2](args) or 0)
    except KeyboardInterrupt:
        print(f"detox-sft-dev {args.command}: interrupted", file=sys.stderr)
        return 130
    except (*INPUT_ERRORS, *STEP_ERRORS, ServingError) as exc:
        print(f"detox-sft-dev {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
