"""What hooks collect on one decoder layer, and the scores every scorer reads off it.

`LayerStats` sums, over the calibration tokens one layer sees, what the scorers need: AMP's per-sample
token means of each head's contribution and each neuron's |activation| (`amp`), and per-channel input
moments of o_proj and down_proj (`moments`: Wanda-sp, FLAP and bias compensation). Everything is a sum
over samples or tokens in float64 on the device, so ranks all-reduce it (`amprune.distributed`).
`layer_scores` turns one layer's weights and statistics into every named scorer's (H,) and (I,) scores.
Taylor is the exception: it needs the whole model's gradients (`collect_gradients`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from . import distributed
from .errors import AmpruneError
from .models.base import Dims, Family
from .scoring import SCORERS, LayerTensors, Needs, head_contribution_norms


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) → (N, C): the rows of real tokens only (all rows if `mask` is None); padding never counts."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool().to(x.device)]


class Moments:
    """Running per-channel sum and sum of squares of one projection's input over real tokens."""

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(channels, dtype=torch.float64, device=device)
        self.squares = torch.zeros(channels, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()  # (T, C)
        self.sums += rows.sum(dim=0)
        self.squares += rows.pow(2).sum(dim=0)
        self.tokens += rows.shape[0]

    def mean_and_square(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) token-mean of x_j and of x_j², float32 on the CPU."""
        count = self.tokens.clamp(min=1)
        return (self.sums / count).float().cpu(), (self.squares / count).float().cpu()


class LayerStats:
    """One decoder layer's calibration statistics, fed by forward pre-hooks (`recording`).

    AMP scores are per-sample token means (padding excluded), summed in float64 and averaged over the
    samples at the end, so every sample weighs the same whatever its length (as in the paper's code).
    The runner sets `mask`, the (B, T) real-token mask of the batch it is about to run.
    """

    def __init__(self, dims: Dims, device: torch.device | str = "cpu", amp: bool = True, moments: bool = False):
        self.dims = dims
        self.head_sums = torch.zeros(dims.num_heads, dtype=torch.float64, device=device) if amp else None
        self.neuron_sums = torch.zeros(dims.intermediate_size, dtype=torch.float64, device=device) if amp else None
        self.samples = torch.zeros((), dtype=torch.float64, device=device)
        self.o_moments = Moments(dims.num_heads * dims.head_dim, device) if moments else None
        self.down_moments = Moments(dims.intermediate_size, device) if moments else None
        self.mask: torch.Tensor | None = None

    def _sample_means(self, values: torch.Tensor) -> torch.Tensor:
        """(B, T, C) per-token values → (B, C) token-means over each sample's real tokens (scales `values`)."""
        if self.mask is None:
            return values.mean(dim=1)
        weights = self.mask.to(values.device, values.dtype).unsqueeze(-1)  # (B, T, 1): 1 real, 0 padding
        return values.mul_(weights).sum(dim=1) / weights.sum(dim=1)

    def record_heads(self, o_input: torch.Tensor, o_weight: torch.Tensor) -> None:
        batch, tokens, _ = o_input.shape
        self.samples += batch  # o_proj runs once per batch in every family
        if self.head_sums is not None:  # the whole batch at once, padding excluded from the means
            norms = head_contribution_norms(o_input.reshape(batch * tokens, -1), o_weight, self.dims.num_heads)
            self.head_sums += self._sample_means(norms.view(batch, tokens, -1)).sum(dim=0).double()
        if self.o_moments is not None:
            self.o_moments.add(real_tokens(o_input, self.mask))

    def record_neurons(self, down_input: torch.Tensor) -> None:
        # Eq. 9: |act(x W_gate) · (x W_up)| is exactly |input of down_proj| (|act(x W_fc1)| for a plain MLP)
        if self.neuron_sums is not None:
            self.neuron_sums += self._sample_means(down_input.float().abs()).sum(dim=0).double()
        if self.down_moments is not None:
            self.down_moments.add(real_tokens(down_input, self.mask))

    def all_reduce(self, part: str = "all") -> None:
        """Sum the statistics over the ranks (nothing in one process): all of them, or those of the
        "attention" block (o_proj input) or the "mlp" block (down_proj input) alone."""
        tensors = []
        if part in ("all", "attention"):
            tensors += [self.samples, self.head_sums, *_moment_tensors(self.o_moments)]
        if part in ("all", "mlp"):
            tensors += [self.neuron_sums, *_moment_tensors(self.down_moments)]
        distributed.sum_(*(t for t in tensors if t is not None))

    def amp_scores(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(H,) head and (I,) neuron AMP scores, averaged over samples, float64 on the CPU."""
        if self.samples.item() == 0:
            raise AmpruneError("no calibration samples were run")
        heads = (self.head_sums / self.samples).cpu()
        neurons = (self.neuron_sums / self.samples).cpu()
        if not (torch.isfinite(heads).all() and torch.isfinite(neurons).all()):
            raise AmpruneError(
                f"non-finite activations in decoder layer {index} during calibration; "
                "run in float32 (--dtype float32) or check the model weights"
            )
        return heads, neurons


def _moment_tensors(moments: Moments | None) -> list[torch.Tensor]:
    return [] if moments is None else [moments.sums, moments.squares, moments.tokens]


@contextmanager
def recording(family: Family, layer: torch.nn.Module, stats: LayerStats) -> Iterator[LayerStats]:
    """Forward pre-hooks on `layer`'s o_proj and down_proj inputs feeding `stats`; always removed on exit."""
    handles = [
        family.o_proj(layer).register_forward_pre_hook(lambda mod, args: stats.record_heads(args[0], mod.weight)),
        family.down_proj(layer).register_forward_pre_hook(lambda mod, args: stats.record_neurons(args[0])),
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def collect_gradients(model: torch.nn.Module, family: Family, batches: list, device: torch.device,
                      progress: bool = True) -> None:
    """Sum the language-modelling loss gradients of the calibration batches into the decoder's `.grad`.

    One forward and one backward pass per batch with gradients (and activations kept for backward) for
    every decoder weight: several times the memory of a forward pass, the whole model at once. Only
    Taylor scores need it; ranks sum their gradients.
    """
    decoder_params = {id(p) for p in family.decoder_layers(model).parameters()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in decoder_params)
        for ids, mask in tqdm(batches, desc="Gradients", unit="batch", disable=not progress):
            ids, mask = ids.to(device), mask.to(device)
            labels = ids.masked_fill(mask == 0, -100)  # padding is no target
            model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        distributed.sum_(*(p.grad for p in family.decoder_layers(model).parameters() if p.grad is not None))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])


def _unit_weights(family: Family, layer: torch.nn.Module, dims: Dims, grads: bool):
    """(head_in, o_proj, neuron_in, down_proj) weights of one layer, or their gradients; fused ones split."""

    def get(linear: torch.nn.Linear) -> torch.Tensor:
        return linear.weight.grad if grads else linear.weight.detach()

    attn, mlp = family.attention_block(layer), family.mlp_block(layer)
    if family.qkv:  # rows [q (H·d) | k | v]
        head_in = [get(getattr(attn, family.qkv))[: dims.num_heads * dims.head_dim]]
    else:
        head_in = [get(getattr(attn, family.q))]
    if family.gate_up:  # rows [gate (I) | up (I)]
        fused = get(getattr(mlp, family.gate_up))
        neuron_in = [fused[: dims.intermediate_size], fused[dims.intermediate_size :]]
    else:
        neuron_in = [get(getattr(mlp, name)) for name in (family.gate, family.up) if name]
    return head_in, get(family.o_proj(layer)), neuron_in, get(family.down_proj(layer))


def usable_scorers(one_pass: bool = False) -> list[str]:
    """The scorers a mode can run. `one_pass`: scored inside the re-fit on the pruned stream, which has no
    whole-model gradients; only that stream has the normal equations `obs` reads."""
    excluded = Needs.GRADIENTS if one_pass else Needs.GRAM
    return [name for name, scorer in SCORERS.items() if scorer.needs is not excluded]


def check_scorers(scorers: list[str], one_pass: bool = False) -> None:
    """Fail with the list of choices if a scorer name is unknown, or if it cannot run in this mode."""
    usable = usable_scorers(one_pass)
    unknown = [name for name in scorers if name not in SCORERS]
    if unknown:
        raise AmpruneError(f"unknown scorer '{unknown[0]}'; choose from: {', '.join(usable)}")
    for name in (name for name in scorers if name not in usable):
        if one_pass:
            raise AmpruneError(f"--correction refit-one-pass cannot use --scorer {name}: it needs the whole "
                               "model's gradients")
        raise AmpruneError(f"the {name} scorer ranks units by the re-fit's own error, on the pruned model's "
                           "stream: it runs only with --correction refit-one-pass")


def needs_of(scorers: list[str]) -> set[Needs]:
    return {SCORERS[name].needs for name in scorers}


def layer_scores(
    scorers: list[str],
    family: Family,
    layer: torch.nn.Module,
    index: int,
    dims: Dims,
    stats: LayerStats | None,
    generator: torch.Generator,
    gradients: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(H,) head and (I,) neuron scores of decoder layer `index` for every named scorer, float64 on the CPU.

    Reads the layer's weights, its statistics (None if no scorer needs any) and, with `gradients`, the
    weights' `.grad`.
    """
    head_in, o_weight, neuron_in, down_weight = _unit_weights(family, layer, dims, grads=False)
    t = LayerTensors(dims.head_dim, head_in, o_weight, neuron_in, down_weight, generator=generator)
    if stats is not None:
        if stats.head_sums is not None:
            t.amp = stats.amp_scores(index)
        if stats.o_moments is not None:
            t.o_moments = stats.o_moments.mean_and_square()
            t.down_moments = stats.down_moments.mean_and_square()
    if gradients:
        t.head_in_grads, t.o_grad, t.neuron_in_grads, t.down_grad = _unit_weights(family, layer, dims, grads=True)
    scores = {}
    for name in scorers:
        heads, neurons = SCORERS[name].layer_scores(t)
        if not (torch.isfinite(heads).all() and torch.isfinite(neurons).all()):
            raise AmpruneError(f"non-finite {name} scores in decoder layer {index}; run in float32 (--dtype float32)")
        scores[name] = (heads.detach().double().cpu(), neurons.detach().double().cpu())
    return scores
