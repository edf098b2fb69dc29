"""Share independent pieces of work between this process and forked ones (compute.batch_workers).

Fine-tuning and validation run a few independent jobs that each take seconds of one core: augmenting
the replay crops, production's frozen layers on two sets of windows, one candidate per held-out file,
scoring the test split with two models. Forked workers start in milliseconds and see the parent's
memory as it is (cached tensors, loaded clips, the model), so nothing large is pickled on the way
in; only results come back through a pipe. Each job must be a function of its item alone (seeded
inside), so the results are the same for any number of workers and any order. Workers run torch on
one thread.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

from pipeline.config import Params, batch_workers

T = TypeVar("T")
R = TypeVar("R")


def forked_workers(params: Params, device) -> int:
    """Processes to fork beside this one for independent jobs on `device` (compute.batch_workers; none off
    the cpu). `auto` forks only where torch runs one thread (a 2-core or busy host): elsewhere its
    intra-op threads already use the cores."""
    import torch

    if torch.device(device).type != "cpu" or (params.compute.batch_workers == "auto" and torch.get_num_threads() > 1):
        return 0
    return batch_workers(params)


class WorkerError(RuntimeError):
    """A forked worker raised, or died before it sent its results."""


def _take(counter, n: int) -> int | None:
    """The next item nobody has taken yet (items are handed out as processes come free)."""
    with counter.get_lock():
        i = counter.value
        counter.value += 1
    return i if i < n else None


def _worker(fn: Callable[[T], R], items: Sequence[T], counter, conn) -> None:
    if "torch" in sys.modules:   # the parent's OpenMP thread team does not survive the fork: a worker that
        sys.modules["torch"].set_num_threads(1)   # enters a parallel region with it waits forever
    try:
        done = []
        while (i := _take(counter, len(items))) is not None:
            done.append((i, fn(items[i])))
        conn.send(("ok", done))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent, which raises
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def fork_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """[fn(x) for x in items], shared with `workers` forked processes: item 0 is done here (its result
    may be large, e.g. a model), every other item by whichever process comes free first. With 0
    workers, one item, or no `fork` on this platform, everything runs here."""
    workers = min(workers, len(items) - 1)
    if workers < 1 or "fork" not in mp.get_all_start_methods():
        return [fn(x) for x in items]
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 1)   # item 0 is this process's
    procs = []
    for w in range(1, workers + 1):
        receive, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(fn, items, counter, send), daemon=True, name=f"fork_map-{w}")
        p.start()
        send.close()
        procs.append((p, receive))
    try:
        results: dict[int, R] = {0: fn(items[0])}
        while (i := _take(counter, len(items))) is not None:
            results[i] = fn(items[i])
    except BaseException:
        for p, _ in procs:
            p.terminate()
        raise
    errors = []
    for p, receive in procs:
        try:
            status, payload = receive.recv()
        except EOFError:
            p.join()
            status, payload = "error", f"exited with code {p.exitcode} before sending its results"
        p.join()
        if status == "ok":
            results.update(payload)
        else:
            errors.append(f"{p.name}: {payload}")
    if errors:
        raise WorkerError("; ".join(errors))
    return [results[i] for i in range(len(items))]
