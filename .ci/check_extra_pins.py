"""The [openshift] extra installs beside the pinned stack without moving a pin: pip's resolver, dry run.

Run by .ci/run (needs the package index): resolves requirements.txt together with the extra's requirements from
pyproject.toml and fails if any package of requirements.txt would be installed at another version.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[_name(match.group(1))] = match.group(2)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["openshift"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--quiet",
                "--ignore-installed",
                "--report",
                str(report),
                "-r",
                str(ROOT / "requirements.txt"),
                *extra,
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            print(
                f"the [openshift] extra does not resolve with requirements.txt:\n{run.stderr[-3000:]}", file=sys.stderr
            )
            return 1
        chosen = {
            _name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
        }
    # (a local version label is the same release: torch 2.13.0+cpu is the CPU build of 2.13.0)
    moved = {n: (v, chosen[n]) for n, v in pins.items() if n in chosen and chosen[n].split("+")[0] != v}
    missing = [n for n in pins if n not in chosen]
    if moved or missing:
        print(f"the [openshift] extra moves pins {moved} (missing: {missing})", file=sys.stderr)
        return 1
    added = sorted(set(chosen) - set(pins))
    print(f"[openshift] extra ({', '.join(extra)}): every pin of requirements.txt kept; adds {len(added)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
