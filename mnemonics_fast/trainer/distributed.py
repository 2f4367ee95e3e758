"""torch.distributed glue: torchrun's environment, gloo on CPU / NCCL on GPU, gather/broadcast helpers."""
from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


# True once this process has joined a process group through init_distributed (see exit_process).
_joined_group = False


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
        from ..config import ConfigError
        raise ConfigError("config key 'run.device': cuda, but torch sees no CUDA device here (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda}); use run.device=auto or cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    global _joined_group
    if world > 1 and not dist.is_initialized():
        _joined_group = True
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local, device)


def exit_process(code: int) -> None:
    """End this process with `code`. A process that used torch.distributed ends without the interpreter's C-level
    finalisation: destroy the process group, run the atexit handlers (logging, multiprocessing, tensorboard), flush
    stdout/stderr, then os._exit.

    Why: with torch 2.14 a gloo process group that DDP has used outlives destroy_process_group() (its worker
    threads keep running: the DDP reducer keeps the group alive), and a worker thread may drop the last reference
    to the final barrier's work - which holds tensors with Python objects - while the interpreter finalises. It then
    needs the GIL, cannot get it, and the process aborts ("terminate called without an active exception", SIGABRT,
    torchrun reports exit code -6) after every result was written. Reproduced on CPU with torch alone
    (bench/repro_gloo_teardown.py: DDP, a collective, barrier, destroy_process_group; 15 of 120 torchrun runs
    aborted, 0 of 120 through this function; bench/results/gloo_teardown_cpu.json); the core dump's aborting thread
    is ProcessGroupGloo::runLoop destroying an AsyncBarrierWork. Skipping that teardown is what avoids it:
    everything this package writes is closed or flushed before this point (checkpoints are fsynced)."""
    initialised = dist.is_available() and dist.is_initialized()
    if initialised:
        dist.destroy_process_group()
    if not (initialised or _joined_group):
        sys.exit(code)   # a world of one: the ordinary exit
    atexit._run_exitfuncs()   # what a normal exit would run; os._exit skips only the interpreter's own teardown
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


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
