"""The package's dependencies point one way: the import-linter contracts in pyproject.toml hold, and they can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(src: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(src), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_contracts_hold_and_a_reversed_import_breaks_them(tmp_path):
    """The contracts are kept on the real package; config importing a step (a reversed import) breaks two of them."""
    src = tmp_path / "src"
    for package in ("detox_sft", "detox_sft_dev"):
        shutil.copytree(ROOT / "src" / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    kept = _lint(src)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    config = src / "detox_sft" / "config.py"
    # inside a function, as a lazy import would be: import-linter sees those too
    config.write_text(config.read_text() + "\n\ndef _reversed():\n    from detox_sft import training  # noqa\n")
    broken = _lint(src)
    assert broken.returncode != 0
    assert "config imports nothing from the package BROKEN" in broken.stdout
    assert "Contracts: 1 kept, 2 broken." in broken.stdout  # the layers contract breaks too


def test_the_helper_package_importing_the_dev_package_breaks_a_contract(tmp_path):
    """The helper package never imports detox_sft_dev (the zoo, the local services): import-linter says so."""
    src = tmp_path / "src"
    for package in ("detox_sft", "detox_sft_dev"):
        shutil.copytree(ROOT / "src" / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    data = src / "detox_sft" / "data.py"
    data.write_text(data.read_text() + "\n\ndef _lazy_zoo():\n    from detox_sft_dev import zoo  # noqa\n")
    broken = _lint(src)
    assert broken.returncode != 0
    assert "The helper package never imports the development package" in broken.stdout
    assert "BROKEN" in broken.stdout


def test_every_helper_module_imports_without_the_dev_package(tmp_path):
    """A workbench without detox_sft_dev imports every module of detox_sft; a zoo: reference then says what to do."""
    code = f"""
import importlib, pkgutil, sys
sys.path.insert(0, {str(ROOT / "src")!r})
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name == "detox_sft_dev" or name.startswith("detox_sft_dev."):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, _Absent())
import importlib.metadata as md
_eps = md.entry_points
md.entry_points = lambda **kw: [] if kw.get("group") == "detox_sft.refs" else _eps(**kw)
import detox_sft
names = [m.name for m in pkgutil.walk_packages(detox_sft.__path__, "detox_sft.")]
for name in names:
    importlib.import_module(name)
assert not any(m.startswith("detox_sft_dev") for m in sys.modules)
from detox_sft.refs import resolve_ref
try:
    resolve_ref("zoo:opt")
except LookupError as exc:
    print("ZOO:", exc)
print("IMPORTED", len(names))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = int(out.stdout.split("IMPORTED")[1])
    assert imported >= 15  # every module, not an empty walk
    assert "ZOO: zoo:<name> references need the offline zoo" in out.stdout
    assert "Fix:" in out.stdout


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("detox_sft")
    modules = sorted(m for m in graph.modules if not graph.is_module_squashed(m))
    cycles = [
        (a, b)
        for i, a in enumerate(modules)
        for b in modules[i + 1 :]
        if not (b.startswith(a + ".") or a.startswith(b + "."))  # a package and its own parts are not a cycle
        and graph.chain_exists(a, b)
        and graph.chain_exists(b, a)
    ]
    assert cycles == []


def test_no_lazy_import_of_the_package():
    """Own-package imports sit at the top of each module, where a reader sees them (the zoo comes by entry point)."""
    lazy = []
    for path in sorted((ROOT / "src" / "detox_sft").rglob("*.py")):
        for line in path.read_text().splitlines():
            if line.startswith((" ", "\t")) and line.strip().startswith(("from detox_sft", "import detox_sft")):
                lazy.append(str(path.relative_to(ROOT)))
    assert lazy == [], lazy


def test_library_code_changes_no_process_wide_thread_setting():
    """torch's thread count is the caller's: no library code sets it (the zoo build's child gets OMP_NUM_THREADS=1)."""
    import ast

    setters = {"set_num_threads", "set_num_interop_threads"}
    found = []
    for path in sorted((ROOT / "src" / "detox_sft").rglob("*.py")):
        tree = ast.parse(path.read_text())
        owner = {}  # node -> the name of the innermost function holding it ("<module>" outside any)
        for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]:
            for node in ast.walk(scope):
                owner[node] = getattr(scope, "name", "<module>")
        for node, name in owner.items():
            if isinstance(node, ast.Attribute) and node.attr in setters:
                found.append(f"{path.relative_to(ROOT)}:{name}")
    assert found == [], found
