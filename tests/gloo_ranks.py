"""Run a function on N CPU processes joined by a gloo process group, as the multi-GPU tests need.
Each rank's return value comes back through a file; a rank that fails or overruns fails the call."""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, folder: str, target, args: tuple) -> None:
    torch.set_num_threads(1)  # N ranks share a small machine
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = target(rank, world, *args)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(target, world: int, folder, *args, timeout: float = 180.0) -> list:
    """[target(rank, world, *args) for each rank], run in `world` spawned processes."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    context = mp.get_context("spawn")
    processes = [context.Process(target=_rank_main, args=(rank, world, folder, target, args), daemon=True)
                 for rank in range(world)]
    for process in processes:
        process.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    for process in processes:
        process.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    stuck = [p for p in processes if p.is_alive()]
    for process in stuck:
        process.kill()
        process.join(10)
    errors = [open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder)) if name.endswith(".error")]
    if errors or stuck:
        raise AssertionError(f"{len(stuck)} rank(s) overran {timeout} s; errors:\n" + "\n".join(errors))
    return [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(world)]
