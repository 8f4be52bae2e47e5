"""Peak memory of this process: CUDA allocator peak when on a GPU, else resident set size."""

from __future__ import annotations

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
