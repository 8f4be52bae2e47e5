"""Versions of the packages that decide the numbers, recorded in every plan and result file."""

from __future__ import annotations

from importlib import metadata

_PACKAGES = ("amprune", "torch", "transformers", "tokenizers", "safetensors", "gguf", "lm_eval", "peft")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
