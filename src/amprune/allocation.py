"""Where to cut: every stock-valid way to remove a fraction of a model's parameters.

A stock checkpoint needs every decoder layer the same size, which leaves three free choices for a
given `--ratio`: how many heads (or KV groups) every layer loses, how many whole decoder layers go, and
how many neurons every remaining layer loses to make up the rest of the budget. `allocations` lists
them all: each head count the family and GQA mode can express (0 included), each number of dropped
layers up to `max_dropped` (0 included), with the neuron count that brings the removed parameters
closest to the ratio (keeping a multiple of `round_to` neurons). The paper's AMP is one of them: the
same fraction of heads and neurons, no layer dropped (`plan.make_budget`).

Which layers go is decided on data: those whose output is closest in angle to their input, i.e. that
change the residual stream least (the angular distance of Gromov et al., "The Unreasonable
Ineffectiveness of the Deeper Layers", 2024; ShortGPT's Block Influence is 1 − the same cosine).
Which allocation wins is decided by the held-out loss (`amprune.search`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from .errors import AmpruneError
from .models.base import Dims
from .plan import Budget, UnitParams, _removal_options, _round_half_up, effective_mode


@dataclass(frozen=True)
class Allocation:
    """Per-layer removal counts plus a number of whole layers to drop (which ones: `layers_to_drop`)."""

    heads_removed: int
    kv_heads_removed: int
    neurons_removed: int
    layers: int  # whole decoder layers dropped
    params_removed: int

    def describe(self, dims: Dims) -> str:
        return (f"{dims.num_heads - self.heads_removed}/{dims.num_heads} heads, "
                f"{dims.intermediate_size - self.neurons_removed}/{dims.intermediate_size} neurons, "
                f"{dims.num_layers - self.layers}/{dims.num_layers} layers")


def _neurons_for(remaining: float, layers: int, dims: Dims, units: UnitParams, round_to: int) -> int:
    """Neurons removed per layer closest to `remaining` parameters over `layers` layers, keeping a multiple of
    `round_to` of them (at least one multiple): between none and all but `round_to`."""
    exact = remaining / (layers * units.neuron)
    kept = _round_half_up((dims.intermediate_size - exact) / round_to) * round_to
    return dims.intermediate_size - min(max(kept, round_to), dims.intermediate_size)


def allocations(dims: Dims, units: UnitParams, total_params: int, gqa_mode: str, ratio: float,
                accepted_heads: Collection[int] | None = None, round_to: int = 1, max_dropped: int = 0,
                prune_heads: bool = True) -> list[Allocation]:
    """Every stock-valid allocation that removes `ratio` of the parameters as closely as the granularity
    allows (see the module docstring), fewest dropped layers and heads first.

    A candidate is kept only if it lands within one rounding step of the ratio: heads or layers that
    alone remove more than the ratio are not candidates.
    """
    target = ratio * total_params
    options = _removal_options(dims, effective_mode(dims, gqa_mode)) if prune_heads else [(0, 0)]
    if accepted_heads is not None:
        options = [o for o in options if dims.num_heads - o[0] in accepted_heads]
    found = []
    for dropped in range(max_dropped + 1):
        layers = dims.num_layers - dropped
        if layers < 1 or (dropped and not units.layer):
            break
        for heads, kv in options:
            fixed = dropped * units.layer + layers * (heads * units.head + kv * units.kv_head)
            neurons = _neurons_for(target - fixed, layers, dims, units, round_to)
            removed = fixed + layers * neurons * units.neuron
            step = layers * round_to * units.neuron  # what one rounding step of the neurons moves
            if abs(removed - target) <= step:
                found.append(Allocation(heads, kv, neurons, dropped, removed))
    if not found:
        raise AmpruneError(f"no stock-valid plan removes {ratio:.1%} of the parameters: every head count, layer "
                           "count and neuron count misses it; use a smaller --ratio")
    return found


def budget(allocation: Allocation, gqa_mode: str, total_params: int, ratio: float,
           dropped: tuple[int, ...] = ()) -> Budget:
    """The `Budget` of an allocation, once the layers to drop are known."""
    if len(dropped) != allocation.layers:
        raise ValueError(f"{allocation.layers} layers to drop, {len(dropped)} named")
    return Budget(gqa_mode=gqa_mode, heads_removed=allocation.heads_removed,
                  kv_heads_removed=allocation.kv_heads_removed, neurons_removed=allocation.neurons_removed,
                  params_before=total_params, params_after=total_params - allocation.params_removed,
                  target_fraction=ratio, layers_dropped=tuple(sorted(dropped)))


class AngularDistance:
    """Per layer, the token-mean angular distance arccos(cos(x_in, x_out)) / π between a decoder layer's
    input and output hidden states (real tokens only), summed in float64 (ranks sum theirs)."""

    def __init__(self, num_layers: int):
        self.sums = torch.zeros(num_layers, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)

    def __call__(self, index: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)  # (B, T)
        angles = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
        real = mask.to(angles.device).bool()
        self.sums[index] += angles[real].double().sum().cpu()
        self.tokens[index] += real.sum().cpu()

    def distances(self) -> list[float]:
        return (self.sums / self.tokens.clamp(min=1)).tolist()


def layers_to_drop(distances: list[float], count: int) -> tuple[int, ...]:
    """The `count` layers that change the stream least (smallest angular distance), in index order."""
    order = sorted(range(len(distances)), key=lambda i: (distances[i], i))
    return tuple(sorted(order[:count]))
