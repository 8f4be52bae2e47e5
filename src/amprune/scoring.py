"""Importance scores as pure functions of tensors: AMP (paper §2.2–2.4), then the baselines it is
compared with (random, reversed, magnitude, Wanda-sp, FLAP, LLM-Pruner Taylor) and their registry.

Notation: T tokens of one sample, H heads, d head_dim, D hidden_size, I intermediate_size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Head contributions are (H, t, D): chunk tokens so that at most CHUNK_ELEMENTS floats (64 MiB) exist at
# once — a whole 512-token sample for SmolLM2, 128 tokens for a 7B layer.
CHUNK_ELEMENTS = 1 << 24


def head_contribution_norms(o_input: torch.Tensor, o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """‖h_n · W_O[:, n]‖₁ for every token and head n: the size of each head's term of the attention output.

    Args:
        o_input: (N, H·d) the input of `o_proj` (the concatenated head outputs), one row per token.
        o_weight: (D, H·d) the `o_proj` weight (nn.Linear layout: y = x Wᵀ).
    Returns:
        (N, H) float32.
    """
    tokens = o_input.shape[0]
    head_dim = o_input.shape[1] // num_heads
    # W_O rows per head in the paper's x·W convention: (H, d, D)
    per_head_w = o_weight.float().t().reshape(num_heads, head_dim, -1)
    rows = max(1, CHUNK_ELEMENTS // (num_heads * per_head_w.shape[2]))
    norms = torch.empty(tokens, num_heads, dtype=torch.float32, device=o_input.device)
    for start in range(0, tokens, rows):
        h = o_input[start : start + rows].float().view(-1, num_heads, head_dim).transpose(0, 1)  # (H, t, d)
        contributions = torch.bmm(h, per_head_w)  # (H, t, D), a fresh tensor: abs_ in place is safe
        norms[start : start + rows] = contributions.abs_().sum(dim=2).t()
    return norms


# ---------------------------------------------------------------------------------------------------------
# Baselines. Every scorer ranks the same units as AMP (query heads and neurons) of one layer, so the same
# budget rules (amprune.plan) apply to all of them. A unit owns `size` consecutive input channels of the
# output projection (head_dim channels of o_proj per head, one channel of down_proj per neuron) and the
# same `size` rows of every input projection (q_proj per head; gate/up or fc1 per neuron). Shared k/v rows
# (GQA) belong to no single head and are left out.


def _per_unit(channels: torch.Tensor, size: int) -> torch.Tensor:
    """Sum per-channel values (C,) over consecutive groups of `size` channels → (C / size,)."""
    return channels.view(-1, size).sum(dim=1)


def magnitude_scores(in_weights: list[torch.Tensor], out_weight: torch.Tensor, size: int) -> torch.Tensor:
    """L2 norm of all of a unit's weights: its rows of every input projection and its output columns.

    The data-free baseline of LLM-Pruner's `l2` group importance (Ma et al., NeurIPS 2023) and FLAP's
    `mag_sp` (An et al., AAAI 2024).

    Args:
        in_weights: input projections, each (U·size, D) (nn.Linear layout).
        out_weight: the output projection, (D, U·size).
    Returns:
        (U,) float32 scores.
    """
    squares = out_weight.float().pow(2).sum(dim=0)  # (U·size,)
    for weight in in_weights:
        squares = squares + weight.float().pow(2).sum(dim=1)
    return _per_unit(squares, size).sqrt()


def wanda_sp_scores(out_weight: torch.Tensor, input_sq_mean: torch.Tensor, size: int) -> torch.Tensor:
    """Structured Wanda: Σ over the unit's output columns of |W_ij| · ‖X_j‖₂.

    Wanda's |W|·‖X‖ (Sun et al., ICLR 2024) summed over a unit, as in the `wanda_sp` baseline of FLAP's
    repository (An et al., AAAI 2024). ‖X_j‖₂ is taken as the root-mean-square of input channel j over
    all calibration tokens, which differs from the plain norm by one factor per model (same ranking).

    Args:
        out_weight: (D, U·size) weight of o_proj or down_proj.
        input_sq_mean: (U·size,) mean of x_j² over calibration tokens of that projection's input.
    """
    channels = out_weight.float().abs().sum(dim=0) * input_sq_mean.float().clamp(min=0).sqrt()
    return _per_unit(channels, size)


def flap_scores(
    out_weight: torch.Tensor, input_mean: torch.Tensor, input_sq_mean: torch.Tensor, size: int
) -> torch.Tensor:
    """FLAP's fluctuation metric (WIFV): Var_tokens(x_j) · ‖W[:, j]‖₂², summed over the unit's channels.

    An et al., "Fluctuation-based Adaptive Structured Pruning for LLMs" (AAAI 2024), Eq. 5. FLAP averages
    a head's channels instead of summing them: the same ranking within a layer, which is all a uniform
    plan uses (FLAP's cross-layer standardisation serves its adaptive allocation, not used here).

    Args:
        out_weight: (D, U·size) weight of o_proj or down_proj.
        input_mean, input_sq_mean: (U·size,) mean of x_j and of x_j² over calibration tokens.
    """
    variance = (input_sq_mean.double() - input_mean.double().pow(2)).clamp(min=0).float()
    return _per_unit(variance * out_weight.float().pow(2).sum(dim=0), size)


def flap_compensation(out_weight: torch.Tensor, input_mean: torch.Tensor, dropped: list[int]) -> torch.Tensor:
    """FLAP's baseline bias compensation: W[:, dropped] · E[x_dropped], to add to the output bias.

    Removing input channels replaces them by zero; adding their mean contribution keeps the output's
    mean unchanged (An et al., AAAI 2024, §3.3).

    Args:
        out_weight: (D, C) weight of o_proj or down_proj before surgery.
        input_mean: (C,) mean of that projection's input channels over calibration tokens.
        dropped: the removed input channels.
    Returns:
        (D,) float32 bias.
    """
    index = torch.tensor(dropped, dtype=torch.long, device=out_weight.device)
    return out_weight.float().index_select(1, index) @ input_mean.float().to(out_weight.device).index_select(0, index)


def taylor_scores(
    in_weights: list[torch.Tensor],
    in_grads: list[torch.Tensor],
    out_weight: torch.Tensor,
    out_grad: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """First-order Taylor importance Σ |w · ∂L/∂w| over all of a unit's weights.

    LLM-Pruner's element-wise first-order group importance (`--taylor param_first`; Ma et al., NeurIPS
    2023, Eq. 3–5), with the gradient of the language-modelling loss summed over calibration batches.
    Shapes as in `magnitude_scores`; every gradient has its weight's shape.
    """
    channels = (out_weight.float() * out_grad.float()).abs().sum(dim=0)
    for weight, grad in zip(in_weights, in_grads, strict=True):
        channels = channels + (weight.float() * grad.float()).abs().sum(dim=1)
    return _per_unit(channels, size)


@dataclass
class LayerTensors:
    """Everything a scorer may read about one decoder layer; what it does not need may be None.

    Weights use the nn.Linear layout; `head_in` holds the q_proj rows (H·d, D), `neuron_in` the gate
    and up rows (I, D) each (only fc1 for a plain MLP); gradients, when present, match their weights.
    """

    head_dim: int
    head_in: list[torch.Tensor]
    o_weight: torch.Tensor  # (D, H·d)
    neuron_in: list[torch.Tensor]
    down_weight: torch.Tensor  # (D, I)
    amp: tuple[torch.Tensor, torch.Tensor] | None = None  # (H,), (I,) AMP scores
    o_moments: tuple[torch.Tensor, torch.Tensor] | None = None  # (H·d,) mean and mean square of the o_proj input
    down_moments: tuple[torch.Tensor, torch.Tensor] | None = None  # (I,) the same for the down_proj input
    head_in_grads: list[torch.Tensor] | None = None
    o_grad: torch.Tensor | None = None
    neuron_in_grads: list[torch.Tensor] | None = None
    down_grad: torch.Tensor | None = None
    generator: torch.Generator | None = None  # the `random` scorer's seeded source


@dataclass(frozen=True)
class Scorer:
    """A ranking of heads and neurons, and what calibration must collect for it.

    needs: "amp" (AMP statistics), "moments" (per-channel input moments, same forward pass), "gradients"
    (a backward pass per calibration batch) or None (weights only).
    """

    needs: str | None
    layer_scores: Callable[[LayerTensors], tuple[torch.Tensor, torch.Tensor]]
    source: str


def _random(t: LayerTensors) -> tuple[torch.Tensor, torch.Tensor]:
    heads, neurons = t.o_weight.shape[1] // t.head_dim, t.down_weight.shape[1]
    return torch.rand(heads, generator=t.generator), torch.rand(neurons, generator=t.generator)


SCORERS: dict[str, Scorer] = {
    "amp": Scorer("amp", lambda t: t.amp, "AMP, arXiv 2504.21174 Eq. 8–9"),
    # Prunes the highest-scoring units instead of the lowest, with the same counts (paper §5.2).
    "reversed": Scorer("amp", lambda t: (-t.amp[0], -t.amp[1]), "AMP's coherence check, paper §5.2"),
    "random": Scorer(None, _random, "uniformly random scores, seeded (paper §5.2)"),
    "magnitude": Scorer(
        None,
        lambda t: (
            magnitude_scores(t.head_in, t.o_weight, t.head_dim),
            magnitude_scores(t.neuron_in, t.down_weight, 1),
        ),
        "weight L2 norm (LLM-Pruner l2, FLAP mag_sp)",
    ),
    "wanda_sp": Scorer(
        "moments",
        lambda t: (
            wanda_sp_scores(t.o_weight, t.o_moments[1], t.head_dim),
            wanda_sp_scores(t.down_weight, t.down_moments[1], 1),
        ),
        "structured Wanda (FLAP repository's wanda_sp)",
    ),
    "flap": Scorer(
        "moments",
        lambda t: (flap_scores(t.o_weight, *t.o_moments, t.head_dim), flap_scores(t.down_weight, *t.down_moments, 1)),
        "FLAP fluctuation metric WIFV (An et al., AAAI 2024)",
    ),
    "taylor": Scorer(
        "gradients",
        lambda t: (
            taylor_scores(t.head_in, t.head_in_grads, t.o_weight, t.o_grad, t.head_dim),
            taylor_scores(t.neuron_in, t.neuron_in_grads, t.down_weight, t.down_grad, 1),
        ),
        "LLM-Pruner first-order Taylor (Ma et al., NeurIPS 2023)",
    ),
}
