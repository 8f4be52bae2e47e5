"""Surgery: physically remove the units a plan drops, and (separately) mask them for tests.

`apply_plan` slices rows of the input-side projections (q/k/v or fused qkv; gate/up or fused gate_up)
and columns of the output-side ones (o_proj, down_proj), updates module attributes and the config.
`mask_plan` zeroes the dropped units' o_proj/down_proj input columns instead: the sliced model must
compute exactly what the masked one does — that is the core test of the project.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .models.base import Dims, Family
from .plan import LayerPlan, Plan, UnitParams

# Module attributes some families cache from the config; kept in sync after slicing when present.
_ATTENTION_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups")
_MLP_ATTRS = ("intermediate_size",)


def unit_rows(units: list[int], size: int, offset: int = 0) -> list[int]:
    """Row indices of whole units of `size` rows each, starting at `offset`."""
    return [offset + u * size + j for u in units for j in range(size)]


def _slice_out(linear: nn.Linear, rows: list[int]) -> None:
    """Keep only output rows `rows` of a linear layer (weight rows and bias entries)."""
    index = torch.tensor(rows, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, index), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(rows)


def _slice_in(linear: nn.Linear, cols: list[int]) -> None:
    """Keep only input columns `cols` of a linear layer (its bias is unaffected)."""
    index = torch.tensor(cols, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, index), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(cols)


def _set_existing(module: nn.Module, names: tuple[str, ...], values: dict[str, int]) -> None:
    for name in names:
        if hasattr(module, name) and name in values:
            setattr(module, name, values[name])


def _out_row_params(linear: nn.Linear, rows: int) -> int:
    return rows * (linear.in_features + (1 if linear.bias is not None else 0))


def unit_params(family: Family, layer: nn.Module, dims: Dims) -> UnitParams:
    """Parameters carried by one head, one KV head and one neuron of `layer` (works on meta tensors)."""
    attn, mlp = family.attention_block(layer), family.mlp_block(layer)
    d = dims.head_dim
    if family.qkv:
        qkv = getattr(attn, family.qkv)
        head = kv_head = _out_row_params(qkv, d)
        kv_head *= 2
    else:
        head = _out_row_params(getattr(attn, family.q), d)
        kv_head = _out_row_params(getattr(attn, family.k), d) + _out_row_params(getattr(attn, family.v), d)
    head += d * getattr(attn, family.o).out_features
    if family.gate_up:
        neuron = _out_row_params(getattr(mlp, family.gate_up), 2)
    else:
        neuron = sum(_out_row_params(getattr(mlp, name), 1) for name in (family.gate, family.up) if name)
    neuron += getattr(mlp, family.down).out_features
    return UnitParams(head=head, kv_head=kv_head, neuron=neuron, layer=sum(p.numel() for p in layer.parameters()))


def prune_layer(family: Family, layer: nn.Module, dims: Dims, keep: LayerPlan) -> None:
    """Slice one decoder layer down to the units in `keep`."""
    attn, mlp = family.attention_block(layer), family.mlp_block(layer)
    d, inter = dims.head_dim, dims.intermediate_size
    q_rows = unit_rows(keep.heads_kept, d)
    kv_rows = unit_rows(keep.kv_heads_kept, d)
    if family.qkv:  # fused rows: [q (H·d) | k (G·d) | v (G·d)]
        q_size, kv_size = dims.num_heads * d, dims.num_kv_heads * d
        fused = q_rows + [q_size + r for r in kv_rows] + [q_size + kv_size + r for r in kv_rows]
        _slice_out(getattr(attn, family.qkv), fused)
    else:
        _slice_out(getattr(attn, family.q), q_rows)
        _slice_out(getattr(attn, family.k), kv_rows)
        _slice_out(getattr(attn, family.v), kv_rows)
    _slice_in(getattr(attn, family.o), q_rows)

    neurons = keep.neurons_kept
    if family.gate_up:  # fused rows: [gate (I) | up (I)]
        _slice_out(getattr(mlp, family.gate_up), neurons + [inter + i for i in neurons])
    else:
        for name in (family.gate, family.up):
            if name:
                _slice_out(getattr(mlp, name), neurons)
    _slice_in(getattr(mlp, family.down), neurons)

    heads, kv = len(keep.heads_kept), len(keep.kv_heads_kept)
    sizes = {"num_heads": heads, "num_attention_heads": heads, "num_key_value_heads": kv}
    _set_existing(attn, _ATTENTION_ATTRS, {**sizes, "num_key_value_groups": heads // kv})
    _set_existing(mlp, _MLP_ATTRS, {"intermediate_size": len(neurons)})
    _own_config(attn, num_attention_heads=heads, num_key_value_heads=kv, head_dim=d)
    _own_config(mlp, intermediate_size=len(neurons))


def _own_config(module: nn.Module, **sizes: int) -> None:
    """Give a block that reads sizes from the (shared) config at every forward (Phi-3 attention) its own
    copy with the pruned sizes, so the pruned layer runs right while the layers after it are still dense.
    `update_config` later writes the same sizes into the model's config."""
    if getattr(module, "config", None) is not None:
        module.config = copy.copy(module.config)
        for name, value in sizes.items():
            setattr(module.config, name, value)


