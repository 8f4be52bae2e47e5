"""Reconstruction: one layer's surgery, re-fitting its o_proj and down_proj in closed form.

After a layer loses heads and neurons, its output projections still weigh the kept input channels as
if the removed ones were there. Reconstruction re-fits the kept columns of `o_proj` and `down_proj`
(`dense`/`fc2` in Phi) by least squares so the projection's output on the calibration tokens matches a
target. No training: per projection, the normal equations' statistics and one linear solve.

**Fit.** X_k: the kept input channels the projection receives in the pruned model (sequential mode,
below); T: the target outputs; W_k: plain surgery's weights. Minimise ‖X_k W'ᵀ − T‖² + λ‖W' − W_k‖²,
i.e. solve (X_kᵀX_k + λI) W'ᵀ = X_kᵀT + λW_kᵀ in float64, with λ a small fraction of the mean diagonal.
Plain surgery's W_k is a feasible point and the damping pulls towards it, so on the calibration tokens
the re-fit is never worse than surgery (tested). The statistics (X_kᵀX_k, X_kᵀT, sums, ‖T‖²) also give
both errors reported per layer, without another pass over the tokens. A projection with a bias (Phi)
gets an intercept: the constant channel 1 is one more kept input, so the bias absorbs the removed
channels' mean contribution (FLAP's bias compensation, fitted).

**Target.** The dense projection applied to the same input, T = X Wᵀ (all channels, as the dense
layer computes on the pruned model's stream). The kept heads/neurons compute exactly what they compute
in the dense layer, so T is the block's own dense output on this stream: no second activation stream,
and with nothing removed the weights stay exactly as they are. Upstream errors are accounted for:
every layer is fitted on the inputs the pruned layers before it produce (as GPTQ does), so they do not
compound. Targeting the dense *model's* block outputs instead (on its own stream, to also cancel the
drift earlier layers left) needs a second stream and a second dense forward per layer; a one-off
trial on SmolLM2 at 30 % gave clearly worse perplexity (not a benchmark: see the issue notes), as a
linear fit cannot map drifted inputs to the dense outputs and overfits the calibration tokens trying.

**Sequential mode.** The layer engine (`amprune.engine`) hands every layer the pruned model's hidden
states and its call arguments (masks, position embeddings, …). Per layer (`refit_layer`): (1) the dense
layer runs until its attention block returns, accumulating `o_proj`'s statistics; `o_proj` is re-fitted
and the attention outputs are recomputed from the stored `o_proj` inputs; (2) the layer runs again with
the attention block replaced by a replay of those outputs, until its MLP block returns; `down_proj` is
re-fitted the same way; (3) the layer runs once more with both blocks replayed (only norms and residual
adds are computed) to give the next layer's inputs, and is sliced with `surgery.prune_layer`. Every
block is computed once, so the cost is about one dense forward plus the k × k and k × out products and
the re-fitted projections' outputs on the kept channels. This relies on each block returning its output
projection's output (checked, by identity, on every call). Memory: the calibration tokens' hidden
states and one block's inputs/outputs, plus one projection's statistics.

Ranks (`amprune.distributed`) all-reduce the normal equations before every solve, so they all fit the
same weights.

**Two passes in one** (`fixed_units`): the units were chosen on the dense model's stream (the paper's
AMP), the re-fit runs on the pruned one; the engine carries both streams through one pass.
**One pass** (`LayerChooser`): the plan's rule is per layer, so the units can be chosen inside the
re-fit, from each layer's scoring statistics on the pruned stream; no dense stream is needed. The `obs`
scorer chooses from the projection's normal equations over all its input channels instead
(`scoring.obs_removal_scores`): the units whose loss the re-fit makes up best go, and the re-fit then
reuses the kept channels' part of the same statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from . import distributed
from .models import Dims
from .models.base import Family
from .plan import Budget, LayerPlan, select_units
from .scoring import SCORERS, Needs, obs_removal_scores
from .stats import LayerStats, layer_scores, real_tokens, recording
from .surgery import prune_layer, unit_rows

logger = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.01  # λ as a fraction of the mean diagonal of the kept channels' Gram matrix
MAX_CONDITION = 1e12  # beyond this a float64 solve has lost too many digits to be trusted


# choose(proj, (inputs, outputs, masks), attention?, the layer's plan so far, stats) → (plan, normal equations)
Choose = Callable[[nn.Linear, tuple, bool, "LayerPlan | None", "LayerStats | None"], tuple]


class IllConditionedError(ValueError):
    """The damped normal equations are singular or too ill-conditioned to solve."""


class _Stop(Exception):
    """Raised by a hook to end a layer's forward pass once the statistics it needs are in."""


