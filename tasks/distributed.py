"""Token-reward scoring on a Ray cluster (``compute.backend: ray``): one actor per worker holds the model, and the
shards of the content-keyed cache are the unit of work.

The driver tokenizes everything, cuts the work into the same length-sorted shards the local path writes, and
hands one shard at a time to each actor; every finished shard is written to the cache as soon as it comes back.
So results are identical to a local run (same items, same batches, same code), and a worker that dies takes only
its unfinished shard with it: the run fails, and the rerun finds the finished shards in the cache and computes only
what is missing. A local cluster is started (and stopped) when no Ray is running and ``compute.address`` is null;
``auto`` or ``ray://host:10001`` joins an existing one (KubeRay: infra/k8s/raycluster.yaml).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from creditflow.tasks.configs import ComputeConfig

ACTOR_PREFIX = "creditflow-token-rewards"
NAMESPACE = "creditflow"


class ScoringActor:
    """Holds one source (and so one copy of its model) and scores shards of items with it."""

    def __init__(self, build: Callable[[], Any]):
        self.source = build()

    def score(self, items: list) -> list[dict[str, Any]]:
        return self.source.score(items, None)


def score_shards(
    shards: list[list],
    build: Callable[[], Any],
    compute: ComputeConfig,
    write: Callable[[int, list[dict[str, Any]]], None],
    progress=None,
) -> None:
    """Score every shard on ``compute.workers`` actors; ``write(index, rows)`` is called as each one finishes.
    ``build`` (picklable) makes the source inside each actor."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=compute.address,
            namespace=NAMESPACE,
            include_dashboard=False,
            log_to_driver=False,
            **({} if compute.address else {"num_cpus": max(1, round(compute.workers * compute.cpus_per_worker))}),
        )
    remote = ray.remote(num_cpus=compute.cpus_per_worker, num_gpus=compute.gpus_per_worker)(ScoringActor)
    run_id = uuid.uuid4().hex[:8]
    actors = [
        remote.options(name=f"{ACTOR_PREFIX}-{run_id}-{i}").remote(build)
        for i in range(min(compute.workers, len(shards)))
    ]
    pending: dict[Any, tuple[Any, int]] = {}
    queue = iter(range(len(shards)))
    try:
        for actor, index in zip(actors, queue):
            pending[actor.score.remote(shards[index])] = (actor, index)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, index = pending.pop(ref)
            write(index, ray.get(ref))  # a dead worker raises here: finished shards are already in the cache
            if progress is not None:
                progress.update(sum(item.n_forward_tokens for item in shards[index]))
            following = next(queue, None)
            if following is not None:
                pending[actor.score.remote(shards[following])] = (actor, following)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