def update_config(config, dims_after: Dims, layers_dropped: tuple[int, ...] = ()) -> None:
    """Write the pruned sizes into a (sizes) config, with an explicit head_dim; without the dropped layers,
    every per-layer list (Gemma's `layer_types`, …) keeps the entries of the layers that stay."""
    layers = config.num_hidden_layers
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == layers and layers_dropped:
            setattr(config, name, [item for i, item in enumerate(value) if i not in layers_dropped])
    config.num_hidden_layers = dims_after.num_layers
    config.num_attention_heads = dims_after.num_heads
    config.num_key_value_heads = dims_after.num_kv_heads
    config.head_dim = dims_after.head_dim
    config.intermediate_size = dims_after.intermediate_size


def drop_layers(model: nn.Module, family: Family, dropped: tuple[int, ...]) -> None:
    """Remove whole decoder layers; the others are renumbered (their `layer_idx` indexes the KV cache)."""
    layers = family.decoder_layers(model)
    for index in sorted(dropped, reverse=True):
        del layers[index]
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index


def kept_layers(num_layers: int, dropped: tuple[int, ...]) -> list[int]:
    """The dense model's indices of the layers a plan keeps, in order."""
    return [index for index in range(num_layers) if index not in dropped]


def apply_plan(model: nn.Module, family: Family, plan: Plan) -> None:
    """Physically remove every unit and layer the plan drops; the model and its config shrink in place."""
    layers = family.decoder_layers(model)
    for index, keep in zip(kept_layers(len(layers), plan.budget.layers_dropped), plan.layers, strict=True):
        prune_layer(family, layers[index], plan.dims, keep)
    drop_layers(model, family, plan.budget.layers_dropped)
    update_config(family.sizes_config(model.config), plan.dims_after, plan.budget.layers_dropped)


def dropped_inputs(keep: LayerPlan, dims: Dims) -> tuple[list[int], list[int]]:
    """The o_proj input channels (head_dim per dropped head) and down_proj input channels (one per dropped
    neuron) that a layer keeping `keep` loses."""
    dropped_heads = sorted(set(range(dims.num_heads)) - set(keep.heads_kept))
    dropped_neurons = sorted(set(range(dims.intermediate_size)) - set(keep.neurons_kept))
    return unit_rows(dropped_heads, dims.head_dim), dropped_neurons


@torch.no_grad()
def mask_plan(model: nn.Module, family: Family, plan: Plan) -> None:
    """Zero the o_proj/down_proj input columns of every dropped unit, and the whole o_proj/down_proj (biases
    too) of every dropped layer, which then adds nothing to the residual stream; shapes stay. A test tool."""
    layers = family.decoder_layers(model)
    for index in plan.budget.layers_dropped:
        for linear in (family.o_proj(layers[index]), family.down_proj(layers[index])):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    for index, keep in zip(kept_layers(len(layers), plan.budget.layers_dropped), plan.layers, strict=True):
        o_channels, neurons = dropped_inputs(keep, plan.dims)
        family.o_proj(layers[index]).weight[:, o_channels] = 0
        family.down_proj(layers[index]).weight[:, neurons] = 0
