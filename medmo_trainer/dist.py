"""The process group of a stage: who this process is and which device it drives."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process (rank 0, world 1 when run without torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum of a scalar over all ranks (a collective: every rank must call it)."""
        return self.sum_all([value])[0]

    def sum_all(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks, in one collective (every rank must call it)."""
        if not dist.is_initialized() or self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def init_distributed(timeout_minutes: float = 30.0) -> DistContext:
    """Joins the torchrun process group: nccl on GPU, gloo on CPU."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    context = DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if not dist.is_initialized():
        # FSDP and DeepSpeed need a process group even alone; without torchrun, a private one.
        store = None if "MASTER_ADDR" in os.environ else dist.HashStore()
        if store is not None:  # what torchrun would set; DeepSpeed reads them
            for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
                os.environ.setdefault(name, str(value))
        dist.init_process_group(
            backend=context.backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return context


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
