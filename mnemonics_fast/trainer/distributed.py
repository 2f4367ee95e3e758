"""torch.distributed glue: torchrun's environment, gloo on CPU / NCCL on GPU, gather/broadcast helpers."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; a plain `python -m` run is a world of one."""
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(t: torch.Tensor, info: DistInfo, src: int = 0) -> torch.Tensor:
    if info.enabled:
        dist.broadcast(t, src=src)
    return t


def gather_by_position(values: torch.Tensor, pos: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Every rank holds rows `values` for positions `pos` of a length-`total` array (positions disjoint across ranks,
    together covering all). Returns the full [total, ...] array, identical on every rank."""
    out = values.new_zeros((total,) + tuple(values.shape[1:]))
    out[pos] = values
    if info.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)  # each row is non-zero on exactly one rank
    return out
