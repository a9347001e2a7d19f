"""The `detox-sft` command: one subcommand per pipeline step, each a small function over the step's Python API.

The steps that run on a recipe (rephrase, train, evaluate, export) take every recipe field as a flag, parsed by
jsonargparse from the recipe's dataclasses (:func:`detox_sft.config.recipe_parser`: the type from the annotation, the
help from the field's docstring entry), and any trl.SFTConfig / peft.LoraConfig field under ``--training.sft.`` /
``--training.lora.``::

    detox-sft train --recipe offline --training.sft.learning_rate 1e-4 --training.lora.r 8 --seed 3
    detox-sft evaluate --recipe offline --evaluation.num_samples 2 --run-dir runs/x

The values are read by the field's type and checked when the recipe loads, as the YAML's are; a bad key names the
closest field. Exit codes: 0 done; 1 a step failed; 2 a bad command line, recipe or input file; 130 interrupted.
The package's errors reach the user as their message, which says what to do, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from detox_sft.clients import (
    CaikitHttpClient,
    GenerationParams,
    InsecureTokenError,
    ModelServerError,
    connect,
    read_token,
)
from detox_sft.config import (
    ARMS,
    ExportConfig,
    Recipe,
    RecipeError,
    ServingConfig,
    StorageConfig,
    load_recipe,
    recipe_parser,
)
from detox_sft.data import DataError, check_output, load_train_dataset, read_records, write_jsonl_atomic
from detox_sft.devices import DeviceError
from detox_sft.evaluation import MODELS, EvaluationError, evaluate_models, summary_markdown
from detox_sft.export import ExportError, export_model
from detox_sft.files import no_room_hint
from detox_sft.rephrase import CacheWriteError, EngineFailed, RephraseError, detoxify_training_set, rephrase_dataset
from detox_sft.storage import (
    DEFAULT_PREFIX,
    S3Settings,
    StorageError,
    download_prefix,
    upload_dir,
    upload_export,
    upload_prefix,
)
from detox_sft.toxicity import ScorerError
from detox_sft.training import TrainingError, is_main_process, load_arm_datasets, plot_loss_curves, train_arms

__all__ = ["SUBCOMMANDS", "INPUT_ERRORS", "STEP_ERRORS", "build_parser", "add_recipe_arguments", "main"]

# The package's typed errors; their messages name the fix. A bad recipe, flag or input file exits 2, a failed step 1
# (a step error wins: EngineFailed is a RephraseError, so that callers catching RephraseError still catch it).
INPUT_ERRORS: tuple[type[Exception], ...] = (RecipeError, DataError, DeviceError, RephraseError, TrainingError)
STEP_ERRORS: tuple[type[Exception], ...] = (
    CacheWriteError,
    EngineFailed,
    ScorerError,
    EvaluationError,
    ExportError,
    StorageError,
    ModelServerError,
    InsecureTokenError,
)
# The zoo is reached through refs.resolve_ref only (an entry point of detox_sft_dev), so its ZooError is known by its
# module.
_ZOO_MODULE = "detox_sft_dev.zoo"


# --------------------------------------------------------------------------------------------------------------------
# Recipe fields as flags
# --------------------------------------------------------------------------------------------------------------------

_DEST = "recipe:"  # the shortcut flags' dest prefix (--run-dir, --engine, --ray): each stands for a recipe field


class _HelpWithRecipeFields(argparse.Action):
    """``-h`` of a recipe step: the step's own flags, then every recipe field (:func:`recipe_parser`'s help)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show this help and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print("\n" + recipe_parser().format_help())
        parser.exit()


def add_recipe_arguments(parser: argparse.ArgumentParser, aliases: Mapping[str, str]) -> None:
    """``--recipe``, ``-h`` with the recipe's fields, and shortcut flags for some fields; every other flag is left to
    :func:`detox_sft.config.load_recipe` (``--seed 3``, ``--training.sft.learning_rate 1e-4``).

    Args:
        parser: the subcommand's parser (made with ``add_help=False``).
        aliases: shortcut flags for fields (``{"--run-dir": "run_dir"}``).
    """
    parser.add_argument("-h", "--help", action=_HelpWithRecipeFields)
    parser.add_argument("--recipe", default="offline", help="recipe name (offline, tutorial) or YAML path")
    group = parser.add_argument_group(
        "recipe fields",
        "--FIELD VALUE overrides the recipe's value of any field listed below (read by the field's type, checked as "
        "the YAML's are), and --training.sft.FIELD / --training.lora.FIELD any field of trl.SFTConfig and "
        "peft.LoraConfig, e.g. --training.sft.learning_rate 1e-4 --training.lora.r 8.",
    )
    for alias, target in aliases.items():
        group.add_argument(
            alias,
            dest=_DEST + target,
            default=argparse.SUPPRESS,
            metavar=target.rsplit(".", 1)[-1].upper(),
            help=f"shortcut for --{target}",
        )


