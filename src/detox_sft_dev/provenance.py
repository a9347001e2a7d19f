"""What a run measured, taken as it starts: ``capture(entry_point, ...)`` gives the commit, whether the work tree was
clean, the command line and the git blob hash of every source file the run executes (its entry points and the
``detox_sft``/``detox_sft_dev`` modules they import, found from grimp's import graph; notebooks' code cells count).

The demo stores it in ``runs/<stamp>/provenance.json``; the benchmarks store it under a record's ``"provenance"`` key;
``benchmarks/provenance.py`` says which records are stale.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("detox_sft", "detox_sft_dev")


def git(*args: str, root: Path = ROOT) -> str:
    """Output of ``git ARGS`` in ``root`` (raises CalledProcessError outside a checkout)."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def relative(path: str | Path, root: Path = ROOT) -> str:
    """``path`` as a repository path when it lies in ``root``, else as given."""
    path = Path(path).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _source(path: Path) -> str:
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = [line for c in cells for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))  # IPython magics


def _imports(path: Path) -> set[str]:
    if path.suffix not in (".py", ".ipynb"):
        return set()  # a recipe, a data file: measured as itself
    imported = set()
    for node in ast.walk(ast.parse(_source(path))):  # function-level imports too: the benchmarks defer them
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from detox_sft import storage` imports the module detox_sft.storage
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return imported


def measured_files(*entry_points: str | Path, modules: Sequence[str] = ()) -> list[str]:
    """The entry points (scripts, notebooks, recipes), ``modules``, and every package module they import (anywhere in
    them, and transitively), as repository paths."""
    import grimp

    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    found = set()
    for module in (set().union(*map(_imports, map(Path, entry_points))) | set(modules)) & graph.modules:
        found |= {module} | graph.find_upstream_modules(module)
    # importing a module runs its parents' __init__ first
    found |= {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    paths = {relative(p) for p in entry_points} | {relative(importlib.util.find_spec(m).origin) for m in found}
    return sorted(paths)


def capture(*entry_points: str | Path, modules: Sequence[str] = (), command: Sequence[str] | None = None) -> dict:
    """The commit, whether the tracked tree was clean, the command line (default: ``sys.argv``) and the blob hash of
    each measured file (:func:`measured_files`): call it when the run starts, before it measures anything."""
    files = measured_files(*entry_points, modules=modules)
    argv = list(sys.argv if command is None else command)
    return {
        "commit": git("rev-parse", "HEAD"),
        "clean": git("status", "--porcelain", "--untracked-files=no") == "",
        "command": [relative(argv[0]) if Path(argv[0]).exists() else argv[0], *argv[1:]],
        "files": dict(zip(files, git("hash-object", "--", *files).split(), strict=True)),
    }
