"""Phi-1.5 / Phi-2: q/k/v and `dense` projections with biases, a plain GELU MLP `fc1` → `fc2`.

Attention and MLP run in parallel from one LayerNorm, and only part of each head is rotated (partial
rotary); none of this changes which rows and columns a head or a neuron owns. The neuron score is the
token-mean of |act(x W_fc1)|, which is exactly the input of `fc2`. `PhiConfig` accepts any head count
with an explicit `head_dim`, which the pruned config always carries.
"""

from __future__ import annotations

from .base import Family


def _qk_layernorm_refusal(config) -> str | None:
    if getattr(config, "qk_layernorm", False):
        return (
            "its q/k LayerNorms are built with hidden_size // num_attention_heads channels, so a config with "
            "fewer heads would rebuild them at the wrong size"
        )
    return None


PHI = Family(
    name="phi",
    model_types=("phi",),
    o="dense",
    gate=None,
    up="fc1",
    down="fc2",
    head_pruning_refusal=_qk_layernorm_refusal,
)
