"""The allocation search: the stock-valid allocation with the lowest held-out loss.

Two cheap passes of the layer engine before the real one:

1. The held-out samples (calibration windows that scoring and re-fitting never see) run through the
   dense model: every layer's angular distance between its input and its output decides which layers a
   candidate dropping k of them drops (`allocation.layers_to_drop`).
2. Every candidate (`allocation.allocations`) is pruned with the recipe itself — same scorer, same
   correction — in one pass over a slice of the calibration samples, each with its own pruned stream,
   and the held-out samples run through each candidate's pruned layers: its loss is their mean
   next-token negative log-likelihood (the pruned model's own held-out NLL, not a proxy of it).

The slice is the proxy: candidates are pruned on `search_samples` calibration samples instead of all of
them, which keeps the search within a few calibration passes (benchmarks/allocation.py checks its
ranking against full evaluations). The winner is then pruned on all the samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from . import distributed
from .allocation import Allocation, AngularDistance, allocations, budget, layers_to_drop
from .calibration import CalibrationSet
from .engine import LayerEngine, Run, Settings
from .errors import AmpruneError
from .plan import Budget, effective_mode
from .recipes import Recipe

logger = logging.getLogger(__name__)

MIN_HELDOUT_TOKENS = 2048  # fewer cannot tell candidates apart reliably (benchmarks/allocation.py)


@dataclass
class Candidate:
    allocation: Allocation
    budget: Budget
    loss: float | None = None  # held-out NLL
    error: str | None = None


@dataclass
class SearchResult:
    candidates: list[Candidate]
    distances: list[float]  # per layer, the angular distance the dropped layers were chosen by
    chosen: int  # index of the winner in `candidates`

    @property
    def budget(self) -> Budget:
        return self.candidates[self.chosen].budget

    @property
    def runner_up(self) -> Candidate | None:
        ranked = sorted((c for c in self.candidates if c.loss is not None), key=lambda c: c.loss)
        return ranked[1] if len(ranked) > 1 else None

    def to_dict(self, dims) -> dict:
        return {
            "criterion": "held-out next-token NLL",
            "layer_distances": [round(d, 6) for d in self.distances],
            "chosen": self.chosen,
            "candidates": [{"allocation": c.allocation.describe(dims), "layers_dropped": list(c.budget.layers_dropped),
                            "heads_removed": c.budget.heads_removed, "kv_heads_removed": c.budget.kv_heads_removed,
                            "neurons_removed": c.budget.neurons_removed,
                            "achieved_fraction": round(c.budget.achieved_fraction, 6), "loss": c.loss, "error": c.error}
                           for c in self.candidates],
        }


def check_heldout(calib: CalibrationSet) -> None:
    """Refuse a held-out slice too small to rank candidates."""
    tokens = sum(len(s) for s in calib.heldout)
    if tokens < MIN_HELDOUT_TOKENS:
        raise AmpruneError(f"the allocation search needs at least {MIN_HELDOUT_TOKENS} held-out calibration tokens "
                           f"to rank its candidates, got {tokens}; raise --heldout (or --seq-len), or use "
                           "--allocation uniform")
    if len(calib.heldout) < distributed.world_size():
        raise AmpruneError(f"the allocation search needs a held-out sample for each of the "
                           f"{distributed.world_size()} ranks, got {len(calib.heldout)}; raise --heldout")


def _heldout_batch(calib: CalibrationSet) -> torch.Tensor:
    """The held-out samples as one (B, T) batch, cut to the shortest (they are windows of one length)."""
    length = min(len(s) for s in calib.heldout)
    return torch.stack([s[:length] for s in calib.heldout])


def candidates(info, recipe: Recipe, gqa_mode: str, ratio: float) -> list[Allocation]:
    """Every allocation of `ratio` the recipe may choose from; `info` is the model's `pipeline.ModelInfo`."""
    family, config = info.family, info.config
    refusal = family.head_pruning_refusal and family.head_pruning_refusal(family.sizes_config(config))
    return allocations(info.dims, info.units, info.total_params, gqa_mode, ratio, family.accepted_head_counts(config),
                       recipe.round_to, recipe.max_dropped, prune_heads=not refusal)


def search(source, info, calib: CalibrationSet, recipe: Recipe, gqa_mode: str, ratio: float,
           settings: Settings) -> SearchResult:
    """Rank every allocation of `ratio` by held-out loss (see the module docstring); `info` is the model's
    `pipeline.ModelInfo`, `settings` the engine's settings for the passes (no writer, nothing kept)."""
    check_heldout(calib)
    dims = info.dims
    found = candidates(info, recipe, gqa_mode, ratio)
    settings = replace(settings, keep_layers=False, probe_loss=True)
    heldout = CalibrationSet(calib.heldout, calib.source, calib.seq_len, calib.seed)
    distances = AngularDistance(dims.num_layers)
    if any(a.layers for a in found):  # 1. which layers change the stream least
        LayerEngine(source, heldout, _heldout_batch(calib), [], replace(settings, observe=distances)).run()
    mode = effective_mode(dims, gqa_mode)
    ranked = [Candidate(a, budget(a, mode, info.total_params, ratio,
                                  layers_to_drop(distances.distances(), a.layers))) for a in found]
    # 2. every candidate pruned with the recipe on a slice, its held-out NLL measured on the way
    slice_ = replace(calib, samples=calib.samples[: recipe.search_samples], heldout=[])
    runs = [Run(recipe.scorer, c.budget, recipe.correction) for c in ranked]
    results, _ = LayerEngine(source, slice_, _heldout_batch(calib), runs,
                             replace(settings, isolate_failures=True)).run()
    for candidate, result in zip(ranked, results, strict=True):
        candidate.loss, candidate.error = result.probe_nll, result.error
    scored = [i for i in range(len(ranked)) if ranked[i].loss is not None]
    if not scored:
        raise AmpruneError(f"every candidate allocation failed, e.g.: {ranked[0].error}")
    chosen = min(scored, key=lambda i: ranked[i].loss)
    for candidate in sorted(ranked, key=lambda c: (c.loss is None, c.loss or 0)):
        logger.info("allocation %s: held-out NLL %s", candidate.allocation.describe(dims),
                    f"{candidate.loss:.4f}" if candidate.loss is not None else candidate.error)
    return SearchResult(ranked, distances.distances(), chosen)