def _recipe(args: argparse.Namespace) -> Recipe:
    shortcuts = [f"--{dest.removeprefix(_DEST)}={v}" for dest, v in vars(args).items() if dest.startswith(_DEST)]
    return load_recipe(args.recipe, [*shortcuts, *args.recipe_args])


# --------------------------------------------------------------------------------------------------------------------
# The subcommands
# --------------------------------------------------------------------------------------------------------------------


def _add_rephrase(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        default=None,
        help="input JSONL (one object per line) or Parquet file, local or s3://bucket/key; omitted: the recipe's "
        "training set (its data section, column mapping included), written to <run>/data/train_raw.jsonl and "
        "train_detox.jsonl for `detox-sft train`",
    )
    parser.add_argument("--output", default=None, help="output JSONL, local or s3://bucket/key (atomic); with --input")
    parser.add_argument("--field", default="text", help="the text field to detoxify (default: text)")
    parser.add_argument("--cache-dir", default=None, help="cache directory (default: <run>/rephrase/cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--ray",
        dest=_DEST + "rephrase.executor",
        action="store_const",
        const="ray",
        default=argparse.SUPPRESS,
        help="shortcut for --rephrase.executor ray (a Ray Data pipeline; joins the cluster when RAY_ADDRESS is set)",
    )
    parser.add_argument(
        "--keep-going",
        dest=_DEST + "rephrase.keep_going",
        action="store_const",
        const="true",
        default=argparse.SUPPRESS,
        help="shortcut for --rephrase.keep_going true (engine errors become counted error rows instead of failing)",
    )


def _rephrase(args: argparse.Namespace) -> int:
    """Every input record comes out, same order, with the rephrase fields added (or the recipe's training set's)."""
    recipe = _recipe(args)
    if args.input is None:
        if args.output is not None or args.cache_dir is not None:
            print("detox-sft rephrase: --output and --cache-dir go with --input.", file=sys.stderr)
            return 2
        dataset = load_train_dataset(recipe.data, recipe.seed)
        _, summary = detoxify_training_set(recipe, dataset["train"], progress=not args.no_progress)
        where = f"{recipe.paths.train_set('raw')} and {recipe.paths.train_set('detox')}"
        print(f"{summary.total} training samples -> {where}: {_summary_text(summary)}")
        return 0
    if args.output is None:
        print("detox-sft rephrase: --output is required with --input.", file=sys.stderr)
        return 2
    check_output(args.output)  # an unreachable s3:// output fails now, not after the rephrase
    try:
        records = read_records(args.input)
    except OSError as exc:
        print(f"detox-sft rephrase: {exc}", file=sys.stderr)
        return 2
    result = rephrase_dataset(
        records,
        recipe.rephrase,
        field=args.field,
        cache_dir=Path(args.cache_dir) if args.cache_dir else recipe.paths.rephrase_cache,
        progress=not args.no_progress,
    )
    write_jsonl_atomic(result.records, args.output)
    print(f"{result.summary.total} records -> {args.output}: {_summary_text(result.summary)}")
    return 0


def _summary_text(s: Any) -> str:
    """A :class:`detox_sft.rephrase.RephraseSummary` on one line."""
    return (
        f"{s.gated} at or above the gate ({s.gate_threshold}), "
        f"{s.rephrased} rephrased, {s.unchanged} unchanged, {s.missing} missing, {s.empty} empty, "
        f"{s.truncated} truncated, {s.errors} errors; {s.computed} computed, {s.cached} from the cache; "
        f"mean toxicity {_fmt(s.mean_toxicity_before, 3)} -> {_fmt(s.mean_toxicity_after, 3)} ({s.seconds:.1f} s)"
    )


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arm", choices=[*ARMS, "both"], default="both", help="which arm(s) to train")
    parser.add_argument("--overwrite", action="store_true", help="retrain arms that have finished before")


