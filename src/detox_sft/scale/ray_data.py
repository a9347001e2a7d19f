"""Blocks of work on a Ray Data actor pool (:func:`map_blocks`): each actor sets up once (loads its models), then
processes blocks; the driver stores each result as it comes back, and results return in block order."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from detox_sft.scale.blocks import BlockStore

logger = logging.getLogger(__name__)


def start_local_ray(num_cpus: int | None = None, attempts: int = 3) -> None:
    """Start a local Ray (this machine's CPUs, no dashboard); retried only when its node is slow to come up."""
    import psutil
    import ray

    for attempt in range(1, attempts + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            cpus = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
            ray.init(num_cpus=cpus or 1, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception when its node does not come up in time
            ray.shutdown()
            # a failed start leaves its GCS server, monitors and agents running: end those this attempt started
            started = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
            for process in started:
                with contextlib.suppress(psutil.Error):
                    process.terminate()
            for process in psutil.wait_procs(started, timeout=5)[1]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            # a busy machine's raylet can give up on its own agents (~15-30 s): transient, so retried
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            logger.warning("local Ray did not come up in time (attempt %d of %d); trying again", attempt, attempts)


@contextlib.contextmanager
def ray_session() -> Iterator[Any]:
    """The Ray this process already joined (left running), else the ``RAY_ADDRESS`` cluster or a local Ray, shut
    down on exit."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        start_local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


class _BlockActor:
    """A Ray Data callable class: ``setup(*setup_args)`` once per actor, then ``process(state, payload)`` per block."""

    def __init__(self, setup: Callable[..., Any], setup_args: tuple[Any, ...], process: Callable[[Any, Any], Any]):
        self._state = setup(*setup_args)
        self._process = process

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = [json.dumps(self._process(self._state, pickle.loads(p))).encode() for p in batch["payload"]]
        return {"block": batch["block"], "result": np.array(results, dtype=object)}


def map_blocks(
    payloads: Sequence[Any],
    setup: Callable[..., Any],
    process: Callable[[Any, Any], Any],
    setup_args: tuple[Any, ...] = (),
    actors: int = 1,
    device: str = "auto",
    store: BlockStore | None = None,
    desc: str = "blocks",
    progress: bool = True,
) -> list[Any]:
    """``[process(state, p) for p in payloads]`` on ``actors`` Ray actors, each with ``state = setup(*setup_args)``.

    ``setup`` and ``process`` are module-level functions (pickled by reference); results are JSON data. Blocks in
    ``store`` are not run again, and each new result is stored as it comes back. An actor asks for a GPU unless
    ``device`` is ``cpu`` (and the cluster has one).
    """
    from tqdm.auto import tqdm

    done = store.done() if store is not None else set()
    pending = [i for i in range(len(payloads)) if i not in done]
    fresh: dict[int, Any] = {}
    if pending:
        import ray.data

        with ray_session() as ray:
            gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
            size = min(actors, len(pending))
            # a local Ray with fewer CPUs than actors: share them, or the pool would wait forever for the missing ones
            cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / size)
            # one bar over blocks (below): Ray's own would log a line per operator update when stdout is not a tty.
            # Set before the dataset is made (it copies the context), restored after (the caller's process keeps its own)
            context = ray.data.DataContext.get_current()
            saved = context.enable_progress_bars, context.print_on_execution_start
            context.enable_progress_bars = context.print_on_execution_start = False
            try:
                rows = [{"block": i, "payload": pickle.dumps(payloads[i])} for i in pending]
                ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                    _BlockActor,
                    fn_constructor_args=(setup, setup_args, process),
                    batch_size=1,
                    compute=ray.data.ActorPoolStrategy(size=size),
                    num_cpus=cpus,
                    num_gpus=gpus,
                )
                logger.info(
                    "%s: %d of %d blocks, %d actor(s), %d GPU each", desc, len(pending), len(payloads), size, gpus
                )
                with tqdm(total=len(payloads), initial=len(done), desc=desc, unit="block", disable=not progress) as bar:
                    for row in ds.iter_rows():
                        index, data = int(row["block"]), row["result"]
                        if store is not None:
                            store.put(index, data)
                        else:
                            fresh[index] = json.loads(data)
                        bar.update(1)
            finally:
                context.enable_progress_bars, context.print_on_execution_start = saved
    if store is None:
        return [fresh[i] for i in range(len(payloads))]
    return store.get_all()
