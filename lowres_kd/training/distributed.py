"""Rank and world size from the launcher's environment (torchrun, the DeepSpeed launcher).

Nothing in the trainer assumes one process: every rank runs the same loop on its own slice of
each global batch; rank 0 alone takes the run lock, writes logs, checkpoints and the export.
A single process without launcher variables is world size 1 and needs no process group.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (itself in a single process)."""
        if not self.active or self.world_size == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """True only if ``flag`` is true on every rank (a step is skipped everywhere or nowhere)."""
        if not self.active or self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """The variables a process group needs, for a run started without a launcher (world size 1)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
