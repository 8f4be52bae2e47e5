"""Registry of supported families, keyed by `config.model_type` (never by checkpoint name)."""

from __future__ import annotations

import difflib

from ..errors import AmpruneError
from .base import Dims, Family
from .gemma import GEMMA3, GEMMA3_MULTIMODAL
from .llama import LLAMA, MISTRAL, QWEN2
from .phi import PHI
from .phi3 import PHI3

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, PHI, PHI3, GEMMA3, GEMMA3_MULTIMODAL)
_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


class UnsupportedModelError(AmpruneError):
    """The model's `model_type` has no adapter."""


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def get_family(model_type: str) -> Family:
    """The family serving `model_type`, or an error that lists the supported ones."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        close = difflib.get_close_matches(model_type, supported_model_types(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnsupportedModelError(
            f"unsupported model_type '{model_type}'.{hint} Supported: {', '.join(supported_model_types())}."
        ) from None


__all__ = ["FAMILIES", "Dims", "Family", "UnsupportedModelError", "get_family", "supported_model_types"]
