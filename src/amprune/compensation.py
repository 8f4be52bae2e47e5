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
down_proj biases.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .calibration import Moments
from .errors import AmpruneError
from .models.base import Family
from .plan import Plan
from .scoring import flap_compensation

BIAS_FLAGS = ("attention_bias", "mlp_bias")


def _skeleton(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def biased_config(config, family: Family):
    """A copy of `config` with the standard bias flags on; refuses one whose stock model still has no
    o_proj/down_proj bias."""
    flagged = copy.deepcopy(config)
    for flag in BIAS_FLAGS:
        setattr(family.sizes_config(flagged), flag, True)
    layer = family.decoder_layers(_skeleton(flagged))[0]
    if family.o_proj(layer).bias is None or family.down_proj(layer).bias is None:
        raise AmpruneError(
            f"bias compensation needs o_proj and down_proj biases, which a stock '{config.model_type}' config "
            f"cannot hold (no standard flag adds them); prune without --bias-compensation"
        )
    return flagged


def add_zero_biases(model: nn.Module, family: Family, flagged_config) -> int:
    """Give `model` every bias the flagged stock config has, as zeros; returns the parameters added."""
    added = 0
    for name, reference in _skeleton(flagged_config).named_modules():
        if isinstance(reference, nn.Linear) and reference.bias is not None:
            linear = model.get_submodule(name)
            if linear.bias is None:
                weight = linear.weight
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device),
                                           requires_grad=weight.requires_grad)
                added += linear.out_features
    for flag in BIAS_FLAGS:
        setattr(family.sizes_config(model.config), flag, True)
    return added


@torch.no_grad()
def compensate(model: nn.Module, family: Family, plan: Plan, o_moments: Moments, down_moments: Moments) -> None:
    """Add the mean contribution of every unit the plan drops to o_proj/down_proj biases; before surgery.

    Args:
        o_moments, down_moments: calibration moments of the o_proj and down_proj inputs (their means).
    """
    d = plan.dims.head_dim
    for index, (layer, keep) in enumerate(zip(family.decoder_layers(model), plan.layers, strict=True)):
        o_mean, down_mean = o_moments.mean_and_square(index)[0], down_moments.mean_and_square(index)[0]
        dropped_heads = sorted(set(range(plan.dims.num_heads)) - set(keep.heads_kept))
        dropped_channels = [h * d + j for h in dropped_heads for j in range(d)]
        dropped_neurons = sorted(set(range(plan.dims.intermediate_size)) - set(keep.neurons_kept))
        for linear, mean, dropped in ((family.o_proj(layer), o_mean, dropped_channels),
                                      (family.down_proj(layer), down_mean, dropped_neurons)):
            if dropped:
                linear.bias += flap_compensation(linear.weight, mean, dropped).to(linear.bias.dtype)
