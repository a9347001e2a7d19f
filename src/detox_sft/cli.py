"""The `detox-sft` command: one subcommand per pipeline step, each a small function over the step's Python API.

The recipe steps (rephrase, train, evaluate, export) take every recipe field as a flag (:func:`detox_sft.config.
recipe_parser`), and any trl.SFTConfig / peft.LoraConfig field under ``--training.sft.`` / ``--training.lora.``::

    detox-sft train --recipe offline --training.sft.learning_rate 1e-4 --training.lora.r 8 --seed 3
    detox-sft evaluate --recipe offline --evaluation.num_samples 2 --run-dir runs/x

Every failure the user can act on is one message naming the fix, never a traceback, and its class is the exit status
(:data:`EXIT_STATUS`, printed by ``detox-sft --help``), so that a script or a Kubernetes Job can react.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from detox_sft import clients, config, storage
from detox_sft.config import ARMS, Recipe, RecipeError, load_recipe, recipe_parser
from detox_sft.data import DataError, check_output, load_train_dataset, read_records, write_jsonl_atomic
from detox_sft.devices import DeviceError
from detox_sft.evaluation import MODELS, EvaluationError, evaluate_models, summary_markdown
from detox_sft.export import ExportError, export_model
from detox_sft.files import NoRoomError, causes, no_room
from detox_sft.refs import ZooUnavailable
from detox_sft.rephrase import CacheWriteError, EngineFailed, RephraseError, detoxify_training_set, rephrase_dataset
from detox_sft.toxicity import ScorerError
from detox_sft.training import TrainingError, is_main_process, load_arm_datasets, plot_loss_curves, train_arms

__all__ = [
    "SUBCOMMANDS",
    "INPUT_ERRORS",
    "STEP_ERRORS",
    "EXIT_STATUS",
    "HubUnavailable",
    "build_parser",
    "main",
]

# The package's typed errors; their messages name the fix. A bad recipe, flag or input file exits 2, a failed step 1
# (a step error wins: EngineFailed is a RephraseError, so that callers catching RephraseError still catch it).
INPUT_ERRORS: tuple[type[Exception], ...] = (RecipeError, DataError, DeviceError, RephraseError, TrainingError)
INPUT_ERRORS += (ZooUnavailable,)
STEP_ERRORS: tuple[type[Exception], ...] = (CacheWriteError, EngineFailed, ScorerError, EvaluationError, ExportError)
STEP_ERRORS += (storage.StorageError, clients.ModelServerError, clients.InsecureTokenError)


class HubUnavailable(OSError):
    """A hub id is not in the cache, and the hub cannot be reached (HF_HUB_OFFLINE, no network) or has no such id."""


# The exit status of each class of failure, first row first: a full disk or a missing hub found anywhere in the error's
# causes outranks the step's own error around it (whose message is kept); else the outermost package error decides.
EXIT_STATUS: tuple[tuple[str, tuple[type[BaseException], ...], int], ...] = (
    ("no room on the disk (or past the file-size limit)", (NoRoomError,), 3),
    ("the S3 endpoint cannot be reached", (storage.S3UnavailableError,), 4),
    ("the model server cannot be reached", (clients.ServerUnavailable,), 5),
    ("the Hugging Face hub cannot be reached, or has no such id", (HubUnavailable,), 6),
    ("a step failed", STEP_ERRORS, 1),
    ("a bad command line, recipe or input file", INPUT_ERRORS, 2),
)
_EPILOG = "exit status: 0 done; " + "; ".join(f"{c} {what}" for what, _, c in sorted(EXIT_STATUS, key=lambda r: r[2]))
_EPILOG += "; 130 interrupted."
_NO_HUB_FIX = "use --recipe offline or a local path, or check the id and connect once to fill the cache"
_DEST = "recipe:"  # the shortcut flags' dest prefix (--run-dir, --engine, --ray): each stands for a recipe field


class _HelpWithRecipeFields(argparse.Action):
    """``-h`` of a recipe step: the step's own flags, then every recipe field (:func:`recipe_parser`'s help)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print("\n" + recipe_parser().format_help())
        parser.exit()


