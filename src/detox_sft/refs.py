"""Model and dataset references: a hub id, a local path, or ``zoo:<name>`` for the offline zoo.

Every loader turns a reference into what ``from_pretrained`` / ``load_dataset`` take with :func:`resolve_ref`, and
passes its recipe revision (``training.base_model_revision``, ``data.train_revision``, ...) through
:func:`revision_kwargs`: ``from_pretrained(resolve_ref(ref), **revision_kwargs(ref, revision))``.

:func:`resolve_ref` is the one way into :mod:`detox_sft.zoo`, and the package's only deliberate lazy import of its
own code: building the zoo trains models, so it must not happen when a module is imported.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ZOO_PREFIX", "resolve_ref", "is_hub_ref", "revision_kwargs"]

ZOO_PREFIX = "zoo:"


def resolve_ref(ref: str) -> str:
    """Turn a model or dataset reference into something a loader takes.

    ``zoo:<name>`` becomes the local path of the offline zoo's artifact (built on first use); hub ids and local paths
    are returned as given (local paths made absolute, because some loaders read bare relative names as hub ids).
    """
    if ref.startswith(ZOO_PREFIX):
        from detox_sft import zoo  # the deliberate lazy import (see the module docstring)

        return str(zoo.resolve(ref[len(ZOO_PREFIX) :]))
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
