"""One process or many: torchrun / DistributedDataParallel set-up shared by the training steps.

`torchrun --nproc_per_node=G [--nnodes=M ...] -m dicom_node_training.cli fit --data D --out R` starts G
processes per node with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
environment; `setup` reads them and joins the process group (nccl on CUDA, gloo on CPU). Without
those variables everything runs in one process and the helpers below are no-ops.

Rules every step follows: the global batch size of the config is split evenly over the processes;
every process shards the data (DistributedSampler for training, `shard` for evaluation) and the
results are gathered; only rank 0 writes checkpoints, reports and log events.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup", "teardown", "resolve_device", "shard", "gather", "barrier"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' -> this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for but torch sees no CUDA GPU; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; return this process's context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # long timeout: in `fit`, rank 0 builds the cache (hours on RSNA) while the others wait at a barrier
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(hours=12))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown(ctx: DistContext) -> None:
    """Leave the process group together: rank 0 hosts the rendezvous store and often finishes last (it writes the
    checkpoints), so a rank that destroyed its group and exited while another was still talking to the store or
    to its gloo peers made that peer's transport thread abort the process (SIGABRT, seen in CI). A barrier first
    lets every rank finish its work; only then does each one leave."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(items: list[T], ctx: DistContext) -> list[T]:
    """This process's share of `items` (every world_size-th, starting at rank); no padding."""
    return items[ctx.rank::ctx.world_size]


def gather(obj: T, ctx: DistContext) -> list[T]:
    """Every process's `obj`, in rank order (a one-element list in a single process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
