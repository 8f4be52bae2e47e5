"""What the cut cost, at a glance: the dense and the pruned model side by side, in seconds.

Perplexity on a few windows of the held-out halves of both packaged texts (never used for calibration)
and one short greedy continuation of the same prompt from each model. `amprune prune` prints it at the
end unless `--quiet` or `--no-check`; it is a first look, not a benchmark (see `amprune eval`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..textsets import PACKAGED_TEXTS
from .perplexity import perplexity

PROMPT = "The most important thing to remember when learning a new language is"
WINDOWS, WINDOW_TOKENS, NEW_TOKENS = 4, 256, 24


@dataclass
class Check:
    ppl: dict[str, tuple[float, float]]  # text → (dense, pruned) perplexity
    continuation: tuple[str, str]  # (dense, pruned) greedy continuation of PROMPT
    tokens: int  # tokens each perplexity is measured on


@torch.inference_mode()
def _continuation(model, tokenizer) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def quick_check(dense_source: str, pruned, tokenizer, device, dtype) -> Check | None:
    """Perplexity of the dense model (loaded from `dense_source`) and of `pruned` (a model, or its folder) on
    WINDOWS windows of WINDOW_TOKENS tokens of each packaged text's held-out half, and their greedy
    continuations of PROMPT. None when the two would not fit in memory together."""
    from ..checkpoint import fits_in_memory
    from ..models.loading import load_model

    pruned_bytes = sum(f.stat().st_size for f in Path(pruned).glob("*.safetensors")) if isinstance(
        pruned, (str, Path)) else sum(p.numel() * p.element_size() for p in pruned.parameters())
    if not fits_in_memory(3 * pruned_bytes):  # the dense model is larger than the pruned one
        return None
    if isinstance(pruned, (str, Path)):
        pruned = load_model(str(pruned), device, dtype)
    dense = load_model(dense_source, device, dtype)
    ppl = {}
    for name in PACKAGED_TEXTS:
        pair = [perplexity(model, tokenizer, name, WINDOW_TOKENS, WINDOWS, progress=False)["ppl"]
                for model in (dense, pruned)]
        ppl[name] = (pair[0], pair[1])
    return Check(ppl, (_continuation(dense, tokenizer), _continuation(pruned, tokenizer)), WINDOWS * WINDOW_TOKENS)


def check_summary(check: Check) -> str:
    """The check as a few lines: perplexities with their ratio, then both continuations."""
    lines = [f"quality check (perplexity on {check.tokens} held-out tokens of each text; a first look, see "
             "`amprune eval`):"]
    for name, (dense, pruned) in check.ppl.items():
        lines.append(f"  {name:5s} dense {dense:8.2f}   pruned {pruned:8.2f}   ({pruned / dense:.2f}× dense)")
    lines.append(f"  prompt: {PROMPT!r}")
    lines.append(f"  dense:  {check.continuation[0]!r}")
    lines.append(f"  pruned: {check.continuation[1]!r}")
    return "\n".join(lines)
