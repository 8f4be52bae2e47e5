"""The allocation search: the stock-valid allocation with the lowest held-out loss.

Cheap passes of the layer engine before the real one:

1. The held-out samples (calibration windows that scoring and re-fitting never see) run through the
   dense model: every layer's angular distance between its input and its output decides which layers a
   candidate dropping k of them drops (`allocation.layers_to_drop`).
2. Candidates (`allocation.allocations`) are pruned with the recipe itself — same scorer, same
   correction — in one pass over a slice of the calibration samples, each with its own pruned stream,
   and the held-out samples run through each candidate's pruned layers: its loss is their mean
   next-token negative log-likelihood (the pruned model's own held-out NLL, not a proxy of it).
   Every candidate, where a number of dropped layers has at most `COARSE` head counts (the packaged
   models: 3); else `COARSE` of them evenly spread, both ends included (a 32-head model has 31).
3. Only then: the head counts between the best one's grid neighbours, in one more pass. The search's
   cost grows with the candidates it prunes (LLaMA-2-7B at 30 %: 24 + at most 7 instead of 87).

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
COARSE = 8  # head counts per number of dropped layers the first search pass prunes, at most


@dataclass
class Candidate:
    allocation: Allocation
    budget: Budget
    loss: float | None = None  # held-out NLL
    error: str | None = None
    stage: str = "skipped"  # coarse | refine: the pass that pruned it; skipped: outside both


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
                            "achieved_fraction": round(c.budget.achieved_fraction, 6), "loss": c.loss, "error": c.error,
                            "stage": c.stage}
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
    # 2. candidates pruned with the recipe on a slice, their held-out NLL measured on the way: a grid
    #    first, then (3.) the head counts around its best
    slice_ = replace(calib, samples=calib.samples[: recipe.search_samples], heldout=[])

    def prune_on_slice(indices: list[int], stage: str) -> int:
        runs = [Run(recipe.scorer, ranked[i].budget, recipe.correction) for i in indices]
        results, _ = LayerEngine(source, slice_, _heldout_batch(calib), runs,
                                 replace(settings, isolate_failures=True)).run()
        for i, result in zip(indices, results, strict=True):
            ranked[i].loss, ranked[i].error, ranked[i].stage = result.probe_nll, result.error, stage
        scored = [i for i in range(len(ranked)) if ranked[i].loss is not None]
        if not scored:
            raise AmpruneError(f"every candidate allocation failed, e.g.: {ranked[indices[0]].error}")
        return min(scored, key=lambda i: ranked[i].loss)

    grid = coarse_grid(found)
    logger.info("allocation search: %d stock-valid allocations, %d of them pruned first%s", len(found), len(grid),
                "" if len(grid) == len(found) else " (a grid of head counts; then the ones around its best)")
    chosen = prune_on_slice(grid, "coarse")
    around = refinement(found, grid, chosen)
    if around:
        chosen = prune_on_slice(around, "refine")
    for candidate in sorted(ranked, key=lambda c: (c.loss is None, c.loss or 0)):
        if candidate.stage != "skipped":
            logger.info("allocation %s: held-out NLL %s", candidate.allocation.describe(dims),
                        f"{candidate.loss:.4f}" if candidate.loss is not None else candidate.error)
    return SearchResult(ranked, distances.distances(), chosen)


def coarse_grid(found: list[Allocation], size: int | None = None) -> list[int]:
    """Indices of the candidates the first pass prunes: for each number of dropped layers, every head count
    when there are at most `size` (default `COARSE`), else `size` of them evenly spread, both ends included."""
    size = size or COARSE
    grid = []
    for layers in sorted({a.layers for a in found}):
        group = [i for i, a in enumerate(found) if a.layers == layers]  # fewest heads removed first
        if len(group) > size:
            group = [group[round(k * (len(group) - 1) / (size - 1))] for k in range(size)]
        grid += group
    return grid


def refinement(found: list[Allocation], grid: list[int], best: int) -> list[int]:
    """The candidates strictly between `best` and its grid neighbours (same dropped layers) that the grid
    left out: the second pass, empty where the grid held every head count."""
    group = [i for i, a in enumerate(found) if a.layers == found[best].layers]
    tried = [i for i in group if i in grid]
    at = tried.index(best)
    low, high = tried[max(at - 1, 0)], tried[min(at + 1, len(tried) - 1)]
    return [i for i in group if low < i < high and i not in grid]
