"""Shared fixtures (helpers live in tests/helpers.py)."""

from __future__ import annotations

import pytest
from helpers import char_tokenizer


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def calib_text(tmp_path):
    """A local .txt calibration file long enough for a few 32-token samples."""
    path = tmp_path / "calib.txt"
    path.write_text(
        " ".join(f"The {w} jumps over {n} lazy dogs near the river bank." for n in range(40) for w in ("fox", "cat"))
    )
    return str(path)
