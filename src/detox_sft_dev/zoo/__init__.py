"""The offline zoo: small models and synthetic corpora built by code on first use (see :mod:`detox_sft_dev.zoo.build`),
and the rehearsal models, the tutorial's hub models at full size with random weights (see
:mod:`detox_sft_dev.zoo.rehearsal`), each built on its own first use and never by the zoo's build.

The pipeline never imports this package: it reaches the zoo through ``zoo:<name>`` references, which
:func:`detox_sft.refs.resolve_ref` turns into paths with :func:`resolve`.
"""

from __future__ import annotations

import os
from pathlib import Path

from detox_sft_dev.zoo import build
from detox_sft_dev.zoo.build import ZOO_NAMES, Zoo, ZooError, build_hash, cache_root, ensure_zoo, zoo_dir
from detox_sft_dev.zoo.rehearsal import REHEARSAL_NAMES, ensure_rehearsal, is_rehearsal_name

__all__ = [
    "REHEARSAL_NAMES",
    "ZOO_NAMES",
    "Zoo",
    "ZooError",
    "build_hash",
    "cache_root",
    "ensure_rehearsal",
    "ensure_zoo",
    "resolve",
    "zoo_dir",
]


def resolve(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local path of a zoo artifact by name, built on first use.

    Args:
        name: a demo zoo artifact (:data:`ZOO_NAMES`: ``opt``, ``bart-base``, ``rtp``, ...; all of them built
            together) or a rehearsal model (:data:`REHEARSAL_NAMES`: ``rehearsal-opt``, ...; each built alone).
        cache_dir: see :func:`ensure_zoo`.

    Raises:
        ZooError: unknown name.
    """
    if is_rehearsal_name(name):
        return ensure_rehearsal(name, cache_dir)
    known = {n.replace("-", "_") for n in ZOO_NAMES}
    if name.strip().lower().replace("-", "_") not in known:
        raise ZooError(
            f"unknown zoo artifact {name!r}. Fix: use one of {', '.join(ZOO_NAMES + REHEARSAL_NAMES)} (as zoo:<name>)."
        )
    return build.resolve(name, cache_dir)
