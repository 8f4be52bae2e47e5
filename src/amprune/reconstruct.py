"""Reconstruction: surgery layer by layer, re-fitting every o_proj and down_proj in closed form.

After a layer loses heads and neurons, its output projections still weigh the kept input channels as
if the removed ones were there. Reconstruction re-fits the kept columns of `o_proj` and `down_proj`
(`dense`/`fc2` in Phi) by least squares so the projection's output on the calibration tokens matches
what the dense projection computed. No training: one Gram matrix per projection, one linear solve.

**Target.** For a projection with input X (tokens × n channels, the dense layer's channels) and
weight W (out × n), the target is the *dense* projection applied to the *same* input, T = X Wᵀ, and
the pruned projection sees the kept channels X_k: minimise ‖X_k W'ᵀ − X Wᵀ‖² + λ‖W' − W_k‖².
The input X is what the layer actually receives in the pruned model (sequential mode, below), and the
MLP's X is computed with the already re-fitted attention. Why this target rather than the dense
model's own outputs on its own (dense-stream) inputs:

- the kept heads/neurons compute exactly what they compute in the dense layer, so X_k is a column
  subset of X and everything follows from the kept rows of the Gram matrix G = XᵀX: the solution is
  W'_k = W_k + W_r G_rk (G_kk + λI)⁻¹ (r: removed channels). No second (dense) activation stream,
  no cross-term, no extra dense forward per layer;
- plain surgery's weights W_k are a feasible point and the damping pulls towards them, so on the
  calibration tokens the re-fit is never worse than surgery, and with nothing removed it returns W_k
  exactly (both are tested);
- upstream errors are already accounted for: every layer is fitted on the inputs the pruned layers
  before it produce (as GPTQ does), so they do not compound. Making each layer also cancel the drift of
  the residual stream (the dense-stream target) would need both streams in memory and an extra dense
  forward per layer, and loses the guarantee above.

A projection with a bias (Phi) gets an intercept: the constant channel 1 is treated as one more kept
input, so the bias absorbs the removed channels' mean contribution (FLAP's bias compensation, fitted).

**Sequential mode.** Layer inputs and every layer's call arguments (masks, position embeddings, …)
are captured once by running the embedding with recorders in place of the decoder layers. Then, per
layer, on the pruned model's hidden states: (1) the dense layer runs until its attention block returns,
accumulating the Gram matrix of `o_proj`'s input; `o_proj` is re-fitted and the attention outputs are
recomputed from the stored `o_proj` inputs; (2) the layer runs again with the attention block replaced
by a replay of those outputs, until its MLP block returns; `down_proj` is re-fitted the same way; (3) the
layer runs once more with both blocks replayed (only norms and residual adds are computed) to give the
next layer's inputs, and is sliced with `surgery.prune_layer`. Every block is computed once, so the cost
is about one dense forward plus the Gram products. This relies on each block returning its output
projection's output (checked, by identity, on every call). Memory: the calibration tokens' hidden
states and one block's inputs/outputs, plus one k × n Gram matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationSet, batches, real_tokens
from .models.base import Family
from .plan import Plan
from .surgery import prune_layer, unit_rows, update_config

logger = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.01  # λ as a fraction of the mean diagonal of the kept channels' Gram matrix
MAX_CONDITION = 1e12  # beyond this a float64 solve has lost too many digits to be trusted


class IllConditionedError(ValueError):
    """The damped normal equations are singular or too ill-conditioned to solve."""


class _Stop(Exception):
    """Raised by a hook to end a layer's forward pass once the statistics it needs are in."""


@dataclass
class Gram:
    """Running X_kᵀX (the kept channels' rows), Σx and token count of one projection's input, in float64."""

    kept: list[int]
    xtx: torch.Tensor  # (k, n)
    sums: torch.Tensor  # (n,)
    count: int = 0

    @classmethod
    def zeros(cls, kept: list[int], channels: int, device: torch.device | str = "cpu") -> Gram:
        return cls(list(kept), torch.zeros(len(kept), channels, dtype=torch.float64, device=device),
                   torch.zeros(channels, dtype=torch.float64, device=device))

    def add(self, rows: torch.Tensor) -> None:
        """Add (T, n) input rows; the product runs in float32, the running sums are float64."""
        rows = rows.float()
        index = torch.tensor(self.kept, device=rows.device)
        self.xtx += (rows.index_select(1, index).T @ rows).double()
        self.sums += rows.sum(dim=0).double()
        self.count += rows.shape[0]


