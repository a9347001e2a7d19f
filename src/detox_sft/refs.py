"""Model and dataset references: a hub id, a local path, or ``zoo:<name>`` for the offline zoo.

Every loader turns a reference into what ``from_pretrained`` / ``load_dataset`` take with :func:`resolve_ref`, and
passes its recipe revision (``training.base_model_revision``, ``data.train_revision``, ...) through
:func:`revision_kwargs`: ``from_pretrained(resolve_ref(ref), **revision_kwargs(ref, revision))``.

``zoo:<name>`` is resolved by whatever registers the entry point ``zoo`` in the group ``detox_sft.refs``: the
development package ``detox_sft_dev`` beside this one (same distribution) registers its offline zoo there. The helper
package never imports it, so a workbench without it loads hub ids and local paths as usual.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["ZOO_PREFIX", "ENTRY_POINT_GROUP", "ZooUnavailable", "resolve_ref", "is_hub_ref", "revision_kwargs"]

ZOO_PREFIX = "zoo:"
ENTRY_POINT_GROUP = "detox_sft.refs"


class ZooUnavailable(LookupError):
    """A ``zoo:<name>`` reference without the development package that resolves it; the message says the fix."""


def _zoo_resolver():
    """The registered ``zoo`` resolver (a callable name -> path), or an error that says how to get one."""
    found = entry_points(group=ENTRY_POINT_GROUP, name="zoo")
    if not found:
        raise ZooUnavailable(
            "zoo:<name> references need the offline zoo, which the development package detox_sft_dev provides. "
            "Fix: install the repository (`pip install -e .` or `make setup`), or give a hub id or a local path."
        )
    return next(iter(found)).load()


def resolve_ref(ref: str) -> str:
    """Turn a model or dataset reference into something a loader takes.

    ``zoo:<name>`` becomes the local path of the offline zoo's artifact (built on first use); hub ids and local paths
    are returned as given (local paths made absolute, because some loaders read bare relative names as hub ids).
    """
    if ref.startswith(ZOO_PREFIX):
        return str(_zoo_resolver()(ref[len(ZOO_PREFIX) :]))
    local = Path(ref).expanduser()
    if local.exists():
        return str(local.resolve())
    return ref


def is_hub_ref(ref: str) -> bool:
    """Whether a reference names a hub repository: neither ``zoo:<name>`` nor an existing local path."""
    return not ref.startswith(ZOO_PREFIX) and not Path(ref).expanduser().exists()


def revision_kwargs(ref: str, revision: str | None, field: str = "revision") -> dict[str, str]:
    """``{"revision": revision}`` for a hub reference, ``{}`` without a revision or for a ``zoo:`` reference.

    Args:
        ref: the reference as the recipe gives it (before :func:`resolve_ref`).
        revision: the hub commit to load, or `None` (the newest).
        field: the recipe field that holds the revision, for the error.

    Raises:
        ValueError: a revision for a local path (the recipe refuses it when it loads; this catches direct calls).
    """
    if revision is None or ref.startswith(ZOO_PREFIX):
        return {}
    if not is_hub_ref(ref):
        raise ValueError(
            f"{field}: {ref!r} is a local path; a revision pins a hub repository. Fix: set {field} to null."
        )
    return {"revision": revision}
