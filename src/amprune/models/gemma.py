"""Gemma-3 text decoders: standalone (`gemma3_text`) and inside the multimodal `gemma3` wrapper.

LLaMA-style module names with a GELU-gated MLP. The q/k RMSNorms act on each head's `head_dim`
channels, so removing heads leaves them untouched; multi-query attention (one KV head) means only query
heads can go. Sliding-window and global layers differ only in their attention mask and rotary base.
`Gemma3TextConfig` refuses a head count that does not divide `hidden_size` and no stock architecture
computes the same function (q/k norms, scaled embeddings, four norms per layer), so the plan keeps only
head counts that divide it (Gemma-3-270M: 640 hidden, 4 heads → 4, 2 or 1 heads).
"""

from __future__ import annotations

from .base import Family

GEMMA3 = Family(name="gemma3", model_types=("gemma3_text",), heads_must_divide_hidden=True, post_mlp_norm=True)

# The wrapper's vision tower and projector are never pruned (they count in the parameter total).
GEMMA3_MULTIMODAL = Family(
    name="gemma3-mm",
    model_types=("gemma3",),
    layers="model.language_model.layers",
    text_config="text_config",
    heads_must_divide_hidden=True,
    post_mlp_norm=True,
)