@dataclass
class NormalEquations:
    """Running statistics of one projection's least-squares problem, in float64.

    X_k: the projection's kept input channels on the calibration tokens; T: its target outputs.
    Kept: X_kᵀX_k, X_kᵀT, Σx_k, ΣT, ‖T‖² and the token count, so the fit and its errors never need the
    tokens again.
    """

    kept: list[int]
    xtx: torch.Tensor  # (k, k)
    xty: torch.Tensor  # (k, out)
    x_sum: torch.Tensor  # (k,)
    y_sum: torch.Tensor  # (out,)
    yty: float = 0.0
    count: int = 0

    @classmethod
    def zeros(cls, kept: list[int], out_features: int, device: torch.device | str = "cpu") -> NormalEquations:
        k = len(kept)
        zeros = partial(torch.zeros, dtype=torch.float64, device=device)
        return cls(list(kept), zeros(k, k), zeros(k, out_features), zeros(k), zeros(out_features))

    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add (N, n) input rows (all channels) and their (N, out) targets; products in float32, sums in float64."""
        x = inputs.float().index_select(1, torch.tensor(self.kept, device=inputs.device))
        y = targets.float()
        self.xtx += (x.T @ x).double()
        self.xty += (x.T @ y).double()
        self.x_sum += x.sum(dim=0).double()
        self.y_sum += y.sum(dim=0).double()
        self.yty += y.double().pow(2).sum().item()
        self.count += x.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks (nothing in one process)."""
        totals = torch.tensor([self.yty, float(self.count)], dtype=torch.float64, device=self.xtx.device)
        distributed.sum_(self.xtx, self.xty, self.x_sum, self.y_sum, totals)
        self.yty, self.count = totals[0].item(), int(totals[1].item())

    def restricted(self, kept: list[int]) -> NormalEquations:
        """The same statistics for a subset `kept` of this system's kept channels (no pass over the tokens)."""
        position = {channel: i for i, channel in enumerate(self.kept)}
        index = torch.tensor([position[channel] for channel in kept], device=self.xtx.device)
        return NormalEquations(list(kept), self.xtx[index][:, index], self.xty[index], self.x_sum[index],
                               self.y_sum, self.yty, self.count)

    def augmented(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """G, C and W (out, k[+1]) of the system; with a bias the constant input 1 is one more kept channel."""
        g, c, w = self.xtx, self.xty, weight.double()
        if bias is not None:
            count = torch.tensor([[float(self.count)]], dtype=torch.float64, device=g.device)
            g = torch.cat([torch.cat([g, self.x_sum[:, None]], 1), torch.cat([self.x_sum[None, :], count], 1)], 0)
            c = torch.cat([c, self.y_sum[None, :]], 0)
            w = torch.cat([w, bias.double()[:, None]], 1)
        return g, c, w

    def relative_error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """‖X_k Wᵀ + b − T‖² / ‖T‖² over the calibration tokens, from the statistics alone."""
        g, c, w = self.augmented(weight, bias)
        squared = ((w @ g) * w).sum() - 2 * (w * c.T).sum() + self.yty
        return max(squared.item(), 0.0) / max(self.yty, 1e-300)


NOT_FINITE = "the kept input channels are all zero or not finite on the calibration tokens"


def damped(gram: torch.Tensor, channels: int, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """G + λI and λ = damping · the mean of G's diagonal over its first `channels` (the input channels: a
    bias's constant channel stays out of the mean). The re-fit and the obs scorer solve the same system."""
    scale = gram.diagonal()[:channels].mean()
    if not torch.isfinite(gram).all() or scale <= 0:
        raise IllConditionedError(NOT_FINITE)
    lam = damping * scale
    return gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), lam


def refit(
    weight: torch.Tensor, bias: torch.Tensor | None, eqs: NormalEquations, damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares re-fit of a projection's kept input columns `eqs.kept` (and bias), in float64.

    Minimises ‖X_k W'ᵀ + b' − T‖² + λ‖[W', b'] − [W_k, b]‖² with λ = damping · mean(diag X_kᵀX_k).

    Args:
        weight: (out, n) the dense projection's weight; bias: (out,) or None.
        eqs: statistics of the projection's kept inputs and targets on the calibration tokens.
        damping: the fit is pulled towards the plain-surgery weights W_k by λ.

    Returns:
        (out, k) new kept columns and the new bias (None if there is none), in the weight's dtype.

    Raises:
        IllConditionedError: the damped system is singular or its condition number exceeds MAX_CONDITION.
    """
    k = len(eqs.kept)
    g, c, w_k = eqs.augmented(weight[:, eqs.kept], bias)
    if not torch.isfinite(c).all():
        raise IllConditionedError(NOT_FINITE)
    system, lam = damped(g, k, damping)
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        raise IllConditionedError("the normal equations are singular")
    diag = factor.diagonal()
    condition = (diag.max() / diag.min()).item() ** 2  # cheap estimate from the Cholesky factor
    if condition > MAX_CONDITION:
        raise IllConditionedError(f"the normal equations are ill-conditioned (condition ≈ {condition:.1e})")
    new = torch.cholesky_solve(c + lam * w_k.T, factor).T.to(weight.dtype)  # (G + λI) W'ᵀ = C + λ W_kᵀ
    return new[:, :k].contiguous(), None if bias is None else new[:, k].contiguous()


def _first(output):
    """A block's or layer's output tensor: the output itself or the first item of a tuple."""
    return output[0] if isinstance(output, tuple) else output


class _Replay(nn.Module):
    """Stands in for a block: returns the given outputs, one per call, in order."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, *args, **kwargs):
        return next(self.outputs)


@contextmanager
def _replaced(layer: nn.Module, name: str, stand_in: nn.Module) -> Iterator[None]:
    original = getattr(layer, name)
    setattr(layer, name, stand_in)
    try:
        yield
    finally:
        setattr(layer, name, original)


def _run_block(layer: nn.Module, block: nn.Module, proj: nn.Linear, batches: list, stats: LayerStats | None) -> tuple:
    """Run `layer` on every batch until `block` returns; `proj` must produce the block's output.

    Returns per batch `proj`'s input and the block's (dense) output. `stats`, if given, is told each
    batch's padding mask (its hooks record the layer's scoring statistics on the way).
    """
    inputs, outputs, current = [], [], {}

    def before_proj(module, args):
        inputs.append(args[0])

    def after_proj(module, args, output):
        current["proj"] = output

    def after_block(module, args, output):
        if _first(output) is not current.pop("proj", None):
            raise RuntimeError(f"{type(block).__name__} does not return its {type(proj).__name__}'s output, "
                               "so reconstruction cannot replay it")
        outputs.append(output)
        raise _Stop

    handles = [proj.register_forward_pre_hook(before_proj), proj.register_forward_hook(after_proj),
               block.register_forward_hook(after_block)]
    try:
        for x, args, kwargs, mask in batches:
            if stats is not None:
                stats.mask = mask
            try:
                layer(x.to(proj.weight.device, non_blocking=True), *args, **kwargs)
            except _Stop:
                continue
            raise RuntimeError(f"the layer never returned from {type(block).__name__} during reconstruction")
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def _equations(proj: nn.Linear, kept: list[int], inputs: list, outputs: list, masks: list) -> NormalEquations:
    """The normal equations of re-fitting `proj`'s kept inputs to the block's outputs, over real tokens (and
    over every rank's tokens)."""
    eqs = NormalEquations.zeros(kept, proj.out_features, proj.weight.device)
    for x, output, mask in zip(inputs, outputs, masks, strict=True):
        eqs.add(real_tokens(x, mask), real_tokens(_first(output), mask))
    eqs.all_reduce()
    return eqs


def _refit_block(proj: nn.Linear, eqs: NormalEquations, inputs: list, outputs: list, damping: float,
                 where: str) -> tuple[list, dict]:
    """Re-fit `proj` in place (removed input columns zeroed: the layer now computes the pruned output).

    With no input channel removed the weights are kept as they are (they are exact; a fit would only add
    rounding). Returns the block's new outputs per batch and the relative error of plain surgery and of
    the re-fit against the dense outputs, over the real calibration tokens.
    """
    weight, bias, kept = proj.weight.data, None if proj.bias is None else proj.bias.data, eqs.kept
    try:
        if len(kept) == weight.shape[1]:
            new_weight, new_bias = weight.clone(), bias
        else:
            new_weight, new_bias = refit(weight, bias, eqs, damping)
    except IllConditionedError as err:
        logger.warning("reconstruction of %s skipped, plain surgery weights kept: %s", where, err)
        new_weight, new_bias = weight[:, kept], bias
    errors = {"surgery": eqs.relative_error(weight[:, kept], bias), "refit": eqs.relative_error(new_weight, new_bias)}
    index = torch.tensor(kept, device=weight.device)
    proj.weight.data = torch.zeros_like(weight)
    proj.weight.data[:, kept] = new_weight
    if new_bias is not None:
        proj.bias.data = new_bias
    new_outputs = []
    for x, output in zip(inputs, outputs, strict=True):
        new = torch.nn.functional.linear(x.index_select(-1, index), new_weight, new_bias)
        new_outputs.append((new, *output[1:]) if isinstance(output, tuple) else new)
    return new_outputs, errors


@torch.no_grad()
def toward_dense(layer: nn.Module, family: Family, batches: list, attention_out: list, outputs: list, alpha: float,
                 dense: list) -> list:
    """The MLP block's re-fit targets moved a fraction `alpha` of the way to the dense model's stream.

    `attention_out`: the re-fitted attention's outputs, replayed. The layer's output is r + T,
    r the residual stream the MLP adds to (computed by replaying zeros for the MLP), T the MLP block's
    output. Today's target T is the dense MLP on the pruned stream: it leaves the drift of the layers
    before in place (each layer is fitted on the stream they produce, so errors do not compound, but
    nothing takes them back). `dense − r` is the block output that would put the layer's output exactly
    on the dense model's stream; a linear re-fit of drifted inputs gets there only in part, and aiming
    all the way (α = 1) did worse than α = 0 on SmolLM2 (docs/RESULTS.md). Not for a family that
    normalises the MLP's output (`Family.post_mlp_norm`, refused by the pipeline): the MLP cannot set the
    size of its contribution there.
    """
    device = family.down_proj(layer).weight.device
    zeros = [torch.zeros_like(_first(output)) for output in outputs]
    with _replaced(layer, family.attention, _Replay(attention_out)), _replaced(layer, family.mlp, _Replay(zeros)):
        residual = [_first(layer(x.to(device), *args, **kwargs)) for x, args, kwargs, _ in batches]
    moved = []
    for output, r, target in zip(outputs, residual, dense, strict=True):
        block = _first(output)
        new = torch.lerp(block, target.to(device=device, dtype=block.dtype) - r, alpha)
        moved.append((new, *output[1:]) if isinstance(output, tuple) else new)
    return moved


OBS_STEPS = 32  # the obs scorer removes a layer's neurons in this many greedy steps (heads one at a time)


def fixed_units(keep: LayerPlan, head_dim: int) -> Choose:
    """Two-pass mode: the layer's units were chosen on the dense stream; re-fit on exactly those."""

    def choose(proj: nn.Linear, block: tuple, attention: bool, so_far: LayerPlan | None, stats) -> tuple:
        kept = unit_rows(keep.heads_kept, head_dim) if attention else keep.neurons_kept
        return keep, _equations(proj, kept, *block)

    return choose


@dataclass
class LayerChooser:
    """One-pass mode: chooses every layer's units during the re-fit, on the pruned model's stream.

    The plan's rule is per layer (the same counts everywhere, the lowest-scoring units of each layer),
    so layer i's units can be chosen as soon as its statistics are in. Here they come from the inputs
    the already pruned and re-fitted layers before it produce, recorded while the dense layer runs:
    heads after the attention block, neurons after the MLP block (whose input then already reflects
    the re-fitted attention). No separate pass over the dense model. The `obs` scorer reads the
    projection's normal equations instead: the re-fit's own error decides.
    """

    scorer: str
    dims: Dims
    budget: Budget
    generator: torch.Generator
    damping: float = DEFAULT_DAMPING

    def new_stats(self, device: torch.device) -> LayerStats | None:
        """The statistics this scorer reads, to be recorded on the pruned stream (None: it reads none)."""
        needs = SCORERS[self.scorer].needs
        if needs not in (Needs.AMP, Needs.MOMENTS):
            return None
        return LayerStats(self.dims, device, amp=needs is Needs.AMP, moments=needs is Needs.MOMENTS)

    def for_layer(self, family: Family, layer: nn.Module, index: int) -> Choose:
        """The `choose` step of `refit_layer` for decoder layer `index`."""

        def choose(proj: nn.Linear, block: tuple, attention: bool, so_far: LayerPlan | None,
                   stats: LayerStats | None) -> tuple[LayerPlan, NormalEquations]:
            system = None
            if SCORERS[self.scorer].needs is Needs.GRAM:
                system = _equations(proj, list(range(proj.in_features)), *block)
                scores = self._obs_scores(system, proj, attention)
                heads = scores if attention else torch.tensor(so_far.head_scores, dtype=torch.float64)
                neurons = torch.zeros(self.dims.intermediate_size, dtype=torch.float64) if attention else scores
            else:
                if stats is not None:
                    stats.all_reduce("attention" if attention else "mlp")
                heads, neurons = layer_scores([self.scorer], family, layer, index, self.dims, stats,
                                              self.generator)[self.scorer]
            chosen = select_units(heads[None], neurons[None], self.dims, self.budget)[0]
            if not attention:
                chosen = replace(so_far, neurons_kept=chosen.neurons_kept, neuron_scores=chosen.neuron_scores)
            kept = unit_rows(chosen.heads_kept, self.dims.head_dim) if attention else chosen.neurons_kept
            return chosen, _equations(proj, kept, *block) if system is None else system.restricted(kept)

        return choose

    def _obs_scores(self, system: NormalEquations, proj: nn.Linear, attention: bool) -> torch.Tensor:
        """Head or neuron scores of `scoring.obs_removal_scores` for this budget, from the damped system."""
        gram, _, weight = system.augmented(proj.weight, proj.bias)
        channels = proj.in_features
        gram, _ = damped(gram, channels, self.damping)
        score = partial(obs_removal_scores, gram, weight, fixed=gram.shape[0] - channels)
        group_size = self.dims.group_size
        if not attention:
            removals = self.budget.neurons_removed
            return score(1, removals, per_step=-(-removals // OBS_STEPS))
        if self.budget.gqa_mode == "group":  # whole KV groups: every head of a group gets its group's score
            groups = score(group_size * self.dims.head_dim, self.budget.kv_heads_removed)
            return groups.repeat_interleave(group_size)
        groups = torch.arange(self.dims.num_heads) // group_size  # the same number from every KV group
        return score(self.dims.head_dim, self.budget.heads_removed, groups=groups)


@torch.no_grad()
def refit_layer(
    family: Family,
    layer: nn.Module,
    index: int,
    dims: Dims,
    batches: list[tuple],
    choose: Choose,
    damping: float = DEFAULT_DAMPING,
    stats: LayerStats | None = None,
    toward: tuple[float, list] | None = None,
) -> tuple[LayerPlan, list[torch.Tensor], dict]:
    """Slice decoder layer `index` in place, re-fitting its o_proj and down_proj on the pruned stream.

    Args:
        batches: per calibration batch (hidden states on the pruned stream, layer args, layer kwargs,
            real-token mask); the hidden states may live on the host, they are moved batch by batch.
        choose: picks the units (`fixed_units`, or a `LayerChooser` in one-pass mode) and returns the
            normal equations of the projection's kept channels.
        stats: statistics the chooser reads, recorded on the way (one-pass mode).
        toward: (α, the dense model's outputs of this layer per batch): re-fit down_proj towards the blend
            `(1 − α) · its dense output on the pruned stream + α · what brings the layer's output back to
            the dense model's stream` (`toward_dense`); None: α = 0.

    Returns:
        The layer's plan, its outputs per batch (the next layer's pruned stream) and the relative
        calibration error of each projection after plain surgery and after the re-fit.
    """
    masks = [mask for *_, mask in batches]
    o_proj, down_proj = family.o_proj(layer), family.down_proj(layer)
    with recording(family, layer, stats) if stats is not None else nullcontext():
        # 1. attention: dense heads on the pruned stream; o_proj re-fitted on the kept heads
        inputs, outputs = _run_block(layer, family.attention_block(layer), o_proj, batches, stats)
        keep, eqs = choose(o_proj, (inputs, outputs, masks), True, None, stats)
        attention_out, attention_error = _refit_block(o_proj, eqs, inputs, outputs, damping,
                                                      f"layer {index} {family.o}")
        # 2. MLP: its input comes from the re-fitted attention (replayed, not recomputed)
        with _replaced(layer, family.attention, _Replay(attention_out)):
            inputs, outputs = _run_block(layer, family.mlp_block(layer), down_proj, batches, stats)
        if toward is not None:
            outputs = toward_dense(layer, family, batches, attention_out, outputs, *toward)
        keep, eqs = choose(down_proj, (inputs, outputs, masks), False, keep, stats)
        mlp_out, mlp_error = _refit_block(down_proj, eqs, inputs, outputs, damping, f"layer {index} {family.down}")
    del eqs, inputs, outputs
    # 3. the pruned layer's outputs (both blocks replayed) feed the next layer; then slice it
    with (_replaced(layer, family.attention, _Replay(attention_out)), _replaced(layer, family.mlp, _Replay(mlp_out))):
        hidden = [_first(layer(x.to(o_proj.weight.device), *args, **kwargs)) for x, args, kwargs, _ in batches]
    prune_layer(family, layer, dims, keep)
    return keep, hidden, {family.o: attention_error, family.down: mlp_error}
