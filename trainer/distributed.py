"""One process or ``torchrun --nproc_per_node N``: NCCL on GPUs, gloo on CPU processes."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from infra.runtime import configure_cuda, pick_device
from trainer.errors import TrainingError


# Longest time a process waits for the others (rank 0 builds the feature cache while the
# rest wait at a barrier: minutes for a large image set on a slow disk).
DDP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            tdist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t)
        return t


def init_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), pick_device(device_flag)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {device_flag} under torchrun, but CUDA is not available here: pass "
                            "--device cpu to train on CPU processes (gloo), or fix the CUDA install")
    use_cuda = torch.cuda.is_available() and (device_flag == "auto" or device_flag.startswith("cuda"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        configure_cuda()
    if not tdist.is_initialized():
        # device_id binds NCCL to this GPU at once (no guessing, no hang on a wrong device)
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=DDP_TIMEOUT,
                                 device_id=device if use_cuda else None)
    return Dist(rank, world, local_rank), device
