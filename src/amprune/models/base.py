"""A model family described as data: where its prunable units live and how its config names them.

Notation used in comments: H query heads, G KV heads (groups), d head_dim, D hidden_size,
I intermediate_size, T tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import AmpruneError


@dataclass(frozen=True)
class Family:
    """Module names and config rules of one family. Algorithm code only ever talks to this.

    Attributes:
        name: the family's name as users see it (`amprune list`).
        model_types: the `config.model_type` values this family serves.
        layers: dotted path from the `*ForCausalLM` module to the decoder `ModuleList`.
        attention / mlp: attribute names of the attention and MLP blocks inside a decoder layer.
        q, k, v: separate query/key/value projections, or `qkv` for one fused projection whose rows are
            `[q (H·d) | k (G·d) | v (G·d)]`.
        o: the attention output projection (its input is the concatenation of the head outputs).
        gate, up: the SwiGLU input projections, or `gate_up` fused as `[gate (I) | up (I)]`; `gate=None`
            with `up` set means a plain MLP (`fc1` → act → `fc2`).
        down: the MLP output projection (its input is one channel per neuron).
        heads_must_divide_hidden: the family's stock config refuses a head count that does not divide
            `hidden_size` (transformers ≥ 5.24 `LlamaConfig`).
        equivalent_model_type: a stock architecture with identical forward math whose config accepts any
            head count; used to save checkpoints the family's own config would refuse.
        text_config: attribute holding the text sub-config (multimodal wrappers), else None.
        head_pruning_refusal: given the sizes config, why no stock checkpoint of this model can hold fewer
            heads (e.g. config rules tied to `hidden_size // num_attention_heads`), or None if it can.
        post_mlp_norm: the layer normalises the MLP's output before adding it to the residual stream
            (Gemma's sandwich norms), so the MLP sets only its direction, not its size.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: str = "self_attn"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None
    down: str = "down_proj"
    heads_must_divide_hidden: bool = False
    equivalent_model_type: str | None = None
    text_config: str | None = None
    head_pruning_refusal: Callable[[object], str | None] | None = None
    post_mlp_norm: bool = False
    notes: tuple[str, ...] = field(default=())

    def sizes_config(self, config):
        """The (sub-)config that holds the decoder sizes: `config` itself or its text config."""
        return getattr(config, self.text_config) if self.text_config else config

    def accepted_head_counts(self, config) -> set[int] | None:
        """Head counts a stock checkpoint of this model can hold, or None for any count.

        A family whose config wants heads to divide `hidden_size` accepts any count anyway when it has
        a bias-free equivalent architecture to save as (see `equivalent_model_type`).
        """
        sizes = self.sizes_config(config)
        has_bias = getattr(sizes, "attention_bias", False) or getattr(sizes, "mlp_bias", False)
        if not self.heads_must_divide_hidden or (self.equivalent_model_type and not has_bias):
            return None
        return {h for h in range(1, sizes.num_attention_heads + 1) if sizes.hidden_size % h == 0}

    def check_head_pruning(self, config, heads_removed: int) -> None:
        """Refuse, before any work, a head removal that no stock checkpoint of this model could hold."""
        reason = self.head_pruning_refusal(self.sizes_config(config)) if self.head_pruning_refusal else None
        if heads_removed and reason:
            raise AmpruneError(
                f"cannot prune the attention heads of this '{config.model_type}' model: {reason}; "
                "prune the MLP only with --mlp-ratio"
            )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for part in self.layers.split("."):
            module = getattr(module, part)
        return module

    def attention_block(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention)

    def mlp_block(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.attention_block(layer), self.o)

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.mlp_block(layer), self.down)


@dataclass(frozen=True)
class Dims:
    """The prunable sizes of a model, identical in every decoder layer."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for plain multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config) -> Dims:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
        )
