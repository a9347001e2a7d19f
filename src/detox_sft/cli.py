"""The `detox-sft` command: one subcommand per pipeline step.

Each step's module defines ``add_arguments(parser)`` and ``main(args) -> int``; this file only wires them, so a
module owns its own flags. A step whose module is not there yet says so and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# subcommand -> (module that implements it, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "rephrase": ("detox_sft.rephrase", "detoxify a JSONL file with TrustyAI TMaRCo (gated, batched, resumable)"),
    "train": ("detox_sft.training", "QLoRA-tune the base model on the raw and/or the detoxified data"),
    "evaluate": ("detox_sft.evaluation", "generate on toxic prompts; toxicity with 95%% intervals"),
    "export": ("detox_sft.export", "merge the detox adapter; write the Hugging Face and the Caikit directories"),
    "upload": ("detox_sft.storage", "upload a directory to S3 (the data connection), checksummed and resumable"),
    "download": ("detox_sft.storage", "download an S3 prefix to a directory"),
    "serve": ("detox_sft.serving", "run the caikit runtime on 127.0.0.1 with a model directory (or from S3)"),
    "query": ("detox_sft.clients", "query a served model over HTTP (caikit or vLLM) or gRPC"),
    "demo": ("detox_sft.demo", "run the four notebooks end to end on a recipe, with local S3 and model server"),
}


class _NotBuilt(Exception):
    pass


def _load(command: str):
    module_name, _ = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise _NotBuilt(command) from exc
        raise
    add = getattr(module, f"add_{command}_arguments", None) or getattr(module, "add_arguments", None)
    run = getattr(module, f"{command}_main", None) or getattr(module, "main", None)
    if add is None or run is None:
        raise _NotBuilt(command)
    return add, run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every subcommand listed (flags load only for the chosen one)."""
    parser = argparse.ArgumentParser(
        prog="detox-sft",
        description="Detoxify fine-tuning data with TrustyAI TMaRCo, QLoRA-tune opt-350m, measure, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text.replace("%%", "%"), add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `detox-sft` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)  # prints help / usage errors
        parser.print_help()
        return 2
    command = argv[0]
    try:
        add, run = _load(command)
    except _NotBuilt:
        print(f"detox-sft {command}: not built yet in this version of detox-sft.", file=sys.stderr)
        return 3
    # help strings are %-formatted by argparse, descriptions are not
    sub = argparse.ArgumentParser(prog=f"detox-sft {command}", description=SUBCOMMANDS[command][1].replace("%%", "%"))
    add(sub)
    args = sub.parse_args(argv[1:])
    args.command = command
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"detox-sft {command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
