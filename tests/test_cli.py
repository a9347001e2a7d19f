import subprocess
import sys

from detox_sft.cli import SUBCOMMANDS, main

PIPELINE = ["rephrase", "train", "evaluate", "export", "upload", "download", "serve", "query", "demo"]


def test_help_lists_the_nine_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "detox_sft.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in PIPELINE:
        assert f"    {name}" in out
    assert list(SUBCOMMANDS) == PIPELINE


def test_every_subcommand_is_built_and_has_help(capsys):
    # "not built yet" (exit 3) must not be the answer of any shipped subcommand
    for name in PIPELINE:
        try:
            code = main([name, "--help"])
        except SystemExit as exc:  # argparse exits 0 after printing help
            code = exc.code
        assert code == 0, name
        assert f"detox-sft {name}" in capsys.readouterr().out


def test_unknown_subcommand_fails(capsys):
    try:
        code = main(["frobnicate"])
    except SystemExit as exc:
        code = exc.code
    assert code != 0
