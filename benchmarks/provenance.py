"""Ties each record to the code it measured, and says which records are stale.

Records: the benchmarks' ``benchmarks/results/*.json``, the fault trials' ``benchmarks/results/faults/**/*.json`` and
the demo's ``results/*/record.json``. Each keeps, under ``"provenance"``, what :func:`capture` took as its run started
(the commit, whether the tree was clean, the command line, the blob hash of every file measured: the entry point and
the package modules it imports, from grimp's import graph).

* A benchmark calls ``args = parse_args(parser, argv)`` (which adds ``--force``), then ``prov = start(parser, args,
  RESULTS, __file__)`` before measuring (it refuses to overwrite a record made with other parameters), stores ``prov``
  under the record's ``"provenance"`` key and writes the record with :func:`write`.
* Any other run: ``prov = capture(__file__)`` (or ``capture(script, command=argv)``) at its start; the demo stores
  its own in ``runs/<stamp>/provenance.json`` and ``benchmarks/record_run.py`` copies it into the record.
* :func:`status` says "fresh", "stale since <commit>: <files>", "foreign ...: re-measure" or "no provenance:
  re-measure"; :func:`page_line` is that status as a Markdown line for a page (FAULTS.md prints one per record).

``.venv/bin/python benchmarks/provenance.py`` prints every record's status; ``--pages`` rewrites BENCHMARKS.md's
record-status block (tests/test_benchmarks.py fails when the block disagrees with the records); ``--commands``
prints each benchmark record's own command, which ``make bench`` reruns.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
from pathlib import Path

from detox_sft.files import atomic_write_text
from detox_sft_dev.provenance import ROOT, capture, git, relative

__all__ = ["capture", "page_line", "parse_args", "records", "render_pages", "start", "status", "write"]

RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- record status:.*?-->\n).*?(<!-- end record status -->)", re.S)


def recorded_command(record_path: Path) -> list[str] | None:
    """A record's own command (script path first): its provenance, else its "command", else BENCHMARKS.md's
    "Reproduce:" line of its section; None when none is known."""
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if "provenance" in record:
        return record["provenance"]["command"]
    text = record.get("command")
    if text is None:
        section = re.search(rf"^## {record_path.stem} — .*?(?=^## |\Z)", PAGE.read_text(), re.M | re.S)
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
                f"{relative(record_path)} was made by `{shlex.join(recorded)}`; this run differs ({changes}). "
                "Rerun with its command (`make bench` does) or pass --force to replace it."
            )
    return capture(script)


def write(record_path: Path, record: dict) -> None:
    """Write the record atomically (a rerun trusts it)."""
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")


def status(record: dict, root: Path = ROOT) -> str:
    """The record's standing against the code in ``root``'s work tree.

    Returns:
        "fresh" (every measured file as it was measured), "stale since <commit>: <files>" (the first later commit
        that changed one; "<commit> (uncommitted changes)" when no commit did), "foreign commit <commit> (not an
        ancestor of HEAD): re-measure", or "no provenance: re-measure".
    """
    prov = record.get("provenance")
    if prov is None:
        return "no provenance: re-measure"
    commit = prov["commit"]
    if subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=root, capture_output=True).returncode:
        return f"foreign commit {commit[:7]} (not an ancestor of HEAD): re-measure"
    files = prov["files"]
    present = [f for f in files if (root / f).is_file()]
    now = dict(zip(present, git("hash-object", "--", *present, root=root).split(), strict=True)) if present else {}
    changed = sorted(f for f, blob in files.items() if now.get(f) != blob)
    if not changed:
        return "fresh"
    since = git("log", "--reverse", "--format=%h", f"{commit}..HEAD", "--", *changed, root=root).split()
    since_text = since[0] if since else f"{commit[:7]} (uncommitted changes)"
    return f"stale since {since_text}: {', '.join(changed)}"


def page_line(record: dict, root: Path = ROOT) -> str:
    """The record's status as one Markdown line for a page: "**stale since <commit>**: files (measured at <commit>,
    clean tree)", "fresh (measured at ...)", "**no provenance: re-measure**"."""
    prov = record.get("provenance")
    text = status(record, root)
    if prov is None:
        return f"**{text}**"
    state, _, rest = text.partition(": ")
    at = f"measured at {prov['commit'][:7]}, {'clean tree' if prov['clean'] else 'tree not clean'}"
    if state == "fresh":
        return f"fresh ({at})"
    return f"**{state}**: {rest} ({at})"


def records(kind: str = "all", root: Path = ROOT) -> list[Path]:
    """The records: "bench" (benchmarks/results/*.json), "faults" (benchmarks/results/faults/**/*.json), "results"
    (results/*/record.json, the demo's and the rehearsal's), or "all"."""
    found = {
        "bench": sorted((root / "benchmarks" / "results").glob("*.json")),
        "results": sorted((root / "results").glob("*/record.json")),
        "faults": sorted((root / "benchmarks" / "results" / "faults").rglob("*.json")),
    }
    return [p for k in ("bench", "results", "faults") if kind in (k, "all") for p in found[k]]


def render_pages(page: Path = PAGE, root: Path = ROOT) -> str:
    """``page`` with its record-status block listing each benchmark and results record's :func:`page_line`."""
    lines = [
        f"- `{relative(path, root)}`: {page_line(json.loads(path.read_text()), root)}"
        for path in records("bench", root) + records("results", root)
    ]
    text = page.read_text()
    if not BLOCK.search(text):
        raise SystemExit(f"{page} has no '<!-- record status: ... -->' ... '<!-- end record status -->' block")
    return BLOCK.sub(lambda m: m.group(1) + "\n".join(lines) + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    """Print each record's status; ``--pages`` rewrites BENCHMARKS.md's status block; ``--commands`` prints each
    benchmark record's command (one a line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--commands", action="store_true", help="print each benchmark's command, for `make bench`")
    group.add_argument("--pages", action="store_true", help="rewrite BENCHMARKS.md's record-status block")
    args = parser.parse_args(argv)
    if args.pages:
        atomic_write_text(PAGE, render_pages())
        return 0
    for path in records("bench" if args.commands else "all"):
        if args.commands:
            command = recorded_command(path)
            if command is None:
                raise SystemExit(f"{relative(path)}: no command recorded; add a Reproduce: line to BENCHMARKS.md")
            print(shlex.join(command))
        else:
            print(f"{relative(path)}: {status(json.loads(path.read_text()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
