"""Inference on a Ray cluster (``compute.backend: ray``): one actor per worker holds the model, and shards of the
work are the unit of scheduling and of resumption. Token rewards, on-policy sampling, evaluation answers and
reward-model scoring all go through :func:`map_shards`; online-RL rollouts keep one :class:`RayWorkers` set for the
whole run and push the policy's new weights to it every iteration.

The driver cuts the work into the same shards the local path computes (same items, same batches, same seeds, same
code), so results are identical either way; it hands one shard at a time to each actor and stores every finished
shard as soon as it comes back (the token-reward cache, or storage/shard_results.py). A worker that dies takes only
its unfinished shard with it: the run fails, and the rerun computes only what is missing. A local cluster is
started (and stopped) when no Ray is running and ``compute.address`` is null; ``auto`` or ``ray://host:10001``
joins an existing one (KubeRay: infra/k8s/raycluster.yaml).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

from creditflow.tasks.config_base import ComputeConfig

ACTOR_PREFIX = "creditflow-worker"
NAMESPACE = "creditflow"


def uses_ray(compute: ComputeConfig | None) -> bool:
    return compute is not None and compute.backend == "ray"


@contextmanager
def ray_session(compute: ComputeConfig | None) -> Iterator[None]:
    """Connect to (or start) the cluster ``compute`` names for the duration of the block, unless Ray is already up
    or the backend is local. A stage holds one session across its jobs instead of starting a cluster per job."""
    if not uses_ray(compute):
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(
        address=compute.address,
        namespace=NAMESPACE,
        include_dashboard=False,
        log_to_driver=False,
        **({} if compute.address else {"num_cpus": max(1, round(compute.workers * compute.cpus_per_worker))}),
    )
    try:
        yield
    finally:
        ray.shutdown()


class ShardWorker:
    """Holds what ``build()`` made (a callable owning one copy of a model) and runs shards through it."""

    def __init__(self, build: Callable[[], Callable[[Any], list]]):
        self.work = build()

    def run(self, shard: Any) -> list:
        return self.work(shard)

    def update(self, state: Any) -> None:
        """Hand the held callable new state between jobs (online RL: the policy's weights of this iteration)."""
        self.work.update(state)


class RayWorkers:
    """``count`` Ray actors, each holding what ``build()`` made, until the block ends. :func:`map_shards` starts one
    set per job; a caller running many jobs through the same model (online RL: one per iteration) keeps one set
    across them instead of reloading the model each time. Needs a :func:`ray_session`."""

    def __init__(self, build: Callable[[], Callable[[Any], list]], compute: ComputeConfig, count: int):
        import ray

        remote = ray.remote(num_cpus=compute.cpus_per_worker, num_gpus=compute.gpus_per_worker)(ShardWorker)
        run_id = uuid.uuid4().hex[:8]
        self.actors = [remote.options(name=f"{ACTOR_PREFIX}-{run_id}-{i}").remote(build) for i in range(count)]

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def update(self, state: Any) -> None:
        """Every actor's ``update(state)``: ``state`` goes to the object store once, not once per actor."""
        import ray

        ref = ray.put(state)
        ray.get([actor.update.remote(ref) for actor in self.actors])

    def map(
        self,
        shards: list,
        write: Callable[[int, list], None],
        progress=None,
        weigh: Callable[[Any], int] = lambda shard: 1,
    ) -> None:
        """Hand one shard at a time to each free actor; ``write`` and ``progress`` as in :func:`map_shards`."""
        import ray

        pending: dict[Any, tuple[Any, int]] = {}
        queue = iter(range(len(shards)))
        for actor, index in zip(self.actors, queue):
            pending[actor.run.remote(shards[index])] = (actor, index)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, index = pending.pop(ref)
            write(index, ray.get(ref))  # a dead worker raises here: finished shards are already stored
            if progress is not None:
                progress.update(weigh(shards[index]))
            following = next(queue, None)
            if following is not None:
                pending[actor.run.remote(shards[following])] = (actor, following)


def map_shards(
    shards: list,
    build: Callable[[], Callable[[Any], list]],
    compute: ComputeConfig | None,
    write: Callable[[int, list], None],
    progress=None,
    weigh: Callable[[Any], int] = lambda shard: 1,
) -> None:
    """Run every shard through a worker that ``build()`` makes (picklable: Ray actors build their own), in this
    process or on ``compute.workers`` Ray actors. ``write(index, rows)`` is called as each shard finishes, and
    ``progress`` (a tqdm bar or None) advances by ``weigh(shard)``. Nothing is built when there are no shards."""
    if not shards:
        return
    if not uses_ray(compute):
        work = build()
        for index, shard in enumerate(shards):
            write(index, work(shard))
            if progress is not None:
                progress.update(weigh(shard))
        return
    with ray_session(compute), RayWorkers(build, compute, min(compute.workers, len(shards))) as workers:
        workers.map(shards, write, progress, weigh)


def resumable_map(
    shards: list,
    build: Callable[[], Callable[[Any], list]],
    compute: ComputeConfig | None,
    store=None,
    desc: str = "shards",
    progress: bool = True,
) -> list[list]:
    """Every shard's rows, in order: shards already in ``store`` (a storage.shard_results.ShardResults, or None)
    are read back, the rest are computed by :func:`map_shards` and stored as each one finishes. A shard's stored
    rows are keyed by the shard itself, so a changed input is recomputed."""
    done: dict[int, list] = {}
    if store is not None:
        for index, shard in enumerate(shards):
            rows = store.read(index, shard)
            if rows is not None:
                done[index] = rows
    todo = [index for index in range(len(shards)) if index not in done]

    def write(position: int, rows: list) -> None:
        index = todo[position]
        if store is not None:
            store.write(index, shards[index], rows)
        done[index] = rows

    with tqdm(total=len(shards), initial=len(done), desc=desc, unit="shard", disable=not progress, leave=False) as bar:
        map_shards([shards[index] for index in todo], build, compute, write, bar)
    return [done[index] for index in range(len(shards))]
