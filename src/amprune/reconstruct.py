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
  subset of X and everything follows from the Gram matrix G = XᵀX alone: the solution is
  W'_k = W_k + W_r G_rk (G_kk + λI)⁻¹ (r: removed channels). No second (dense) activation stream,
  no cross-term, no extra dense forward per layer;
- plain surgery's weights W_k are a feasible point and the damping pulls towards them, so on the
  calibration tokens the re-fit is never worse than surgery, and with nothing removed it returns W_k
  exactly (both are tested);
- errors cannot compound anyway: every layer is fitted on the inputs the pruned layers before it
  produce, as GPTQ does. Chasing the upstream drift as well (the dense-stream target) would need both
  streams in memory and loses the guarantee above.

A projection with a bias (Phi) gets an intercept: the constant channel 1 is treated as one more kept
input, so the bias absorbs the removed channels' mean contribution (FLAP's bias compensation, fitted).

**Sequential mode.** Layer inputs and every layer's call arguments (masks, position embeddings, …)
are captured once by running the embedding with recorders in place of the decoder layers. Then, per
layer: (1) the dense layer runs up to `o_proj` and its input Gram is accumulated; `o_proj` is
re-fitted and its removed columns zeroed; (2) the layer runs again up to `down_proj`, whose Gram now
reflects the re-fitted attention; `down_proj` is re-fitted; (3) the layer is sliced with
`surgery.prune_layer` and run once more to produce the next layer's inputs. Memory: the hidden
states of the calibration tokens plus one n × n Gram matrix at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationSet, batches
from .models.base import Family
from .plan import Plan
from .surgery import _rows, prune_layer, update_config

logger = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.01  # λ as a fraction of the mean diagonal of the kept channels' Gram matrix
MAX_CONDITION = 1e12  # beyond this a float64 solve has lost too many digits to be trusted


class IllConditionedError(ValueError):
    """The damped normal equations are singular or too ill-conditioned to solve."""


class _Stop(Exception):
    """Raised by a hook to end a layer's forward pass once the statistics it needs are in."""


@dataclass
class Gram:
    """Running XᵀX, Σx and token count of one projection's input (real tokens only), in float64."""

    xtx: torch.Tensor  # (n, n)
    sums: torch.Tensor  # (n,)
    count: int = 0

    @classmethod
    def zeros(cls, channels: int, device: torch.device | str = "cpu") -> Gram:
        return cls(torch.zeros(channels, channels, dtype=torch.float64, device=device),
                   torch.zeros(channels, dtype=torch.float64, device=device))

    def add(self, rows: torch.Tensor) -> None:
        """Add (T, n) input rows; the product runs in float32, the running sums are float64."""
        rows = rows.float()
        self.xtx += (rows.T @ rows).double()
        self.sums += rows.sum(dim=0).double()
        self.count += rows.shape[0]


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None, gram: Gram) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (out, n[+1]) weight and (n[+1], n[+1]) Gram; a bias becomes the weight of a constant input 1."""
    if bias is None:
        return weight.double(), gram.xtx
    count = torch.tensor([[float(gram.count)]], dtype=torch.float64, device=gram.xtx.device)
    xtx = torch.cat([torch.cat([gram.xtx, gram.sums[:, None]], 1), torch.cat([gram.sums[None, :], count], 1)], 0)
    return torch.cat([weight.double(), bias.double()[:, None]], 1), xtx


def refit(
    weight: torch.Tensor, bias: torch.Tensor | None, gram: Gram, kept: list[int], damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares re-fit of a projection's kept input columns (and bias), in float64.

    Args:
        weight: (out, n) the dense projection's weight; bias: (out,) or None.
        gram: statistics of the projection's n input channels on the calibration tokens.
        kept: the input channels that stay.
        damping: λ / mean(diag G_kk); the fit is pulled towards the plain-surgery weights by λ.

    Returns:
        (out, k) new kept columns and the new bias (None if there is none), in the weight's dtype.

    Raises:
        IllConditionedError: the damped system is singular or its condition number exceeds MAX_CONDITION.
    """
    n, k = weight.shape[1], len(kept)
    removed = sorted(set(range(n)) - set(kept))
    if not removed:
        return weight[:, kept].clone(), None if bias is None else bias.clone()
    w, g = _augmented(weight, bias, gram)
    k_idx = torch.tensor(kept + ([n] if bias is not None else []), device=g.device)
    r_idx = torch.tensor(removed, device=g.device)
    g_kk = g[k_idx][:, k_idx]  # (k[+1], k[+1])
    g_kr = g[k_idx][:, r_idx]  # (k[+1], r)
    scale = g_kk.diagonal()[:k].mean()
    if not (torch.isfinite(g_kk).all() and torch.isfinite(g_kr).all()) or scale <= 0:
        raise IllConditionedError("the kept input channels are all zero or not finite on the calibration tokens")
    system = g_kk + damping * scale * torch.eye(len(k_idx), dtype=torch.float64, device=g.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        raise IllConditionedError("the normal equations are singular")
    diag = factor.diagonal()
    condition = (diag.max() / diag.min()).item() ** 2  # cheap estimate from the Cholesky factor
    if condition > MAX_CONDITION:
        raise IllConditionedError(f"the normal equations are ill-conditioned (condition ≈ {condition:.1e})")
    # W'_k = W_k + W_r G_rk (G_kk + λI)⁻¹, solved as (G_kk + λI) Δᵀ = G_kr W_rᵀ
    delta = torch.cholesky_solve(g_kr @ w[:, r_idx].T, factor).T  # (out, k[+1])
    new = (w[:, k_idx] + delta).to(weight.dtype)
    return new[:, :k].contiguous(), None if bias is None else new[:, k].contiguous()


def calibration_error(
    weight: torch.Tensor, bias: torch.Tensor | None, new_weight: torch.Tensor, new_bias: torch.Tensor | None,
    kept: list[int], gram: Gram,
) -> float:
    """‖X_k W'ᵀ + b' − (X Wᵀ + b)‖² / ‖X Wᵀ + b‖² over the calibration tokens, from the Gram matrix."""
    w, g = _augmented(weight, bias, gram)
    pruned = torch.zeros_like(weight)
    pruned[:, kept] = new_weight
    p, _ = _augmented(pruned, new_bias, gram)
    diff = p - w
    energy = torch.einsum("oi,ij,oj->", w, g, w)
    return (torch.einsum("oi,ij,oj->", diff, g, diff) / energy.clamp_min(1e-300)).item()


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


def _real_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, n) → (real tokens, n); padding never counts."""
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool().to(x.device)]


def _gram_of_input(layer: nn.Module, proj: nn.Linear, calls: list, hidden: list, masks: list) -> Gram:
    """Run `layer` on every batch up to `proj` and accumulate the Gram matrix of `proj`'s input."""
    gram = Gram.zeros(proj.in_features, proj.weight.device)
    current: dict[str, torch.Tensor] = {}

    def grab(module, args):
        gram.add(_real_rows(args[0], current["mask"]))
        raise _Stop

    handle = proj.register_forward_pre_hook(grab)
    try:
        for x, (_, args, kwargs), mask in zip(hidden, calls, masks, strict=True):
            current["mask"] = mask
            try:
                layer(x, *args, **kwargs)
            except _Stop:
                continue
            raise RuntimeError(f"the layer never called {type(proj).__name__} during reconstruction")
    finally:
        handle.remove()
    return gram


