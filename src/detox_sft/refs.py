"""Model and dataset references: a hub id, a local path, or ``zoo:<name>`` for the offline zoo.

``from_pretrained(resolve_ref(ref), **revision_kwargs(ref, revision))``. ``zoo:<name>`` is resolved by the entry point
``zoo`` of the group ``detox_sft.refs``, which the development package ``detox_sft_dev`` registers (never imported
here, so a workbench without it loads hub ids and local paths as usual).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["ZOO_PREFIX", "ENTRY_POINT_GROUP", "ZooUnavailable", "resolve_ref", "is_hub_ref", "revision_kwargs"]

ZOO_PREFIX = "zoo:"
ENTRY_POINT_GROUP = "detox_sft.refs"


class ZooUnavailable(LookupError):
    """A ``zoo:<name>`` reference without the development package that resolves it; the message says the fix."""


def resolve_ref(ref: str) -> str:
    """A reference as a loader takes it: ``zoo:<name>`` as the zoo artifact's path (built on first use), a local path
    made absolute (some loaders read bare relative names as hub ids), a hub id as given."""
    if ref.startswith(ZOO_PREFIX):
        if not (found := entry_points(group=ENTRY_POINT_GROUP, name="zoo")):
            raise ZooUnavailable(
                "zoo:<name> references need the offline zoo, which the development package detox_sft_dev provides. "
                "Fix: install the repository (`pip install -e .` or `make setup`), or give a hub id or a local path."
            )
        return str(next(iter(found)).load()(ref[len(ZOO_PREFIX) :]))
    local = Path(ref).expanduser()
    if local.exists():
        return str(local.resolve())
    return ref


def is_hub_ref(ref: str) -> bool:
    """Whether a reference names a hub repository: neither ``zoo:<name>`` nor an existing local path."""
    return not ref.startswith(ZOO_PREFIX) and not Path(ref).expanduser().exists()


def revision_kwargs(ref: str, revision: str | None, field: str = "revision") -> dict[str, str]:
    """``{"revision": revision}`` for a hub ``ref`` (as the recipe gives it), ``{}`` without a revision or for ``zoo:``;
    a ValueError naming the recipe ``field`` for a revision of a local path."""
    if revision is None or ref.startswith(ZOO_PREFIX):
        return {}
    if not is_hub_ref(ref):
        raise ValueError(
            f"{field}: {ref!r} is a local path; a revision pins a hub repository. Fix: set {field} to null."
        )
    return {"revision": revision}