def _recipe(args: argparse.Namespace) -> Recipe:
    shortcuts = [f"--{dest.removeprefix(_DEST)}={v}" for dest, v in vars(args).items() if dest.startswith(_DEST)]
    return load_recipe(args.recipe, [*shortcuts, *args.recipe_args])


def _optional_recipe(args: argparse.Namespace) -> Recipe | None:
    # serving and storage commands run without a recipe too: loading one checks training.sft against trl (slow)
    return load_recipe(args.recipe) if args.recipe else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())  # a library's text may wrap
    print(f"detox-sft {args.command}: {one_line}", file=sys.stderr)
    return code


def _add_rephrase(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="JSONL or Parquet, local or s3://; default: the recipe's training set")
    parser.add_argument("--output", help="JSONL, local or s3:// (with --input)")
    parser.add_argument("--field", default="text", help="the text field to detoxify")
    parser.add_argument("--cache-dir", help="default: <run>/rephrase/cache")
    parser.add_argument("--no-progress", action="store_true")
    for flag, field, value in (("--ray", "executor", "ray"), ("--keep-going", "keep_going", "true")):
        dest, text = _DEST + "rephrase." + field, f"shortcut for --rephrase.{field} {value}"
        parser.add_argument(flag, dest=dest, action="store_const", const=value, default=argparse.SUPPRESS, help=text)


