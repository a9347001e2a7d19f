"""Ray Data actor pools over blocks, finished blocks kept for a rerun: ``map_blocks(blocks, setup, process,
store=BlockStore(work_dir, content_key(inputs, settings), num_blocks=len(blocks)))``.

Without ``RAY_ADDRESS`` a local Ray starts (and stops) around the call; inside a RayJob ``ray.init()`` joins the cluster.
"""

from detox_sft.scale.blocks import BlockStore, content_key
from detox_sft.scale.ray_data import map_blocks, ray_session, start_local_ray

__all__ = ["BlockStore", "content_key", "map_blocks", "ray_session", "start_local_ray"]
