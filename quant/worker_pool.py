"""Worker processes for one host (torch.multiprocessing, spawn), driven from ComfyUI's single process over
one pipe each. Torch and the standard library only.

No wait is unbounded: the coordinator polls each reply with a deadline, notices a worker that exited (its
process sentinel) within a poll, and a worker polls its pipe and exits when the coordinator is gone. stop()
terminates, then kills, whatever did not exit in time.

A spawned child normally re-imports the parent's __main__ script (for ComfyUI: main.py, which parses its
arguments and runs every pack's prestartup script): start() hides __main__ while it spawns, and each child
runs `entry_script` instead (by path, so it needs nothing importable first)."""

from __future__ import annotations

import contextlib
import io
import runpy
import sys
import time
import types
from multiprocessing.connection import wait as wait_for_ready

import torch.multiprocessing as mp
from multiprocessing.reduction import ForkingPickler
from torch.multiprocessing import reductions

POLL_S = 0.2


class WorkerFailed(RuntimeError):
    """A worker reported an error or exited; the message names the rank and what it said."""


@contextlib.contextmanager
def _main_module_hidden():
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def raise_file_limit() -> None:
    """Each tensor shared with the workers keeps a file descriptor open here (torch's default sharing; the
    "file_system" alternative loses a tensor's name once the workers that mapped it exit, so the model
    could not be sent again), and a model has thousands: past the common soft limit of 1,024."""
    try:
        import resource
    except ImportError:  # not POSIX: torch shares by another mechanism there
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def dumps(obj, pickler: type | None = None) -> bytes:
    """Pickle with torch's process-sharing reductions (CPU tensors go by shared memory, CUDA tensors by
    IPC handle); `pickler` may be a ForkingPickler subclass adding persistent ids."""
    reductions.init_reductions()
    raise_file_limit()
    buffer = io.BytesIO()
    (pickler or ForkingPickler)(buffer, 4).dump(obj)
    return buffer.getvalue()


class WorkerPool:
    """One process per entry of `setups`, each running runpy.run_path(entry_script) with the globals
    {"rank", "world", "conn", **its setup}."""

    def __init__(self, entry_script: str, setups: list[dict], start_timeout_s: float = 300.0):
        world = len(setups)
        if world < 1:
            raise ValueError("a worker pool needs at least 1 worker")
        context = mp.get_context("spawn")
        self.world = world
        self.connections, self.processes = [], []
        try:
            for rank in range(world):
                mine, theirs = context.Pipe()
                init = {"rank": rank, "world": world, "conn": theirs, **setups[rank]}
                process = context.Process(target=runpy.run_path, args=(entry_script,),
                                          kwargs={"init_globals": init, "run_name": "__ltx2_quant_worker__"},
                                          daemon=True, name=f"ltx2_quant-worker-{rank}")
                with _main_module_hidden():
                    process.start()
                theirs.close()
                self.connections.append(mine)
                self.processes.append(process)
            self.receive_all(start_timeout_s, expect="ready")
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return bool(self.processes) and all(p.is_alive() for p in self.processes)

    def send_all(self, kind: str, value, pickler: type | None = None) -> None:
        """(kind, value) to every worker, pickled once per worker: a shared tensor's handle can be taken
        up by one process only."""
        for rank, connection in enumerate(self.connections):
            try:
                connection.send_bytes(dumps((kind, value), pickler))
            except (BrokenPipeError, ConnectionResetError, OSError) as error:
                raise self.failure(rank, f"its pipe closed ({error})") from None

    def receive_all(self, timeout_s: float, expect: str, interrupted=lambda: False, grace_s: float = 0.0) -> list:
        """Each worker's next reply, which must be (expect, value): [value per rank]. Raises WorkerFailed
        as soon as a worker reports an error or exits, TimeoutError past timeout_s. Once `interrupted()`
        (polled meanwhile) turns true, the deadline shrinks to grace_s from then: the caller learns of the
        interrupt itself and decides what happens to the pool."""
        deadline = time.monotonic() + timeout_s
        cancelled = False
        values, pending = [None] * self.world, set(range(self.world))
        while pending:
            for connection in wait_for_ready([self.connections[r] for r in pending], timeout=POLL_S):
                rank = self.connections.index(connection)
                kind, value = self._read(rank)
                if kind == "error":
                    raise self.failure(rank, value)
                if kind != expect:
                    raise self.failure(rank, f"replied {kind!r} when {expect!r} was due")
                values[rank] = value
                pending.discard(rank)
            for rank in sorted(pending):
                if not self.processes[rank].is_alive() and not self.connections[rank].poll():
                    raise self.failure(rank, f"exited with code {self.processes[rank].exitcode}")
            if pending and not cancelled and interrupted():
                cancelled = True
                deadline = min(deadline, time.monotonic() + grace_s)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"GPU worker(s) {sorted(pending)} did not answer within {timeout_s:.0f} s")
        return values

    def _read(self, rank: int):
        try:
            return ForkingPickler.loads(self.connections[rank].recv_bytes())
        except (EOFError, OSError):
            process = self.processes[rank]
            process.join(5)
            raise self.failure(rank, f"exited with code {process.exitcode}") from None

    def failure(self, rank: int, what: str) -> WorkerFailed:
        return WorkerFailed(f"GPU worker {rank} of {self.world} {what}" if not what.startswith("Traceback")
                            else f"GPU worker {rank} of {self.world} failed:\n{what}")

    def stop(self, grace_s: float = 10.0) -> None:
        """Ends every worker: a stop message, then terminate, then kill, each bounded."""
        for connection in self.connections:
            with contextlib.suppress(Exception):
                connection.send_bytes(dumps(("stop", None)))
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for connection in self.connections:
            connection.close()
        self.processes, self.connections = [], []


def serve(conn, handle, loads=ForkingPickler.loads) -> None:
    """The worker loop: handle(kind, value) for each message (read by `loads`) until "stop" or the
    coordinator is gone.
    A failure is reported, then the process exits at once (its peers' collectives then fail instead of
    waiting for it)."""
    import multiprocessing
    import os
    import traceback

    parent = multiprocessing.parent_process()
    try:
        conn.send_bytes(dumps(("ready", None)))
        while True:
            if not conn.poll(POLL_S):
                if parent is not None and not parent.is_alive():
                    return
                continue
            kind, value = loads(conn.recv_bytes())
            if kind == "stop":
                return
            conn.send_bytes(dumps(("done", handle(kind, value))))
    except BaseException:
        report = traceback.format_exc()
        print(report, file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            conn.send_bytes(dumps(("error", report)))
        conn.close()
        os._exit(1)
