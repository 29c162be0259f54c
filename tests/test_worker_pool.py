"""quant/worker_pool.py with plain worker processes (no ComfyUI): replies, a worker's error and exit, and
the bounds on every wait (timeout, and the grace after an interrupt while a step runs)."""

import os
import signal
import time

import pytest

from quant.worker_pool import WorkerFailed, WorkerPool

# Run by path in each worker, with rank, world and conn as globals.
ENTRY = """
import os, time
from quant.worker_pool import serve

def handle(kind, value):
    if kind == "echo":
        return (rank, value)
    if kind == "sleep":
        time.sleep(value)
        return rank
    if kind == "raise" and rank == value:
        raise ValueError(f"rank {rank} was told to fail")
    return rank

serve(conn, handle)
"""


@pytest.fixture
def pool(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    pool = WorkerPool(str(entry), [{}, {}], start_timeout_s=120)
    yield pool
    pool.stop()


def test_every_worker_replies_in_rank_order(pool):
    pool.send_all("echo", "hello")
    assert pool.receive_all(30, "done") == [(0, "hello"), (1, "hello")]


def test_a_worker_that_raises_is_named_with_its_traceback_and_exits(pool):
    pool.send_all("raise", 1)
    with pytest.raises(WorkerFailed, match=r"GPU worker 1 of 2 failed:\n(.|\n)*rank 1 was told to fail"):
        pool.receive_all(30, "done")
    pool.processes[1].join(10)
    assert pool.processes[1].exitcode == 1 and not pool.alive()


def test_a_killed_worker_is_noticed_at_once(pool):
    os.kill(pool.processes[0].pid, signal.SIGKILL)
    pool.processes[0].join(10)
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"GPU worker 0 of 2 exited with code -9"):
        pool.receive_all(60, "done")
    assert time.monotonic() - start < 5


def test_waits_are_bounded(pool):
    pool.send_all("sleep", 30.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not answer within 1 s"):
        pool.receive_all(1.0, "done")
    # An interrupt while a step runs shortens the wait to the grace period.
    with pytest.raises(TimeoutError):
        pool.receive_all(600, "done", interrupted=lambda: True, grace_s=0.5)
    assert time.monotonic() - start < 10


def test_stop_ends_even_a_busy_worker(pool):
    pool.send_all("sleep", 60.0)
    processes = list(pool.processes)
    start = time.monotonic()
    pool.stop(grace_s=0.5)
    assert not any(p.is_alive() for p in processes) and time.monotonic() - start < 20