def refit(
    weight: torch.Tensor, bias: torch.Tensor | None, gram: Gram, damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares re-fit of a projection's kept input columns `gram.kept` (and bias), in float64.

    Args:
        weight: (out, n) the dense projection's weight; bias: (out,) or None.
        gram: statistics of the projection's input on the calibration tokens.
        damping: λ / mean(diag G_kk); the fit is pulled towards the plain-surgery weights by λ.

    Returns:
        (out, k) new kept columns and the new bias (None if there is none), in the weight's dtype.

    Raises:
        IllConditionedError: the damped system is singular or its condition number exceeds MAX_CONDITION.
    """
    n, kept = weight.shape[1], gram.kept
    removed = sorted(set(range(n)) - set(kept))
    if not removed:
        return weight[:, kept].clone(), None if bias is None else bias.clone()
    device = gram.xtx.device
    k_idx, r_idx = torch.tensor(kept, device=device), torch.tensor(removed, device=device)
    g_kk, g_kr = gram.xtx[:, k_idx], gram.xtx[:, r_idx]  # (k, k), (k, r)
    w = weight.double()
    w_k = w[:, k_idx]
    if bias is not None:  # the constant input 1 is one more kept channel; its weight is the bias
        s_k, s_r = gram.sums[k_idx], gram.sums[r_idx]
        count = torch.tensor([[float(gram.count)]], dtype=torch.float64, device=device)
        g_kk = torch.cat([torch.cat([g_kk, s_k[:, None]], 1), torch.cat([s_k[None, :], count], 1)], 0)
        g_kr = torch.cat([g_kr, s_r[None, :]], 0)
        w_k = torch.cat([w_k, bias.double()[:, None]], 1)
    k = len(kept)
    scale = g_kk.diagonal()[:k].mean()
    if not (torch.isfinite(g_kk).all() and torch.isfinite(g_kr).all()) or scale <= 0:
        raise IllConditionedError("the kept input channels are all zero or not finite on the calibration tokens")
    system = g_kk + damping * scale * torch.eye(g_kk.shape[0], dtype=torch.float64, device=device)
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        raise IllConditionedError("the normal equations are singular")
    diag = factor.diagonal()
    condition = (diag.max() / diag.min()).item() ** 2  # cheap estimate from the Cholesky factor
    if condition > MAX_CONDITION:
        raise IllConditionedError(f"the normal equations are ill-conditioned (condition ≈ {condition:.1e})")
    # W'_k = W_k + W_r G_rk (G_kk + λI)⁻¹, solved as (G_kk + λI) Δᵀ = G_kr W_rᵀ
    delta = torch.cholesky_solve(g_kr @ w[:, r_idx].T, factor).T  # (out, k[+1])
    new = (w_k + delta).to(weight.dtype)
    return new[:, :k].contiguous(), None if bias is None else new[:, k].contiguous()


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call arguments and passes the hidden states on."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((hidden, args[1:], kwargs))
        return hidden


def capture_layer_inputs(model: nn.Module, family: Family, todo: list) -> list[list[tuple]]:
    """For every batch, the first layer's hidden states and every layer's other arguments.

    Returns calls[layer][batch] = (hidden, args, kwargs); only layer 0's `hidden` is the real input.
    The decoder layers are swapped for recorders during one embedding-only pass, then put back: the
    arguments (masks differ per layer type in some families) are captured whatever they are.
    """
    layers = family.decoder_layers(model)
    originals = list(layers)
    calls: list[list[tuple]] = [[] for _ in originals]
    device = next(model.parameters()).device
    try:
        for index in range(len(originals)):
            layers[index] = _Recorder(calls[index])
        for ids, mask in todo:
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return calls


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


def _run_block(layer: nn.Module, block: nn.Module, proj: nn.Linear, kept: list[int], runs: list) -> tuple:
    """Run `layer` on every batch until `block` returns; `proj` must produce the block's output.

    Returns the Gram matrix of `proj`'s input, and per batch `proj`'s input and the block's output.
    """
    gram = Gram.zeros(kept, proj.in_features, proj.weight.device)
    inputs, outputs, current = [], [], {}

    def before_proj(module, args):
        gram.add(real_tokens(args[0], current["mask"]))
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
        for x, (_, args, kwargs), mask in runs:
            current["mask"] = mask
            try:
                layer(x, *args, **kwargs)
            except _Stop:
                continue
            raise RuntimeError(f"the layer never returned from {type(block).__name__} during reconstruction")
    finally:
        for handle in handles:
            handle.remove()
    return gram, inputs, outputs


def _refit_block(proj: nn.Linear, gram: Gram, inputs: list, outputs: list, masks: list, damping: float,
                 where: str) -> tuple[list, dict]:
    """Re-fit `proj` in place (removed input columns zeroed: the layer now computes the pruned output).

    Returns the block's new outputs per batch and the relative error of plain surgery and of the re-fit
    against the dense outputs, over the real calibration tokens.
    """
    weight, bias, kept = proj.weight.data, None if proj.bias is None else proj.bias.data, gram.kept
    try:
        new_weight, new_bias = refit(weight, bias, gram, damping)
    except IllConditionedError as err:
        logger.warning("reconstruction of %s skipped, plain surgery weights kept: %s", where, err)
        new_weight, new_bias = weight[:, kept], bias
    removed = torch.tensor(sorted(set(range(weight.shape[1])) - set(kept)), dtype=torch.long, device=weight.device)
    dropped = weight.index_select(1, removed)  # (out, r): what plain surgery loses
    proj.weight.data = torch.zeros_like(weight)
    proj.weight.data[:, kept] = new_weight
    if new_bias is not None:
        proj.bias.data = new_bias
    sums = torch.zeros(3, dtype=torch.float64)  # ‖dense‖², ‖surgery − dense‖², ‖re-fit − dense‖²
    new_outputs = []
    for x, output, mask in zip(inputs, outputs, masks, strict=True):
        dense, new = _first(output), proj(x)
        surgery_error = x.index_select(-1, removed) @ dropped.T
        for i, part in enumerate((dense, surgery_error, new - dense)):
            sums[i] += real_tokens(part, mask).double().pow(2).sum().cpu()
        new_outputs.append((new, *output[1:]) if isinstance(output, tuple) else new)
    energy = sums[0].clamp_min(1e-300)
    return new_outputs, {"surgery": (sums[1] / energy).item(), "refit": (sums[2] / energy).item()}


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    family: Family,
    plan: Plan,
    calib: CalibrationSet,
    batch_size: int = 8,
    pad_id: int = 0,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
) -> dict:
    """Apply `plan` to `model` layer by layer, re-fitting o_proj and down_proj on the way (in place).

    The result has exactly the shapes plain `surgery.apply_plan` gives. Returns the settings and, per
    layer, the relative calibration error of each projection after plain surgery and after the re-fit
    (recorded in the plan).
    """
    todo = list(batches(calib.samples, batch_size, pad_id))
    masks = [mask for _, mask in todo]
    calls = capture_layer_inputs(model, family, todo)
    hidden = [x for x, _, _ in calls[0]]  # (B, T, D) per batch: the pruned model's stream
    d = plan.dims.head_dim
    report = []
    layers = list(zip(family.decoder_layers(model), plan.layers, strict=True))
    for index, (layer, keep) in enumerate(tqdm(layers, desc="Reconstructing", unit="layer", disable=not progress)):
        runs = list(zip(hidden, calls[index], masks, strict=True))
        attention, mlp = family.attention_block(layer), family.mlp_block(layer)
        o_proj, down_proj = family.o_proj(layer), family.down_proj(layer)
        # 1. attention: dense heads on the pruned stream; o_proj re-fitted on the kept heads
        gram, inputs, outputs = _run_block(layer, attention, o_proj, unit_rows(keep.heads_kept, d), runs)
        attention_out, attention_error = _refit_block(o_proj, gram, inputs, outputs, masks, damping,
                                                      f"layer {index} {family.o}")
        # 2. MLP: its input comes from the re-fitted attention (replayed, not recomputed)
        with _replaced(layer, family.attention, _Replay(attention_out)):
            gram, inputs, outputs = _run_block(layer, mlp, down_proj, keep.neurons_kept, runs)
        mlp_out, mlp_error = _refit_block(down_proj, gram, inputs, outputs, masks, damping,
                                          f"layer {index} {family.down}")
        del gram, inputs, outputs
        # 3. the pruned layer's outputs (both blocks replayed) feed the next layer; then slice it
        with _replaced(layer, family.attention, _Replay(attention_out)), _replaced(layer, family.mlp, _Replay(mlp_out)):
            hidden = [_first(layer(x, *args, **kwargs)) for x, (_, args, kwargs), _ in runs]
        prune_layer(family, layer, plan.dims, keep)
        report.append({"layer": index, family.o: attention_error, family.down: mlp_error})
        logger.debug("layer %d relative calibration error: %s", index, report[-1])
    update_config(family.sizes_config(model.config), plan.dims_after)
    return {"mode": "sequential", "damping": damping, "relative_calibration_error": report}
