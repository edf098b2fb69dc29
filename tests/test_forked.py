"""fork_map: independent jobs shared between this process and forked workers, results in order."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest

from pipeline.training.forked import WorkerError, fork_map


def _busy_until_a_worker_took_one(event, x: int) -> None:
    """Item 0 (this process's) waits until a worker has started another item, so that the tests do not
    depend on how fast a fork starts; the other items say they started."""
    if x == 0:
        assert event.wait(timeout=60), "no worker took an item within 60 s"
    else:
        event.set()


@pytest.mark.parametrize("workers", [0, 1, 2, 5])
def test_results_are_the_sequential_ones_in_order(workers):
    event = mp.get_context("fork").Event()
    if not workers:
        event.set()

    def job(x):
        _busy_until_a_worker_took_one(event, x)
        time.sleep(0.05)
        return x * x, os.getpid()

    got = fork_map(job, list(range(7)), workers)
    assert [v for v, _ in got] == [x * x for x in range(7)], "the same results, in the items' order"
    assert got[0][1] == os.getpid(), "item 0 is always done here (its result may be a model)"
    helpers = {pid for _, pid in got} - {os.getpid()}
    assert (1 if workers else 0) <= len(helpers) <= min(workers, 6), f"{workers} forked workers took items: {helpers}"


def test_items_go_to_whichever_process_is_free():
    # item 0 keeps this process busy until the worker has done the last item: the worker takes them all
    last_done = mp.get_context("fork").Event()

    def job(x):
        if x == 0:
            assert last_done.wait(timeout=60)
        elif x == 4:
            last_done.set()
        return os.getpid()

    got = fork_map(job, list(range(5)), 1)
    assert got[0] == os.getpid() and all(pid != os.getpid() for pid in got[1:]), got


def test_a_worker_sees_the_parents_memory_without_pickling():
    big = bytearray(50_000_000)   # not passed as an argument: a forked worker sees it as it is
    big[-1] = 7
    assert fork_map(lambda i: big[-1] + i, [0, 1], 1) == [7, 8]


def test_an_error_in_a_worker_is_raised_here_with_its_reason():
    event = mp.get_context("fork").Event()

    def job(x):
        _busy_until_a_worker_took_one(event, x)   # the worker takes item 1
        if x == 1:
            raise ValueError("clip 1 is broken")
        return x

    with pytest.raises(WorkerError, match="ValueError: clip 1 is broken"):
        fork_map(job, [0, 1, 2], 1)


def test_a_worker_that_dies_is_reported():
    event, parent = mp.get_context("fork").Event(), os.getpid()

    def job(x):
        _busy_until_a_worker_took_one(event, x)
        if x == 1 and os.getpid() != parent:
            os._exit(3)
        return x

    with pytest.raises(WorkerError, match="exited with code 3"):
        fork_map(job, [0, 1], 1)


def test_torch_works_in_a_worker_after_the_parent_used_several_threads():
    # in a process of its own, so that a worker that hangs fails this test instead of stopping the suite
    script = """
import torch
from pipeline.training.forked import fork_map
torch.set_num_threads(2)
x = torch.randn(64, 1, 4000)
torch.nn.functional.pad(x, (100, 100), mode="reflect")   # the parent's OpenMP team exists now
got = fork_map(lambda i: float(torch.nn.functional.pad(x, (100, 100), mode="reflect").sum()), [0, 1], 1)
assert abs(got[0] - got[1]) <= 1e-4 * abs(got[0]), got   # 1 thread against 2: summed in another order
"""
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker never finished: it waited on the parent's OpenMP thread team")
    assert done.returncode == 0, done.stderr[-2000:]
