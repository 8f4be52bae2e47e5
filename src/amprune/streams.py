"""Hidden states of the calibration batches between two decoder layers: in RAM, or spilled to disk.

A stream holds one (B, T, D) tensor per calibration batch in one flat buffer: host memory (pinned when
the layers run on a GPU, so batches copy asynchronously), or a file-backed map in the output's
temporary folder when the buffers would not fit in the memory left. The layer engine keeps two per
stream, the layer's input and its output, and swaps them after every layer.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import psutil
import torch

from .errors import AmpruneError

PLACES = ("auto", "ram", "disk")
GIB = 2**30


class HiddenStates:
    """Per-batch hidden states in one flat buffer; `stream[b]` is batch b's (B, T, D) view."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, file: Path | None = None, pin: bool = False):
        self.shapes, self.dtype, self.file = shapes, dtype, file
        sizes = [math.prod(shape) for shape in shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        total = self.offsets[-1]
        if file is not None:  # file-backed: pages go to disk as the kernel needs the memory
            self.buffer = torch.from_file(str(file), shared=True, size=total, dtype=dtype)
        else:
            self.buffer = torch.empty(total, dtype=dtype, pin_memory=pin)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, batch: int) -> torch.Tensor:
        return self.buffer[self.offsets[batch] : self.offsets[batch + 1]].view(self.shapes[batch])

    def __setitem__(self, batch: int, value: torch.Tensor) -> None:
        self[batch].copy_(value, non_blocking=value.device.type == "cuda")

    @property
    def nbytes(self) -> int:
        return self.offsets[-1] * self.dtype.itemsize

    def close(self) -> None:
        """Free the buffer (and delete its file)."""
        self.buffer = torch.empty(0, dtype=self.dtype)
        if self.file is not None:
            self.file.unlink(missing_ok=True)


def stream_bytes(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
    return sum(math.prod(shape) for shape in shapes) * dtype.itemsize


def choose_place(place: str, needed: int, reserve: int, folder: Path, disk_needed: int = 0) -> str:
    """Where `needed` bytes of hidden states live: `place` ("auto" decides), checked against the RAM left
    (after `reserve` bytes for weights and work) and the disk (`disk_needed` more bytes for the output).

    Raises a one-line error naming the space needed when neither can hold them.
    """
    if place not in PLACES:
        raise AmpruneError(f"unknown --hidden-states '{place}'; choose one of: {', '.join(PLACES)}")
    available = psutil.virtual_memory().available - reserve
    if place == "auto":
        place = "ram" if needed <= available else "disk"
    free_disk = shutil.disk_usage(_existing(folder)).free
    on_disk = disk_needed + (needed if place == "disk" else 0)
    if on_disk > free_disk:
        what = "the output and the hidden states need" if place == "disk" else "the output needs"
        raise AmpruneError(f"{what} {human_bytes(on_disk)} of disk in {folder}, {human_bytes(free_disk)} are free")
    return place


def human_bytes(count: int) -> str:
    """1.5 GiB, 20.3 MiB, 512 B."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
