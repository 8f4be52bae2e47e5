"""What a model costs per token: parameters, weight bytes, KV-cache bytes and FLOPs.

Notation: L decoder layers, D hidden_size, H query heads, G KV heads, d head_dim, I intermediate_size,
V vocabulary, c the number of keys a token attends to (its context length, itself included).

FLOPs per token (one multiply-add = 2 FLOPs; biases, norms, rotary, softmax and activations are O(D)
per token and ignored):

    F(c) = F_attn + F_mlp + 4·L·H·d·c + F_head

- F_attn = Σ 2·in·out over the attention block's linear layers of every layer
  (LLaMA-style: 2·L·(D·H·d + 2·D·G·d + H·d·D) for q, k, v and o_proj);
- F_mlp  = Σ 2·in·out over the MLP block's linear layers (SwiGLU: 2·L·3·D·I);
- 4·L·H·d·c = the attention scores Q·Kᵀ (2·H·d·c) and their weighted sum of V (2·H·d·c): the only
  term that depends on the context length (full attention is assumed; a sliding window only caps c);
- F_head = 2·D·V, paid only by tokens whose logits are computed.

Workloads (what `amprune bench` times), with F₀ = F_attn + F_mlp and s = 4·L·H·d:

- prefill of a P-token prompt, keeping only the last token's logits as `generate` does:
  P·F₀ + s·P(P+1)/2 + F_head (token i attends to i keys);
- generation of N tokens after a P-token prompt: the prefill, then N−1 one-token steps whose input
  attends to P+1, …, P+N−1 keys, each with its own F_head.

Counts come from the model's actual `nn.Linear` shapes (so fused projections and pruned sizes are
exact) and its config (heads and head_dim for the attention scores and the KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .models import Dims, Family


def _linear_flops(module: nn.Module) -> int:
    """2·in·out summed over every nn.Linear inside `module` (FLOPs per token)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class ModelCost:
    """Per-token costs of one model, all exact integers."""

    params: int  # distinct parameters (tied embeddings counted once)
    weight_bytes: int  # bytes of those parameters in their dtype
    kv_bytes_per_token: int  # keys + values cached per token: 2·L·G·d·bytes
    attn_flops: int  # F_attn
    mlp_flops: int  # F_mlp
    head_flops: int  # F_head
    score_flops_per_key: int  # s = 4·L·H·d

    def token_flops(self, context: int, logits: bool = True) -> int:
        """F(c): one token attending to `context` keys, with or without its logits."""
        head = self.head_flops if logits else 0
        return self.attn_flops + self.mlp_flops + self.score_flops_per_key * context + head

    def prefill_flops(self, prompt_len: int) -> int:
        """One prompt of `prompt_len` tokens, logits of the last token only."""
        linear = prompt_len * (self.attn_flops + self.mlp_flops)
        return linear + self.score_flops_per_key * prompt_len * (prompt_len + 1) // 2 + self.head_flops

    def generation_flops(self, prompt_len: int, new_tokens: int) -> int:
        """Prefill plus new_tokens − 1 cached one-token steps (one sequence)."""
        steps = sum(self.token_flops(prompt_len + t) for t in range(1, new_tokens))
        return self.prefill_flops(prompt_len) + steps


def model_cost(model: nn.Module, family: Family) -> ModelCost:
    """Parameters, bytes and per-token FLOPs of `model` (any dtype, any device, meta included)."""
    config = family.sizes_config(model.config)
    dims = Dims.from_config(config)
    layers = family.decoder_layers(model)
    params = list(model.parameters())  # deduplicated: a tied LM head is not counted twice
    dtype_bytes = params[0].element_size()
    head = model.get_output_embeddings()
    return ModelCost(
        params=sum(p.numel() for p in params),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        kv_bytes_per_token=2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * dtype_bytes,
        attn_flops=sum(_linear_flops(family.attention_block(layer)) for layer in layers),
        mlp_flops=sum(_linear_flops(family.mlp_block(layer)) for layer in layers),
        head_flops=_linear_flops(head) if head is not None else 0,
        score_flops_per_key=4 * dims.num_layers * dims.num_heads * dims.head_dim,
    )