def _rephrase(args: argparse.Namespace) -> int:
    """Every input record comes out, same order, with the rephrase fields added (or the recipe's training set's)."""
    recipe, progress = _recipe(args), not args.no_progress
    if args.input is None:
        if args.output is not None or args.cache_dir is not None:
            return _fail(args, "--output and --cache-dir go with --input.", 2)
        dataset = load_train_dataset(recipe.data, recipe.seed)
        _, summary = detoxify_training_set(recipe, dataset["train"], progress=progress)
        where = f"{recipe.paths.train_set('raw')} and {recipe.paths.train_set('detox')}"
        print(f"{summary.total} training samples -> {where}: {_summary_text(summary)}")
        return 0
    if args.output is None:
        return _fail(args, "--output is required with --input.", 2)
    check_output(args.output)  # an unreachable s3:// output fails now, not after the rephrase
    try:
        records = read_records(args.input)
    except OSError as exc:
        return _fail(args, str(exc), 2)
    cache_dir = Path(args.cache_dir) if args.cache_dir else recipe.paths.rephrase_cache
    result = rephrase_dataset(records, recipe.rephrase, field=args.field, cache_dir=cache_dir, progress=progress)
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
    parser.add_argument("--arm", choices=[*ARMS, "both"], default="both")
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
    print("| arm | path | train loss | eval loss | wall s | samples/s | peak MiB |\n|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        m = r.metrics
        print(
            f"| {arm} | {m.get('path')} | {_fmt(m.get('train_loss'))} | {_fmt(m.get('final_eval_loss'))} | "
            f"{_fmt(m.get('wall_time_s'), 1)} | {_fmt(m.get('samples_per_s'), 2)} | "
            f"{_fmt((m.get('peak_memory_bytes') or 0) / 2**20, 0)} |"
        )
    return 0


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
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
    parser.add_argument("--arm", default="detox", choices=("detox", "raw"))


def _export(args: argparse.Namespace) -> int:
    result = export_model(_recipe(args), arm=args.arm)
    print(f"Hugging Face directory: {result.hf_dir}\nCaikit directory:       {result.caikit_dir}")
    print(f"check generation:       {result.sample!r}")
    return 0


def _add_s3_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection", "keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY only")
    group.add_argument("--endpoint", help="S3 endpoint URL (default $AWS_S3_ENDPOINT)")
    group.add_argument("--bucket", help="bucket (default $AWS_S3_BUCKET)")
    group.add_argument("--region", help="region (default $AWS_DEFAULT_REGION or us-east-1)")
    group.add_argument("--ca-bundle", help="CA bundle to verify the endpoint's TLS certificate")
    parser.add_argument("--recipe", help="recipe name or path (storage section)")
    parser.add_argument("--max-concurrency", type=int, help="default: storage.max_concurrency")
    parser.add_argument("--no-progress", action="store_true")


def _s3_settings(args: argparse.Namespace) -> storage.S3Settings:
    tls = {"verify_tls": args.ca_bundle} if args.ca_bundle else {}
    return storage.S3Settings.from_env(endpoint=args.endpoint, bucket=args.bucket, region=args.region, **tls)


def _add_upload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", help="directory to upload; omitted: the recipe's export (caikit and hf)")
    parser.add_argument("--prefix", help="key prefix (default: <recipe prefix>/caikit for a Caikit dir, /hf for HF)")
    parser.add_argument("--create-bucket", action="store_true")
    parser.add_argument("--delete-extra", action="store_true", help="delete objects under the prefix not in DIR")
    _add_s3_arguments(parser)


def _upload(args: argparse.Namespace) -> int:
    recipe = _optional_recipe(args)
    options = dict(settings=_s3_settings(args), create_bucket=args.create_bucket, progress=not args.no_progress)
    if args.dir is None and recipe is None:
        return _fail(args, "give a DIR, or --recipe to upload that run's export.", 2)
    try:
        if args.dir is None:
            print(*storage.upload_export(recipe, **options).values(), sep="\n")
            return 0
        prefix = args.prefix
        if prefix is None:
            prefix = storage.upload_prefix(Path(args.dir), recipe.storage.prefix if recipe else storage.DEFAULT_PREFIX)
        options.update(max_concurrency=args.max_concurrency, delete_extra=args.delete_extra)
        report = storage.upload_dir(args.dir, prefix, recipe=recipe, **options)
    except FileNotFoundError as exc:  # DIR, or the recipe's export, is not there
        return _fail(args, str(exc), 1)
    print(report)
    if report.extra_keys and not args.delete_extra:
        extra = f"{len(report.extra_keys)} objects under the prefix are not in {args.dir} (--delete-extra removes them)"
        print(f"note: {extra}.", file=sys.stderr)
    return 0


def _add_download(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", help="key prefix, e.g. models/opt-350m-detox/caikit")
    parser.add_argument("dir", help="destination directory")
    parser.add_argument("--allow-incomplete", action="store_true", help="download without a completion marker")
    _add_s3_arguments(parser)


def _download(args: argparse.Namespace) -> int:
    recipe = _optional_recipe(args)
    concurrency = args.max_concurrency or (recipe.storage if recipe else config.StorageConfig()).max_concurrency
    options = dict(max_concurrency=concurrency, require_complete=not args.allow_incomplete, settings=_s3_settings(args))
    print(storage.download_prefix(args.prefix, args.dir, progress=not args.no_progress, **options))
    return 0


class _RefuseTokenArgument(argparse.Action):
    """``--token`` is refused (without echoing it): a token on the command line shows in ``ps`` and shell history."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--token is not accepted (it shows in `ps`). Fix: use $MODEL_TOKEN, --token-env or --token-file.")


def _add_query(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("text", metavar="TEXT", help="the prompt to continue")
    add("--url", help="server base URL (default: serving.url of the recipe)")
    add("--model-id", help="served model id (default: export.model_id of the recipe)")
    add("--token-env", metavar="VAR", help="variable holding the bearer token (default: serving.token_env)")
    add("--token-file", metavar="PATH", help="file holding the bearer token (serving.token_file)")
    add("--token", nargs="?", action=_RefuseTokenArgument, help=argparse.SUPPRESS)
    add("--grpc", metavar="HOST:PORT", help="caikit gRPC instead of HTTP (grpc:// plaintext, grpcs:// TLS)")
    add("--kind", choices=("caikit", "vllm"), default="caikit")
    add("--ca-bundle", help="CA bundle (PEM) to verify the server's certificate")
    add("--insecure", action="store_true", help="do not verify TLS certificates (test clusters only)")
    add("--recipe", help="recipe name or path (serving and export sections)")
    add("--max-new-tokens", type=int, default=20)
    add("--sampling", action="store_true", help="instead of greedy decoding")
    add("--top-p", type=float)
    add("--temperature", type=float)
    add("--seed", type=int)
    add("--truncate-input-tokens", type=int)
    add("--stream", action="store_true", help="stream (caikit HTTP; falls back when unsupported)")
    add("--timeout", type=float, help="seconds per request")


def _query(args: argparse.Namespace) -> int:
    """Print the generated text."""
    recipe = _optional_recipe(args)
    model_id = args.model_id or (recipe.export if recipe else config.ExportConfig()).model_id
    serving = recipe.serving if recipe else config.ServingConfig()
    token_env, token_file = args.token_env or serving.token_env, args.token_file or serving.token_file
    serving = replace(serving, token_env=token_env, token_file=token_file)
    sampling = {key: getattr(args, key) for key in ("top_p", "temperature", "seed", "truncate_input_tokens")}
    decoding = "sampling" if args.sampling else "greedy"
    params = clients.GenerationParams(max_new_tokens=args.max_new_tokens, decoding=decoding, **sampling)
    options = dict(url=args.url, grpc_target=args.grpc, kind=args.kind, ca_bundle=args.ca_bundle, timeout=args.timeout)
    try:
        verify, token = False if args.insecure else None, clients.read_token(serving)
        client = clients.connect(recipe, token=token, verify=verify, **options)
        if args.stream and isinstance(client, clients.CaikitHttpClient):
            for piece in client.generate_stream(model_id, args.text, params, fallback=True):
                print(piece, end="", flush=True)
            print()
        else:
            print(client.generate(model_id, args.text, params).text)
    except (ValueError, OSError) as exc:  # no URL, an unreadable token file or CA bundle
        return _fail(args, str(exc), 1)
    return 0


class Subcommand(NamedTuple):
    """A subcommand: help (%-formatted), its arguments, the step, and `None` or its recipe fields' shortcut flags."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    recipe_aliases: dict[str, str] | None = None


def _shortcuts(*fields: str) -> dict[str, str]:
    """Shortcut flags of recipe fields, named by the field's last part: ``--run-dir`` for ``run_dir``."""
    return {"--" + name.rsplit(".", 1)[-1].replace("_", "-"): name for name in ("run_dir", *fields)}


SUBCOMMANDS: dict[str, Subcommand] = {
    "rephrase": Subcommand(
        "detoxify data with TrustyAI TMaRCo", _add_rephrase, _rephrase, _shortcuts("rephrase.engine", "rephrase.device")
    ),
    "train": Subcommand(
        "QLoRA-tune the base model on raw and/or detoxified data", _add_train, _train, _shortcuts("training.device")
    ),
    "evaluate": Subcommand(
        "toxicity of generations with 95%% intervals", _add_evaluate, _evaluate, _shortcuts("evaluation.device")
    ),
    "export": Subcommand(
        "merge the detox adapter; write the HF and the Caikit directories", _add_export, _export, _shortcuts()
    ),
    "upload": Subcommand("upload a directory to S3 (the data connection), checksummed", _add_upload, _upload),
    "download": Subcommand("download an S3 prefix to a directory", _add_download, _download),
    "query": Subcommand("query a served model over HTTP (caikit or vLLM) or gRPC", _add_query, _query),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, every subcommand with its flags."""
    parser = argparse.ArgumentParser(
        prog="detox-sft",
        description="Detoxify fine-tuning data with TrustyAI TMaRCo, QLoRA-tune opt-350m, measure, serve.",
        epilog=_EPILOG,
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
        if not takes_recipe:
            continue
        # -h with the recipe's fields, --recipe, and the shortcut flags of fields ({"--run-dir": "run_dir"})
        step.add_argument("-h", "--help", action=_HelpWithRecipeFields, nargs=0, default=argparse.SUPPRESS)
        step.add_argument("--recipe", default="offline", help="recipe name (offline, tutorial) or YAML path")
        group = step.add_argument_group(
            "recipe fields",
            "--FIELD VALUE overrides any field listed below, --training.sft.FIELD / --training.lora.FIELD any field of "
            "trl.SFTConfig / peft.LoraConfig, e.g. --training.sft.learning_rate 1e-4 --training.lora.r 8.",
        )
        for alias, target in command.recipe_aliases.items():
            metavar, help_ = target.rsplit(".", 1)[-1].upper(), f"shortcut for --{target}"
            group.add_argument(alias, dest=_DEST + target, default=argparse.SUPPRESS, metavar=metavar, help=help_)
    return parser


def _hub_unavailable(exc: BaseException) -> HubUnavailable | None:
    """The :class:`HubUnavailable` behind ``exc`` (transformers re-raises the hub's errors as a bare OSError)."""
    for cause in causes(exc):
        if isinstance(cause, HubUnavailable):
            return cause
        missing = (LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
        # datasets reports an unreachable hub as a bare ConnectionError naming the hub (no hub error type in its chain)
        datasets_offline = type(cause) is ConnectionError and "on the Hub" in str(cause)
        if isinstance(cause, missing + (DatasetNotFoundError,)) or datasets_offline:
            error = HubUnavailable(
                f"cannot load from the Hugging Face hub ({type(cause).__name__}): it cannot be reached "
                f"(HF_HUB_OFFLINE or no network) or has no such id, and the cache holds no copy. Fix: {_NO_HUB_FIX}."
            )
            error.__cause__ = cause
            return error
    return None


def _error_message(exc: Exception) -> tuple[str, int] | None:
    """The message and exit status of an error the user can act on; `None` for a bug (it keeps its traceback)."""
    environment = no_room(exc) or _hub_unavailable(exc)
    typed = next((e for e in causes(exc) if isinstance(e, INPUT_ERRORS + STEP_ERRORS)), None)
    # the zoo is reached through refs.resolve_ref only (an entry point of detox_sft_dev): its errors are known by module
    if typed is None and type(exc).__module__.startswith("detox_sft_dev.zoo"):
        typed = exc  # a step failed
    if environment is None and typed is None:
        return None
    if isinstance(environment, NoRoomError):
        fix = "Fix: free disk space (or raise the limit), then rerun the same command: it resumes."
        where = f" {environment.filename}" if environment.filename else ""
        ours = f"no room to write{where} ({environment.strerror}). What finished before is kept complete. {fix}"
    else:
        fix, ours = f"Fix: {_NO_HUB_FIX}.", str(environment)
    if typed is not None or exc is environment:  # the package's own message says which step and file
        message = str(typed or exc)
        if environment is not None and "Fix:" not in message:  # a step's error that only passes the library's text on
            message += f" {fix}"
    else:
        message = ours
    for _, classes, code in EXIT_STATUS:
        if isinstance(environment, classes) or isinstance(typed, classes):
            return message, code
    return message, 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `detox-sft` console script; returns the exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 2
    command = SUBCOMMANDS[args.command]
    try:
        if command.recipe_aliases is None and extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.recipe_args = extras  # the recipe's fields, parsed by load_recipe
        return int(command.run(args) or 0)
    except KeyboardInterrupt:
        return _fail(args, "interrupted; rerun the same command to resume.", 130)
    except Exception as exc:  # the package's typed errors become a message and an exit code; anything else is a bug
        known = _error_message(exc)
        if known is None:
            raise
        return _fail(args, *known)


if __name__ == "__main__":
    sys.exit(main())