def _refit_projection(proj: nn.Linear, kept: list[int], gram: Gram, damping: float, where: str) -> dict:
    """Re-fit `proj` in place (removed columns zeroed, so the layer now computes the pruned output)."""
    weight = proj.weight.data
    try:
        new_weight, new_bias = refit(weight, proj.bias.data if proj.bias is not None else None, gram, kept, damping)
    except IllConditionedError as err:
        logger.warning("reconstruction of %s skipped, plain surgery weights kept: %s", where, err)
        new_weight, new_bias = weight[:, kept], None
    bias = None if proj.bias is None else proj.bias.data
    errors = {
        "surgery": calibration_error(weight, bias, weight[:, kept], bias, kept, gram),
        "refit": calibration_error(weight, bias, new_weight, bias if new_bias is None else new_bias, kept, gram),
    }
    proj.weight.data = torch.zeros_like(weight)
    proj.weight.data[:, kept] = new_weight
    if new_bias is not None:
        proj.bias.data = new_bias
    return errors


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
        o_proj, down_proj = family.o_proj(layer), family.down_proj(layer)
        gram = _gram_of_input(layer, o_proj, calls[index], hidden, masks)
        attention = _refit_projection(o_proj, _rows(keep.heads_kept, d), gram, damping, f"layer {index} {family.o}")
        gram = _gram_of_input(layer, down_proj, calls[index], hidden, masks)
        mlp = _refit_projection(down_proj, keep.neurons_kept, gram, damping, f"layer {index} {family.down}")
        del gram
        prune_layer(family, layer, plan.dims, keep)
        outputs = [layer(x, *args, **kwargs) for x, (_, args, kwargs) in zip(hidden, calls[index], strict=True)]
        hidden = [out[0] if isinstance(out, tuple) else out for out in outputs]
        report.append({"layer": index, family.o: attention, family.down: mlp})
        logger.debug("layer %d relative calibration error: %s", index, report[-1])
    update_config(family.sizes_config(model.config), plan.dims_after)
    return {"mode": "sequential", "damping": damping, "relative_calibration_error": report}
