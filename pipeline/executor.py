"""Run a plain function over blocks, in Ray tasks or in a loop, and hand back the results in block order.

The function and its specs are the stage; this module is only the edge. Ray tasks take a fraction of a CPU (an
actor pool or task wave that takes every CPU deadlocks a Ray Data pipeline sharing the node) and at most
`max_in_flight` run at once, so the driver holds a bounded number of results whatever the block count.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

S = TypeVar("S")
R = TypeVar("R")
TASK_CPUS = 0.5


def map_blocks(fn: Callable[[S], R], specs: Iterable[S], use_ray: bool, max_in_flight: int = 4,
               num_cpus: float = TASK_CPUS) -> Iterator[R]:
    """Yield fn(spec) for each spec, in the order of `specs`: Ray remote tasks when `use_ray`, else a plain loop.
    A single block runs in this process: shipping it to a worker only adds start-up time."""
    specs = list(specs)
    if not use_ray or len(specs) <= 1:
        for spec in specs:
            yield fn(spec)
        return
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
    pending: deque = deque()
    for spec in specs:
        pending.append(remote.remote(spec))
        if len(pending) >= max(1, max_in_flight):
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def run_task(fn: Callable[[S], R], spec: S, use_ray: bool, num_cpus: float = TASK_CPUS) -> R:
    """fn(spec) in one Ray task when `use_ray`, so what it reads stays out of the driver; else here."""
    if not use_ray:
        return fn(spec)
    import ray

    return ray.get(ray.remote(num_cpus=num_cpus, max_retries=2)(fn).remote(spec))