def _train(args: argparse.Namespace) -> int:
    """Train the arm(s), write the loss figure, print a summary table."""
    recipe = _recipe(args)
    arms = list(ARMS) if args.arm == "both" else [args.arm]
    results = train_arms(recipe, load_arm_datasets(recipe, arms), overwrite=args.overwrite)
    if not is_main_process():  # under torchrun rank 0 alone writes the figure and prints the table
        return 0
    with contextlib.suppress(TrainingError):
        plot_loss_curves(recipe.run_path)
    print("| arm | path | train loss | eval loss | wall s | samples/s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        m = r.metrics
        print(
            f"| {arm} | {m.get('path')} | {_fmt(m.get('train_loss'))} | {_fmt(m.get('final_eval_loss'))} | "
            f"{_fmt(m.get('wall_time_s'), 1)} | {_fmt(m.get('samples_per_s'), 2)} | "
            f"{_fmt((m.get('peak_memory_bytes') or 0) / 2**20, 0)} |"
        )
    return 0


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: base,raw,detox")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _evaluate(args: argparse.Namespace) -> int:
    """Print the summary table; the results, generations and figures go to the run directory."""
    recipe = _recipe(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = evaluate_models(recipe, recipe.run_path, models=models, progress=not args.quiet)
    print(summary_markdown(results))
    print(f"\nwritten: {recipe.paths.eval} and {recipe.paths.figures}")
    return 0


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arm", default="detox", choices=("detox", "raw"), help="adapter to export")


def _export(args: argparse.Namespace) -> int:
    result = export_model(_recipe(args), arm=args.arm)
    print(f"Hugging Face directory: {result.hf_dir}")
    print(f"Caikit directory:       {result.caikit_dir}")
    print(f"check generation:       {result.sample!r}")
    return 0


def _add_s3_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "connection",
        "default: the data-connection variables AWS_S3_ENDPOINT, AWS_S3_BUCKET, AWS_DEFAULT_REGION; "
        "the keys are read from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY only (never from the command line)",
    )
    group.add_argument("--endpoint", help="S3 endpoint URL (default $AWS_S3_ENDPOINT)")
    group.add_argument("--bucket", help="bucket (default $AWS_S3_BUCKET)")
    group.add_argument("--region", help="region (default $AWS_DEFAULT_REGION or us-east-1)")
    group.add_argument("--ca-bundle", help="CA bundle to verify the endpoint's TLS certificate")
    parser.add_argument("--recipe", help="recipe name or path: default prefix and concurrency (storage section)")
    parser.add_argument("--max-concurrency", type=int, help="parallel requests (default: storage.max_concurrency)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _s3_settings(args: argparse.Namespace) -> S3Settings:
    return S3Settings.from_env(
        endpoint=args.endpoint,
        bucket=args.bucket,
        region=args.region,
        **({"verify_tls": args.ca_bundle} if args.ca_bundle else {}),
    )


def _optional_recipe(args: argparse.Namespace) -> Recipe | None:
    # serving and storage commands run without a recipe too: loading one checks training.sft against trl (slow)
    return load_recipe(args.recipe) if args.recipe else None


def _add_upload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", help="directory to upload; omitted: the recipe's export (caikit and hf)")
    parser.add_argument(
        "--prefix", help="key prefix (default: <recipe prefix>/caikit for a Caikit dir, /hf for a Hugging Face dir)"
    )
    parser.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    parser.add_argument("--delete-extra", action="store_true", help="delete objects under the prefix not in DIR")
    _add_s3_arguments(parser)


def _upload(args: argparse.Namespace) -> int:
    recipe = _optional_recipe(args)
    settings = _s3_settings(args)
    if args.dir is None and recipe is None:
        print("detox-sft upload: give a DIR, or --recipe to upload that run's export.", file=sys.stderr)
        return 2
    try:
        if args.dir is None:
            for report in upload_export(
                recipe, settings=settings, create_bucket=args.create_bucket, progress=not args.no_progress
            ).values():
                print(report)
            return 0
        base = recipe.storage.prefix if recipe else DEFAULT_PREFIX
        report = upload_dir(
            args.dir,
            args.prefix if args.prefix is not None else upload_prefix(Path(args.dir), base),
            settings=settings,
            recipe=recipe,
            max_concurrency=args.max_concurrency,
            create_bucket=args.create_bucket,
            progress=not args.no_progress,
            delete_extra=args.delete_extra,
        )
    except FileNotFoundError as exc:  # DIR, or the recipe's export, is not there
        print(f"detox-sft upload: {exc}", file=sys.stderr)
        return 1
    print(report)
    if report.extra_keys and not args.delete_extra:
        print(
            f"note: {len(report.extra_keys)} objects under the prefix are not in {args.dir} "
            "(--delete-extra removes them).",
            file=sys.stderr,
        )
    return 0


def _add_download(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", help="key prefix, e.g. models/opt-350m-detox/caikit")
    parser.add_argument("dir", help="destination directory")
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="download even without a completion marker (objects uploaded by another tool)",
    )
    _add_s3_arguments(parser)


def _download(args: argparse.Namespace) -> int:
    recipe = _optional_recipe(args)
    storage = recipe.storage if recipe else StorageConfig()
    report = download_prefix(
        args.prefix,
        args.dir,
        settings=_s3_settings(args),
        max_concurrency=args.max_concurrency or storage.max_concurrency,
        require_complete=not args.allow_incomplete,
        progress=not args.no_progress,
    )
    print(report)
    return 0


class _RefuseTokenArgument(argparse.Action):
    """``--token`` is refused (without echoing it): a token on the command line shows in ``ps`` and shell history."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "--token is not accepted: a token on the command line shows in `ps` and the shell history. Fix: put it "
            "in the variable MODEL_TOKEN (or the one --token-env / serving.token_env names), or in a file "
            "(--token-file / serving.token_file)."
        )


def _add_query(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", metavar="TEXT", help="the prompt to continue")
    parser.add_argument("--url", default=None, help="server base URL (default: serving.url of the recipe)")
    parser.add_argument("--model-id", default=None, help="served model id (default: export.model_id of the recipe)")
    parser.add_argument(
        "--token-env",
        default=None,
        metavar="VAR",
        help="environment variable holding the bearer token (default: serving.token_env, MODEL_TOKEN)",
    )
    parser.add_argument(
        "--token-file", default=None, metavar="PATH", help="file holding the bearer token (serving.token_file)"
    )
    parser.add_argument("--token", nargs="?", action=_RefuseTokenArgument, help=argparse.SUPPRESS)
    parser.add_argument(
        "--grpc",
        default=None,
        metavar="HOST:PORT",
        help="query over caikit gRPC instead of HTTP (grpc://HOST:PORT plaintext, grpcs://HOST:PORT TLS; a bare "
        "HOST:PORT is plaintext to this machine only)",
    )
    parser.add_argument("--kind", choices=("caikit", "vllm"), default="caikit", help="server API (default caikit)")
    parser.add_argument("--ca-bundle", default=None, help="CA bundle (PEM) to verify the server's certificate")
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (test clusters only)")
    parser.add_argument("--recipe", default=None, help="recipe name or path (serving and export sections)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--sampling", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--truncate-input-tokens", type=int, default=None)
    parser.add_argument("--stream", action="store_true", help="stream (caikit HTTP; falls back when unsupported)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per request")


def _query(args: argparse.Namespace) -> int:
    """Print the generated text."""
    recipe = _optional_recipe(args)
    model_id = args.model_id or (recipe.export if recipe else ExportConfig()).model_id
    serving = recipe.serving if recipe else ServingConfig()
    serving = replace(
        serving,
        token_env=args.token_env or serving.token_env,
        token_file=args.token_file or serving.token_file,
    )
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens,
        decoding="sampling" if args.sampling else "greedy",
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
        truncate_input_tokens=args.truncate_input_tokens,
    )
    try:
        client = connect(
            recipe,
            url=args.url,
            grpc_target=args.grpc,
            kind=args.kind,
            token=read_token(serving),
            ca_bundle=args.ca_bundle,
            verify=False if args.insecure else None,
            timeout=args.timeout,
        )
        if args.stream and isinstance(client, CaikitHttpClient):
            for piece in client.generate_stream(model_id, args.text, params, fallback=True):
                print(piece, end="", flush=True)
            print()
        else:
            print(client.generate(model_id, args.text, params).text)
    except (ValueError, OSError) as exc:  # no URL, an unreadable token file or CA bundle
        print(f"detox-sft query: {exc}", file=sys.stderr)
        return 1
    return 0


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class Subcommand:
    """One `detox-sft` subcommand.

    Attributes:
        help (`str`): the one-line help (argparse %-formats it: ``%%`` for a percent sign).
        add_arguments (`Callable`): adds the step's own arguments (those that are not recipe fields).
        run (`Callable`): runs the step on the parsed arguments; returns the exit code.
        recipe_aliases (`dict` or `None`): `None`, or the command takes ``--recipe`` and every recipe field as a
            flag, with these shortcuts (``--run-dir`` for ``--run_dir``).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    recipe_aliases: dict[str, str] | None = None


_RUN_DIR = {"--run-dir": "run_dir"}

SUBCOMMANDS: dict[str, Subcommand] = {
    "rephrase": Subcommand(
        "detoxify a JSONL file (or the recipe's training set) with TrustyAI TMaRCo (gated, batched, resumable)",
        _add_rephrase,
        _rephrase,
        {**_RUN_DIR, "--engine": "rephrase.engine", "--device": "rephrase.device"},
    ),
    "train": Subcommand(
        "QLoRA-tune the base model on the raw and/or the detoxified data",
        _add_train,
        _train,
        {**_RUN_DIR, "--device": "training.device"},
    ),
    "evaluate": Subcommand(
        "generate on toxic prompts; toxicity with 95%% intervals",
        _add_evaluate,
        _evaluate,
        {**_RUN_DIR, "--device": "evaluation.device"},
    ),
    "export": Subcommand(
        "merge the detox adapter; write the Hugging Face and the Caikit directories", _add_export, _export, _RUN_DIR
    ),
    "upload": Subcommand(
        "upload a directory to S3 (the data connection), checksummed and resumable", _add_upload, _upload
    ),
    "download": Subcommand("download an S3 prefix to a directory", _add_download, _download),
    "query": Subcommand("query a served model over HTTP (caikit or vLLM) or gRPC", _add_query, _query),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, every subcommand with its flags."""
    parser = argparse.ArgumentParser(
        prog="detox-sft",
        description="Detoxify fine-tuning data with TrustyAI TMaRCo, QLoRA-tune opt-350m, measure, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        takes_recipe = command.recipe_aliases is not None
        step = sub.add_parser(
            name,
            help=command.help,
            description=command.help.replace("%%", "%"),
            usage="%(prog)s [-h] [ARGUMENTS] [--recipe R] [--FIELD VALUE ...]" if takes_recipe else None,
            allow_abbrev=False,  # --evaluation.num_sample must not quietly mean --evaluation.num_samples
            add_help=not takes_recipe,  # a recipe step's -h lists the recipe's fields too
        )
        command.add_arguments(step)
        if takes_recipe:
            add_recipe_arguments(step, command.recipe_aliases)
    return parser


def _is_package_error(exc: BaseException) -> bool:
    """One of the package's typed errors, whose message says what to do (anything else is a bug: traceback)."""
    return isinstance(exc, INPUT_ERRORS + STEP_ERRORS) or type(exc).__module__.startswith(_ZOO_MODULE)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `detox-sft` console script; returns the exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 2
    command = SUBCOMMANDS[args.command]
    try:
        if command.recipe_aliases is None:
            if extras:
                parser.error(f"unrecognized arguments: {' '.join(extras)}")
        else:
            args.recipe_args = extras  # the recipe's fields, parsed by load_recipe
        return int(command.run(args) or 0)
    except KeyboardInterrupt:
        print(f"detox-sft {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as exc:  # the package's typed errors become a message and an exit code; anything else is a bug
        hint = no_room_hint(exc) if isinstance(exc, OSError) else None
        if hint is not None:  # not a bug: the machine has no room; what the steps finished is complete (atomic writes)
            where = f" {exc.filename}" if exc.filename else ""
            print(
                f"detox-sft {args.command}: no room to write{where} ({exc.strerror or os.strerror(exc.errno)}: "
                f"{hint}). What finished before "
                "is kept complete. Fix: free disk space (or raise the limit), then rerun the same command: it resumes.",
                file=sys.stderr,
            )
            return 1
        if not _is_package_error(exc):
            raise
        print(f"detox-sft {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, INPUT_ERRORS) and not isinstance(exc, STEP_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
