"""Blocks of work on a Ray Data actor pool: each actor sets up once (loads its models), then processes blocks.

:func:`map_blocks` is the whole pipeline: the pending blocks become a Ray dataset (one row per block, carrying its
index), ``map_batches`` sends them to a pool of :class:`_BlockActor` (``compute=ActorPoolStrategy(size=N)``, one CPU
each, one GPU each where the cluster has GPUs), and the driver writes each result as it comes back, so an interrupted
job keeps its finished blocks. Results come back in block order whatever order the actors finish in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from detox_sft.scale.blocks import BlockStore

__all__ = ["gpus_per_actor", "map_blocks", "ray_session", "start_local_ray"]

logger = logging.getLogger(__name__)


def _local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start_local_ray(num_cpus: int | None = None, attempts: int = 3) -> None:
    """Start a local Ray (this machine's CPUs, no dashboard), trying again when its node is slow to come up.

    On a machine with every core busy, Ray's raylet can give up waiting for its own agents (it allows them ~15-30 s):
    that failure is transient, so it is retried; any other failure is raised at once.
    """
    import psutil
    import ray

    for attempt in range(1, attempts + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(num_cpus=num_cpus or _local_cpus(), include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception when its node does not come up in time
            ray.shutdown()
            # a failed start leaves its GCS server, monitors and agents running: end those this attempt started
            _end_processes([c for c in psutil.Process().children(recursive=True) if c.pid not in before])
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            logger.warning("local Ray did not come up in time (attempt %d of %d); trying again", attempt, attempts)


def _end_processes(processes: list[Any]) -> None:
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


@contextlib.contextmanager
def ray_session() -> Iterator[Any]:
    """A Ray to run on: the one this process already joined, the cluster at ``RAY_ADDRESS`` (inside a RayJob
    ``ray.init()`` joins it), else a local Ray with this machine's CPUs and no dashboard.

    A Ray started here is shut down on exit; one that was already running (a notebook's, a test session's) is left
    running.
    """
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


def gpus_per_actor(device: str) -> int:
    """1 when the step may use a GPU (``device`` is ``auto`` or ``cuda``) and the Ray cluster has one, else 0."""
    import ray

    return 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0


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
    """``[process(state, p) for p in payloads]`` on a pool of Ray actors, each with ``state = setup(*setup_args)``.

    ``setup`` and ``process`` must be importable module-level functions (they are pickled by reference); a result
    must be JSON data. With a ``store``, blocks already in it are not run again and each new result is written to it
    as soon as it comes back: rerunning an interrupted job only runs the missing blocks.

    Args:
        payloads: one picklable payload per block, in order.
        setup: builds an actor's state (loads the models) from ``setup_args``.
        process: computes a block's result (JSON data) from the state and the payload.
        setup_args: the arguments of ``setup``.
        actors: the size of the actor pool (at most one per pending block).
        device: the step's device setting: an actor asks Ray for a GPU unless it is ``cpu`` (and the cluster has one).
        store: where finished blocks are kept; `None` keeps them in memory only.
        desc: the progress bar's label.
        progress: show a progress bar over blocks.

    Returns:
        The results, in the order of ``payloads``.
    """
    from tqdm.auto import tqdm

    done = store.done() if store is not None else set()
    pending = [i for i in range(len(payloads)) if i not in done]
    fresh: dict[int, Any] = {}
    if pending:
        import ray.data

        with ray_session() as ray:
            gpus = gpus_per_actor(device)
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
