"""Peak memory of this process: CUDA allocator peak when on a GPU, else resident set size."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys

import torch


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_bytes() -> int:
    """The process's peak resident set size."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def peak_memory_bytes() -> int:
    """Peak GPU allocation if CUDA is in use, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def peak_memory() -> dict[str, int]:
    """Peak RSS, and the CUDA allocator's peak where CUDA is in use."""
    peaks = {"rss": peak_rss_bytes()}
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        peaks["cuda"] = torch.cuda.max_memory_allocated()
    return peaks


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`; a no-op elsewhere).

    A layer's tensors under glibc's mmap threshold (32 MiB at most) live on the heap; once freed, the heap
    keeps their pages, and a pass over many layers leaves the resident set a fraction of a layer larger
    after each one unless they are returned (benchmarks/scale.py, 48 layers of 13.7 B: peak RSS 5.00 GiB
    without, 2.44 GiB with).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
