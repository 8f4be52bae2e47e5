"""Phi-3 / Phi-3.5 / Phi-4-mini: fused `qkv_proj` rows `[q | k | v]` and `gate_up_proj` rows `[gate | up]`.

Phi-3 attention reads `config.num_attention_heads` at every forward to split `qkv_proj`, and falls back
to `hidden_size // num_attention_heads` without an explicit `head_dim`; surgery rewrites both in the
(shared) config. Long-context (longrope) configs are the exception: see `_longrope_refusal`.
"""

from __future__ import annotations

from .base import Family


def _longrope_refusal(config) -> str | None:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "longrope":
        return None
    rotary = int(config.hidden_size // config.num_attention_heads * rope.get("partial_rotary_factor", 1.0))
    return (
        f"Phi3Config requires its longrope short_factor/long_factor to have (hidden_size // num_attention_heads"
        f" · partial_rotary_factor) / 2 = {rotary // 2} entries, so a config with fewer heads fails to load"
    )


PHI3 = Family(
    name="phi3",
    model_types=("phi3",),
    q=None,
    k=None,
    v=None,
    qkv="qkv_proj",
    gate=None,
    up=None,
    gate_up="gate_up_proj",
    head_pruning_refusal=_longrope_refusal,
)
