"""The machine a benchmark runs on, described once for every result file."""

from __future__ import annotations

import os
import platform
import re
import subprocess


def cpu_name() -> str:
    """The CPU's model name as lscpu reports it (the bare architecture where lscpu is missing)."""
    try:
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", listing).group(1).strip()
    except (subprocess.CalledProcessError, AttributeError, FileNotFoundError):
        return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The CUDA device's name, or None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def machine() -> str:
    """One line: CPU model, core count, GPU (or none), operating system and architecture."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {gpu_name() or 'no GPU'}, {platform.system()} {platform.machine()}"
