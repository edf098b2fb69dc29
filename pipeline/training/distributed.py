"""Multi-process training under torchrun (DistributedDataParallel): gloo on CPU, NCCL on GPUs.

`aivoice bootstrap --nproc N` re-runs the bootstrap stage under `python -m torch.distributed.run
--standalone --nproc_per_node N` (the same line a user can type, docs/scaling.md); each process then
finds RANK/WORLD_SIZE in its environment and joins the group here. With one process nothing is
initialised and training is the single-process code path.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """(rank, world size); joins the process group when torchrun started more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # rank 0 alone validates, calibrates and logs between epochs: the others wait that long
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
    return rank_world()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU (LOCAL_RANK) when training on CUDA under torchrun; the device otherwise."""
    if device.type == "cuda" and rank_world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def broadcast_flag(value: bool) -> bool:
    """Rank 0's value on every rank (an early-stopping decision)."""
    if rank_world()[1] == 1:
        return value
    flag = torch.tensor([int(value)])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, 0)
    return bool(flag.item())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """The torchrun line that runs `python -m module args` in nproc processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def launch(nproc: int, module: str, args: list[str]) -> int:
    """Run the module under torchrun and wait; its exit status (non-zero when any rank failed)."""
    return subprocess.run(torchrun_command(nproc, module, args)).returncode
