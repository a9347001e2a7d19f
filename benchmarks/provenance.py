"""Ties each benchmark record to the code it measured, and says which records are stale.

A benchmark calls ``args = parse_args(parser, argv)`` (which adds ``--force``), then ``prov = start(parser, args,
RESULTS, __file__)`` before measuring: it refuses to overwrite a record made with other parameters and captures the
commit, whether the tree was clean, the command line and the blob hash of every file measured (the script and the
``detox_sft``/``detox_sft_dev`` modules it imports, found from grimp's import graph). It stores ``prov`` under the
record's ``"provenance"`` key and writes the record with ``write``.

``.venv/bin/python benchmarks/provenance.py`` prints each record's status (fresh, stale since <commit>, or no
provenance); ``--commands`` prints each record's own command, which ``make bench`` reruns.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("detox_sft", "detox_sft_dev")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _relative(path: str | Path) -> str:
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def measured_files(script: str | Path) -> list[str]:
    """The script and every package module it imports (anywhere in it, and transitively), as repository paths."""
    import grimp

    imported = set()
    for node in ast.walk(ast.parse(Path(script).read_text())):  # function-level imports too: the benchmarks defer them
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from detox_sft import storage` imports the module detox_sft.storage
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = set()
    for module in imported & graph.modules:
        modules |= {module} | graph.find_upstream_modules(module)
    # importing a module runs its parents' __init__ first
    modules |= {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    paths = {_relative(script)} | {_relative(importlib.util.find_spec(m).origin) for m in modules}
    return sorted(paths)


def capture(script: str | Path) -> dict:
    """The commit, tree cleanliness, command line and measured files' blob hashes, as the run starts."""
    files = measured_files(script)
    blobs = _git("hash-object", "--", *files).split()
    return {
        "commit": _git("rev-parse", "HEAD"),
        "clean": _git("status", "--porcelain") == "",
        "command": [_relative(sys.argv[0]), *sys.argv[1:]],
        "files": dict(zip(files, blobs, strict=True)),
    }


def recorded_command(record_path: Path) -> list[str] | None:
    """A record's own command (script path first): its provenance, else its "command", else BENCHMARKS.md's
    "Reproduce:" line of its section; None when none is known."""
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if "provenance" in record:
        return record["provenance"]["command"]
    text = record.get("command")
    if text is None:
        section = re.search(
            rf"^## {record_path.stem} — .*?(?=^## |\Z)", (ROOT / "BENCHMARKS.md").read_text(), re.M | re.S
        )
        found = section and re.search(r"Reproduce[^`]*`([^`]+)`", section.group(0))
        text = found.group(1) if found else None
    if text is None:
        return None
    words = shlex.split(text)
    start = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[start:]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` with ``--force`` added."""
    parser.add_argument("--force", action="store_true", help="replace a record made with different parameters")
    return parser.parse_args(argv)


def start(parser: argparse.ArgumentParser, args: argparse.Namespace, record_path: Path, script: str) -> dict:
    """Refuse (SystemExit) to overwrite ``record_path`` when it was made with other parameters, unless ``--force``;
    return the provenance to store in the new record."""
    recorded = recorded_command(record_path)
    if recorded is not None and not args.force:
        try:
            before = vars(parser.parse_args(recorded[1:]))
        except SystemExit:
            before = {}
        now = vars(args)
        differ = [k for k in now if k != "force" and before.get(k) != now[k]]
        if differ:
            changes = ", ".join(f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in differ)
            raise SystemExit(
                f"{_relative(record_path)} was made by `{shlex.join(recorded)}`; this run differs ({changes}). "
                "Rerun with its command (`make bench` does) or pass --force to replace it."
            )
    return capture(script)


def write(record_path: Path, record: dict) -> None:
    """Write the record atomically (a rerun trusts it)."""
    record_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=record_path.parent, suffix=".tmp", delete=False) as fh:
        fh.write(json.dumps(record, indent=2) + "\n")
    os.replace(fh.name, record_path)


def status(record: dict) -> str:
    """ "fresh", "stale since <commit>: <files>" (a measured file's blob differs from HEAD's), or "no provenance:
    re-measure"."""
    prov = record.get("provenance")
    if prov is None:
        return "no provenance: re-measure"
    files = prov["files"]
    head = dict(line.split()[2:4][::-1] for line in _git("ls-tree", "HEAD", "--", *files).splitlines())
    changed = sorted(f for f, blob in files.items() if head.get(f) != blob)
    if not changed:
        return "fresh"
    since = _git("log", "--reverse", "--format=%h", f"{prov['commit']}..HEAD", "--", *changed).split()
    if not since:  # no later commit touched them: the run measured uncommitted changes
        return f"stale since {prov['commit'][:7]} (measured uncommitted changes): {', '.join(changed)}"
    return f"stale since {since[0]}: {', '.join(changed)}"


def records() -> list[Path]:
    """The benchmark records (benchmarks/results/*.json; not the fault records)."""
    return sorted(RESULTS.glob("*.json"))


def main(argv: list[str] | None = None) -> int:
    """Print each record's status, or with ``--commands`` each record's own command (one a line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", action="store_true", help="print each record's command, for `make bench`")
    args = parser.parse_args(argv)
    for path in records():
        if args.commands:
            command = recorded_command(path)
            if command is None:
                raise SystemExit(f"{_relative(path)}: no command recorded; add a Reproduce: line to BENCHMARKS.md")
            print(shlex.join(command))
        else:
            print(f"{_relative(path)}: {status(json.loads(path.read_text()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
