"""Importance scores as pure functions of tensors: AMP (paper §2.2–2.4), then the baselines it is
compared with (random, reversed, magnitude, Wanda-sp, FLAP, LLM-Pruner Taylor) and their registry.

Notation: T tokens of one sample, H heads, d head_dim, D hidden_size, I intermediate_size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

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


def obs_removal_scores(
    gram: torch.Tensor,
    weight: torch.Tensor,
    size: int,
    removals: int,
    groups: torch.Tensor | None = None,
    per_step: int = 1,
    fixed: int = 0,
) -> torch.Tensor:
    """Structured Optimal Brain Surgeon: remove, greedily, the units a least-squares re-fit misses least.

    The output projection y = x Wᵀ loses a unit's input channels S; the best re-fit of the remaining
    columns on the calibration tokens (Gram matrix G = XᵀX) then leaves the error
    ΔE = tr(W_S [(G⁻¹)_SS]⁻¹ W_Sᵀ) (Hassibi & Stork's OBS for a block of weights, as ZipLM, Kurtic et al.
    NeurIPS 2023, and SlimGPT, Ling et al. NeurIPS 2024, apply it to heads and neurons). Each step
    removes the unit(s) of least ΔE, compensates the remaining columns and downdates G⁻¹, so later
    choices see the earlier ones. A head's output and a neuron's activation feed only this projection,
    so ΔE is exactly the re-fit error the layer is left with.

    Args:
        gram: (C, C) float64, the damped Gram matrix of the projection's input channels; the units own
            the first C − `fixed` channels, the last `fixed` (the constant channel 1 of a bias) stay.
        weight: (out, C) float64, the projection's weight (its bias as the column of the constant channel).
        size: channels per unit (head_dim for a head, 1 for a neuron).
        removals: how many units to remove.
        groups: (U,) each unit's group, to spread the removals evenly: a unit can go only while its group
            has had the fewest removals among the groups with units left (GQA's same count per KV
            group). None: no constraint.
        per_step: units removed together per step when `groups` is None (fewer downdates, coarser greed).
        fixed: trailing channels of `gram` and `weight` that belong to no unit.
    Returns:
        (U,) float64 scores whose lowest `removals` are the removed units, in removal order (0, 1, …); the
        other units follow, ranked by the error of removing each of them next.
    """
    units = (gram.shape[0] - fixed) // size
    ginv = torch.cholesky_inverse(torch.linalg.cholesky(gram))  # symmetric: rows are gathered, not columns
    wt = weight.T.clone(memory_format=torch.contiguous_format)  # (C, out), a copy: a unit's channels are rows
    alive = torch.ones(units, dtype=torch.bool)
    group_of = torch.arange(units) if groups is None else groups.cpu()
    taken = torch.zeros(int(group_of.max()) + 1, dtype=torch.long)
    take = 1 if groups is not None else max(1, per_step)
    order: list[int] = []
    while True:
        errors = _block_removal_errors(ginv, wt, size, units)
        if len(order) == removals:
            break
        least_taken = taken[group_of[alive]].min()
        eligible = alive & (taken[group_of] == least_taken)
        candidates = torch.where(eligible, errors, torch.inf)
        chosen = torch.argsort(candidates)[: min(take, removals - len(order), int(eligible.sum()))]
        channels = (chosen[:, None] * size + torch.arange(size)).reshape(-1).to(gram.device)
        rows = ginv.index_select(0, channels)  # (|R|, C) = (G⁻¹)_R·
        coefficients = torch.linalg.solve(rows[:, channels], rows)  # [(G⁻¹)_RR]⁻¹ (G⁻¹)_R·
        wt.addmm_(coefficients.T, wt.index_select(0, channels), alpha=-1)  # optimal compensation of the rest
        ginv.addmm_(rows.T, coefficients, alpha=-1)  # (G⁻¹)_KK − (G⁻¹)_KR [(G⁻¹)_RR]⁻¹ (G⁻¹)_RK; R → 0
        ginv.index_fill_(0, channels, 0).index_fill_(1, channels, 0)
        wt.index_fill_(0, channels, 0)
        alive[chosen] = False
        taken.index_add_(0, group_of[chosen], torch.ones(len(chosen), dtype=torch.long))
        order += chosen.tolist()
    scores = torch.empty(units, dtype=torch.float64)
    scores[order] = torch.arange(len(order), dtype=torch.float64)
    rest = torch.where(alive)[0]
    scores[rest[torch.argsort(errors[rest])]] = torch.arange(len(order), units, dtype=torch.float64)
    return scores


def _block_removal_errors(ginv: torch.Tensor, wt: torch.Tensor, size: int, units: int) -> torch.Tensor:
    """(U,) ΔE of removing each unit next (`wt`: the weight transposed); inf for units already removed."""
    n = units * size
    if size == 1:  # ‖W_j‖² / (G⁻¹)_jj
        diagonal = ginv.diagonal()[:n]
        errors = wt[:n].pow(2).sum(dim=1) / torch.where(diagonal > 0, diagonal, 1.0)
        return torch.where(diagonal > 0, errors, torch.inf).cpu()
    blocks = ginv[:n, :n].reshape(units, size, units, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (U, s, s)
    dead = blocks.diagonal(dim1=1, dim2=2).sum(dim=1) <= 0
    blocks = torch.where(dead[:, None, None], torch.eye(size, dtype=blocks.dtype, device=blocks.device), blocks)
    w_units = wt[:n].reshape(units, size, -1)  # (U, s, out)
    errors = (torch.linalg.solve(blocks, w_units) * w_units).sum(dim=(1, 2))
    return torch.where(dead, torch.inf, errors).cpu()


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


class Needs(Enum):
    """What calibration must collect for a scorer."""

    WEIGHTS = "weights"  # nothing: the weights alone
    AMP = "amp"  # AMP statistics (one forward pass)
    MOMENTS = "moments"  # per-channel input moments (the same forward pass)
    GRADIENTS = "gradients"  # a backward pass per calibration batch, over the whole model
    GRAM = "gram"  # the output projections' normal equations on the pruned stream (one-pass re-fit only)


@dataclass(frozen=True)
class Scorer:
    """A ranking of heads and neurons, and what calibration must collect for it.

    A `Needs.GRAM` scorer has no `layer_scores`: it runs inside the one-pass re-fit, which chooses from
    the normal equations itself (`reconstruct.LayerChooser`).
    """

    needs: Needs
    layer_scores: Callable[[LayerTensors], tuple[torch.Tensor, torch.Tensor]] | None
    source: str


def _random(t: LayerTensors) -> tuple[torch.Tensor, torch.Tensor]:
    heads, neurons = t.o_weight.shape[1] // t.head_dim, t.down_weight.shape[1]
    return torch.rand(heads, generator=t.generator), torch.rand(neurons, generator=t.generator)


SCORERS: dict[str, Scorer] = {
    "amp": Scorer(Needs.AMP, lambda t: t.amp, "AMP, arXiv 2504.21174 Eq. 8–9"),
    # Prunes the highest-scoring units instead of the lowest, with the same counts (paper §5.2).
    "reversed": Scorer(Needs.AMP, lambda t: (-t.amp[0], -t.amp[1]), "AMP's coherence check, paper §5.2"),
    "random": Scorer(Needs.WEIGHTS, _random, "uniformly random scores, seeded (paper §5.2)"),
    "magnitude": Scorer(
        Needs.WEIGHTS,
        lambda t: (
            magnitude_scores(t.head_in, t.o_weight, t.head_dim),
            magnitude_scores(t.neuron_in, t.down_weight, 1),
        ),
        "weight L2 norm (LLM-Pruner l2, FLAP mag_sp)",
    ),
    "wanda_sp": Scorer(
        Needs.MOMENTS,
        lambda t: (
            wanda_sp_scores(t.o_weight, t.o_moments[1], t.head_dim),
            wanda_sp_scores(t.down_weight, t.down_moments[1], 1),
        ),
        "structured Wanda (FLAP repository's wanda_sp)",
    ),
    "flap": Scorer(
        Needs.MOMENTS,
        lambda t: (flap_scores(t.o_weight, *t.o_moments, t.head_dim), flap_scores(t.down_weight, *t.down_moments, 1)),
        "FLAP fluctuation metric WIFV (An et al., AAAI 2024)",
    ),
    "taylor": Scorer(
        Needs.GRADIENTS,
        lambda t: (
            taylor_scores(t.head_in, t.head_in_grads, t.o_weight, t.o_grad, t.head_dim),
            taylor_scores(t.neuron_in, t.neuron_in_grads, t.down_weight, t.down_grad, 1),
        ),
        "LLM-Pruner first-order Taylor (Ma et al., NeurIPS 2023)",
    ),
    "obs": Scorer(Needs.GRAM, None, "structured OBS: the least-squares re-fit's error (ZipLM, SlimGPT)"),
}
