"""Work beyond one process: Ray Data actor pools over blocks, with finished blocks kept for a rerun.

A step that can run on Ray (``rephrase.executor: ray``, ``evaluation.executor: ray``) cuts its work into blocks,
names a ``setup`` that loads its models once per actor and a ``process`` that runs one block with the same code as
the local run, and calls :func:`map_blocks`::

    store = BlockStore(work_dir, content_key(inputs, settings), num_blocks=len(blocks))
    results = map_blocks(blocks, setup, process, setup_args=(cfg,), actors=2, store=store)

Without ``RAY_ADDRESS`` a local Ray starts (and stops) around the call; inside a RayJob ``ray.init()`` joins the
cluster. Training beyond one process is torchrun's (``torchrun --nproc-per-node N -m detox_sft.cli train``).
"""

from detox_sft.scale.blocks import BlockStore, content_key
from detox_sft.scale.ray_data import gpus_per_actor, map_blocks, ray_session, start_local_ray

__all__ = ["BlockStore", "content_key", "gpus_per_actor", "map_blocks", "ray_session", "start_local_ray"]
