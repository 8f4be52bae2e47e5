"""Data-parallel calibration with `torch.distributed`: every rank runs its share of the samples.

`torchrun --nproc-per-node N -m amprune prune …` starts N ranks; each calibrates on samples rank,
rank + N, … . Every statistic the layer engine needs is a sum over tokens (AMP sums, input moments,
Gram matrices and normal equations), so one all-reduce of a layer's sums gives every rank the same
totals: every rank then chooses the same units and solves for the same re-fitted weights, and rank 0
writes. NCCL on GPUs, gloo on CPUs. Nothing here is a communication layer of our own: these are the
few `torch.distributed` calls the engine makes, each a no-op in a single process.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from .errors import AmpruneError


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> None:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); nothing in one process."""
    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (`LOCAL_RANK`) when the request names CUDA without an index."""
    if launched() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def my_share(items: list) -> list:
    """This rank's items: rank, rank + N, … (all of them in one process)."""
    return items[rank() :: world_size()]


def sum_(*tensors: torch.Tensor) -> None:
    """All-reduce (sum) every tensor in place across ranks."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def check_agreement(settings: dict) -> None:
    """Every rank must run the same request: gather them all and fail, on every rank alike, if one differs
    from rank 0's."""
    if not dist.is_initialized():
        return
    gathered: list[str | None] = [None] * world_size()
    dist.all_gather_object(gathered, json.dumps(settings, sort_keys=True, default=str))
    first = json.loads(gathered[0])
    for other_rank, text in enumerate(gathered[1:], start=1):
        other = json.loads(text)
        diff = sorted(key for key in first.keys() | other.keys() if first.get(key) != other.get(key))
        if diff:
            raise AmpruneError(f"ranks disagree on the request: rank {other_rank} has "
                               + ", ".join(f"{key}={other.get(key)!r} (rank 0: {first.get(key)!r})" for key in diff))
