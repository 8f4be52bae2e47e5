"""FLAP's bias compensation (An et al., AAAI 2024, §3.3), kept inside a stock config.

Removing input channels of o_proj/down_proj drops their mean contribution W[:, j]·E[x_j] from every
output; FLAP adds it back as an output bias. A stock checkpoint can only carry that bias where the
family's config has a standard flag that creates it:

- LLaMA (`attention_bias`, `mlp_bias`): possible. The flags add biases to *all* projections of the
  block (q, k, v, o and gate, up, down). Only the o_proj and down_proj biases carry the compensation;
  the others stay zero and change nothing but the size: (H + 2G)·d + 2·I extra parameters per layer,
  plus 2·D for the two useful ones (5,184 per layer, 0.12 % of SmolLM2-135M). The budget counts them.
- Mistral (no bias flags) and Qwen2 (q/k/v biases only, none on o_proj): refused, with the reason.

The check is generic: build the flagged config's model on the meta device and look for the o_proj and
down_proj biases; the layer engine then gives each layer the biases that model has, as zeros.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import AmpruneError
from .models.base import Dims, Family
from .plan import LayerPlan
from .scoring import flap_compensation
from .stats import LayerStats
from .surgery import dropped_inputs

BIAS_FLAGS = ("attention_bias", "mlp_bias")


def _first_layer(config, family: Family) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return family.decoder_layers(AutoModelForCausalLM.from_config(config))[0]


def biased_config(config, family: Family):
    """A copy of `config` with the standard bias flags on; refuses one whose stock model still has no
    o_proj/down_proj bias."""
    flagged = copy.deepcopy(config)
    for flag in BIAS_FLAGS:
        setattr(family.sizes_config(flagged), flag, True)
    layer = _first_layer(flagged, family)
    if family.o_proj(layer).bias is None or family.down_proj(layer).bias is None:
        raise AmpruneError(
            f"bias compensation needs o_proj and down_proj biases, which a stock '{config.model_type}' config "
            f"cannot hold (no standard flag adds them); prune without --correction bias"
        )
    return flagged


def biased_linears(flagged_config, family: Family) -> frozenset[str]:
    """The names (inside a decoder layer) of every linear layer the flagged config gives a bias."""
    layer = _first_layer(flagged_config, family)
    return frozenset(name for name, m in layer.named_modules() if isinstance(m, nn.Linear) and m.bias is not None)


def add_zero_biases(layer: nn.Module, names: frozenset[str]) -> None:
    """Give the linear layers `names` of `layer` a zero bias where they have none."""
    for name in names:
        linear = layer.get_submodule(name)
        if linear.bias is None:
            weight = linear.weight
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device),
                                       requires_grad=weight.requires_grad)


@torch.no_grad()
def compensate_layer(layer: nn.Module, family: Family, dims: Dims, keep: LayerPlan, stats: LayerStats) -> None:
    """Add the mean contribution of every unit `keep` drops to o_proj/down_proj biases; before surgery.

    `stats` holds the dense stream's input moments of this layer's o_proj and down_proj.
    """
    o_channels, neurons = dropped_inputs(keep, dims)
    for linear, moments, dropped in ((family.o_proj(layer), stats.o_moments, o_channels),
                                     (family.down_proj(layer), stats.down_moments, neurons)):
        if dropped:
            mean = moments.mean_and_square()[0]
            linear.bias += flap_compensation(linear.weight, mean, dropped).to(linear.bias.dtype)
