"""From scores to a plan: how many units every layer loses, and which ones.

AMP's rule (paper §2.5): the pruning ratio c = 1 − Q/P is a fraction of the *whole* model's parameters.
Embeddings and the LM head are never pruned, so c becomes one per-layer fraction p of the attention and
MLP units, and every layer drops the round(p·units) lowest-scoring heads and neurons. p is chosen so
that the achieved fraction is as close to c as the unit granularity allows.

GQA modes (H query heads in G KV groups of H/G heads):
- `query`: remove the same number of query heads from every KV group; keys/values stay.
- `group`: remove whole KV groups (the KV head and its query heads), scored by the sum of their heads'
  scores; this also shrinks the KV cache.
Both keep every layer's sizes equal, so the result is a standard config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .errors import AmpruneError
from .models.base import Dims

GQA_MODES = ("query", "group")
PLAN_FILE = "amprune_plan.json"
PLAN_FORMAT = "amprune-plan/1"


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; counts must not depend on the parity of the unit count.
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class UnitParams:
    """Parameters one unit carries in one layer (weights and biases of its rows/columns)."""

    head: int  # one query head: its q rows and o_proj columns
    kv_head: int  # one KV head: its k and v rows
    neuron: int  # one neuron: its gate/up rows and down_proj column
    layer: int = 0  # a whole decoder layer (what dropping it removes)


@dataclass(frozen=True)
class Budget:
    """How many units every layer loses (the same in every layer) and what that removes overall."""

    gqa_mode: str
    heads_removed: int  # query heads removed per layer
    kv_heads_removed: int  # KV heads removed per layer (group mode only)
    neurons_removed: int  # neurons removed per layer
    params_before: int
    params_after: int
    target_fraction: float | None  # --ratio, if the budget came from it
    notes: list[str] = field(default_factory=list)  # adjustments the user should know about
    layers_dropped: tuple[int, ...] = ()  # whole decoder layers removed (dense model's indices); the rest lose units

    @property
    def achieved_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def dims_after(self, dims: Dims) -> Dims:
        """The sizes every layer of a model with `dims` has after losing this budget's units and layers."""
        return replace(dims, num_layers=dims.num_layers - len(self.layers_dropped),
                       num_heads=dims.num_heads - self.heads_removed,
                       num_kv_heads=dims.num_kv_heads - self.kv_heads_removed,
                       intermediate_size=dims.intermediate_size - self.neurons_removed)


def effective_mode(dims: Dims, gqa_mode: str) -> str:
    """The GQA mode that applies: plain multi-head attention has every head its own KV group, so removing
    a query head removes its k/v rows too and both modes mean `group`."""
    return "group" if dims.group_size == 1 else gqa_mode


def head_removal(dims: Dims, gqa_mode: str, fraction: float) -> tuple[int, int]:
    """(query heads, KV heads) removed per layer for a head fraction under a GQA mode."""
    if gqa_mode == "query":
        per_group = _round_half_up(fraction * dims.group_size)
        return per_group * dims.num_kv_heads, 0
    groups = _round_half_up(fraction * dims.num_kv_heads)
    return groups * dims.group_size, groups


def _head_step(dims: Dims, gqa_mode: str) -> int:
    """Query heads per layer that one step of a GQA mode removes: one per KV group, or one whole group."""
    return dims.num_kv_heads if gqa_mode == "query" else dims.group_size


def _params_removed(dims: Dims, units: UnitParams, heads: int, kv_heads: int, neurons: int) -> int:
    per_layer = heads * units.head + kv_heads * units.kv_head + neurons * units.neuron
    return dims.num_layers * per_layer


def _check_left(dims: Dims, gqa_mode: str, heads: int, neurons: int, what: str) -> None:
    if heads >= dims.num_heads or (gqa_mode == "query" and heads // dims.num_kv_heads >= dims.group_size):
        raise AmpruneError(
            f"{what} would remove every attention head of every layer ({dims.num_heads} heads); "
            "use a smaller ratio"
        )
    if neurons >= dims.intermediate_size:
        raise AmpruneError(
            f"{what} would remove every MLP neuron of every layer ({dims.intermediate_size}); use a smaller ratio"
        )


def check_ratios(ratio: float | None, head_ratio: float | None, mlp_ratio: float | None) -> None:
    """The checks of a pruning request that need no model: one kind of ratio, each in [0, 1)."""
    if ratio is not None and (head_ratio is not None or mlp_ratio is not None):
        raise AmpruneError("give either --ratio or --head-ratio/--mlp-ratio, not both")
    if ratio is None and head_ratio is None and mlp_ratio is None:
        raise AmpruneError("nothing to prune: give --ratio (or --head-ratio/--mlp-ratio)")
    for name, value in (("--ratio", ratio), ("--head-ratio", head_ratio), ("--mlp-ratio", mlp_ratio)):
        if value is not None and (not (0.0 <= value < 1.0) or math.isnan(value)):
            raise AmpruneError(f"{name} must be in [0, 1), got {value}")


def make_budget(
    dims: Dims,
    units: UnitParams,
    total_params: int,
    gqa_mode: str = "query",
    ratio: float | None = None,
    head_ratio: float | None = None,
    mlp_ratio: float | None = None,
    accepted_heads: Collection[int] | None = None,
    round_to: int = 1,
) -> Budget:
    """Validate a request and turn it into per-layer removal counts.

    Either `ratio` (fraction of all parameters, AMP's c) or `head_ratio`/`mlp_ratio` (per-layer fractions
    of heads and neurons) is given. `accepted_heads` restricts the kept head count to what the stock
    config can hold (None: any). `round_to` keeps a multiple of that many neurons per layer (1: AMP's
    exact rule; 64 gives matmul shapes CPUs and GPUs run at full speed). Raises `AmpruneError` with the
    fix for every impossible request.
    """
    if round_to < 1 or round_to > dims.intermediate_size:
        raise AmpruneError(f"--round-to must be between 1 and {dims.intermediate_size}, got {round_to}")
    notes: list[str] = []
    if gqa_mode not in GQA_MODES:
        raise AmpruneError(f"unknown --gqa-mode '{gqa_mode}'; choose one of: {', '.join(GQA_MODES)}")
    gqa_mode = effective_mode(dims, gqa_mode)
    check_ratios(ratio, head_ratio, mlp_ratio)
    if gqa_mode == "group" and dims.num_kv_heads == 1 and (ratio or head_ratio):
        raise AmpruneError(
            "--gqa-mode group cannot prune heads of a model with a single KV head (multi-query attention): "
            "use --gqa-mode query, or prune the MLP only with --mlp-ratio"
        )

    if ratio is not None:
        heads, kv_heads, neurons = _solve_uniform_fraction(
            dims, units, total_params, gqa_mode, ratio, accepted_heads, round_to
        )
        _check_left(dims, gqa_mode, heads, neurons, f"--ratio {ratio}")
        if accepted_heads is not None:
            free = _solve_uniform_fraction(dims, units, total_params, gqa_mode, ratio, None, round_to)[0]
            if free != heads:
                notes.append(
                    f"the stock config accepts only {sorted(accepted_heads)} heads: keeping {dims.num_heads - heads} "
                    f"heads per layer instead of {dims.num_heads - free} (the plan closest to --ratio {ratio})"
                )
    else:
        head_ratio = head_ratio or 0.0
        mlp_ratio = mlp_ratio or 0.0
        heads, kv_heads = head_removal(dims, gqa_mode, head_ratio)
        neurons = _rounded_removal(dims.intermediate_size, _round_half_up(mlp_ratio * dims.intermediate_size), round_to)
        _check_left(dims, gqa_mode, heads, neurons, f"--head-ratio {head_ratio} / --mlp-ratio {mlp_ratio}")
        if head_ratio > 0 and heads == 0:
            units_name = "KV groups" if gqa_mode == "group" else "query heads per KV group"
            count = dims.num_kv_heads if gqa_mode == "group" else dims.group_size
            steps = ", ".join(f"{k}/{count}" for k in range(1, count))
            raise AmpruneError(
                f"--gqa-mode {gqa_mode} cannot express --head-ratio {head_ratio}: with {count} {units_name} it "
                f"removes none; use a head ratio of at least {0.5 / count:.3g} (steps of {steps})"
                + (" or --gqa-mode query" if gqa_mode == "group" else "")
            )
        if abs(heads / dims.num_heads - head_ratio) > 0.5 / dims.num_heads:  # coarser than one head
            notes.append(
                f"--gqa-mode {gqa_mode} removes heads in steps of {_head_step(dims, gqa_mode)} per layer: "
                f"--head-ratio {head_ratio} removes {heads} of {dims.num_heads} ({heads / dims.num_heads:.0%})"
            )
        if accepted_heads is not None and (dims.num_heads - heads) not in accepted_heads:
            wanted = heads
            heads, kv_heads = _nearest_accepted(dims, gqa_mode, heads, accepted_heads)
            notes.append(
                f"the stock config accepts only {sorted(accepted_heads)} heads: keeping {dims.num_heads - heads} "
                f"heads per layer instead of {dims.num_heads - wanted}"
            )

    removed = _params_removed(dims, units, heads, kv_heads, neurons)
    return Budget(
        gqa_mode=gqa_mode,
        heads_removed=heads,
        kv_heads_removed=kv_heads,
        neurons_removed=neurons,
        params_before=total_params,
        params_after=total_params - removed,
        target_fraction=ratio,
        notes=notes,
    )


def _rounded_removal(inter: int, removed: int, round_to: int) -> int:
    """The removal closest to `removed` that keeps a multiple of `round_to` neurons (or all of them)."""
    if round_to == 1:
        return removed
    kept = max(round_to, _round_half_up((inter - removed) / round_to) * round_to)
    return max(0, inter - kept)


def _removal_options(dims: Dims, gqa_mode: str) -> list[tuple[int, int]]:
    """Every (query heads, KV heads) removal per layer a GQA mode can express, fewest first."""
    if gqa_mode == "query":
        return [(r * dims.num_kv_heads, 0) for r in range(dims.group_size)]
    return [(r * dims.group_size, r) for r in range(dims.num_kv_heads)]


def _nearest_accepted(dims: Dims, gqa_mode: str, heads: int, accepted: Collection[int]) -> tuple[int, int]:
    options = [o for o in _removal_options(dims, gqa_mode) if dims.num_heads - o[0] in accepted]
    if not options:
        raise AmpruneError(
            f"no head count reachable with --gqa-mode {gqa_mode} is accepted by the stock config "
            f"({sorted(accepted)}); prune the MLP only (--mlp-ratio)"
        )
    return min(options, key=lambda o: (abs(o[0] - heads), o[0]))


def _solve_uniform_fraction(
    dims: Dims,
    units: UnitParams,
    total_params: int,
    gqa_mode: str,
    ratio: float,
    accepted_heads: Collection[int] | None = None,
    round_to: int = 1,
) -> tuple[int, int, int]:
    """The (heads, KV heads, neurons) removed per layer for one shared fraction p, closest to `ratio`.

    Every neuron count m is reached by p in [(m − ½)/I, (m + ½)/I); the head counts reachable by the same
    p are the roundings at both ends of that interval. Enumerating m is exact and cheap. Head counts the
    stock config would refuse are skipped. With `round_to` > 1 only removals that keep a multiple of
    `round_to` neurons are candidates, each standing for p within ±round_to/2 neurons.
    """
    inter = dims.intermediate_size
    best: tuple[float, int, tuple[int, int, int]] | None = None
    half = round_to / 2
    for m in range(inter):
        if round_to > 1 and (inter - m) % round_to:
            continue
        lo = max(0.0, (m - half) / inter)
        hi = (m + half) / inter - 1e-12
        for p in (lo, hi):
            heads, kv = head_removal(dims, gqa_mode, p)
            if accepted_heads is not None and dims.num_heads - heads not in accepted_heads:
                continue
            achieved = _params_removed(dims, units, heads, kv, m) / total_params
            key = (abs(achieved - ratio), m)
            if best is None or key < best[:2]:
                best = (key[0], key[1], (heads, kv, m))
    if best is None:
        raise AmpruneError(
            f"no head count reachable with --gqa-mode {gqa_mode} is accepted by the stock config "
            f"({sorted(accepted_heads or [])}); prune the MLP only (--mlp-ratio)"
        )
    return best[2]


@dataclass
class LayerPlan:
    """What one decoder layer keeps, with the scores that decided it. Indices are sorted."""

    heads_kept: list[int]
    kv_heads_kept: list[int]
    neurons_kept: list[int]
    head_scores: list[float]
    neuron_scores: list[float]


@dataclass
class Plan:
    """Per-layer keep lists plus everything needed to reproduce them."""

    dims: Dims
    budget: Budget
    layers: list[LayerPlan]
    settings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @property
    def dims_after(self) -> Dims:
        """Every layer's sizes after surgery (the budget's counts; the layers' keep lists agree with them)."""
        return self.budget.dims_after(self.dims)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "dims_before": asdict(self.dims),
            "dims_after": asdict(self.dims_after),
            "budget": {**asdict(self.budget), "achieved_fraction": self.budget.achieved_fraction},
            "settings": self.settings,
            "versions": self.versions,
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise AmpruneError(f"not an amprune plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        budget = {k: v for k, v in data["budget"].items() if k != "achieved_fraction"}
        budget["layers_dropped"] = tuple(budget.get("layers_dropped", ()))
        return cls(
            dims=Dims(**data["dims_before"]),
            budget=Budget(**budget),
            layers=[LayerPlan(**layer) for layer in data["layers"]],
            settings=data.get("settings", {}),
            versions=data.get("versions", {}),
        )

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / PLAN_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Plan:
        path = Path(folder)
        path = path / PLAN_FILE if path.is_dir() else path
        if not path.is_file():
            raise AmpruneError(f"no {PLAN_FILE} in {folder}: is it a checkpoint written by `amprune prune`?")
        return cls.from_dict(json.loads(path.read_text()))


def load_plan(folder: str | Path) -> Plan:
    """The plan saved beside a checkpoint written by `amprune prune` (or a path to its amprune_plan.json)."""
    return Plan.load(folder)


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    # Stable sort: ties are broken by index, so the same scores always give the same plan.
    order = torch.sort(scores, stable=True).indices
    return set(order[:count].tolist())


def select_units(head_scores: torch.Tensor, neuron_scores: torch.Tensor, dims: Dims, budget: Budget) -> list[LayerPlan]:
    """Keep lists for every layer: drop the lowest-scoring units as many as the budget says.

    Args:
        head_scores: (L, H) one score per query head.
        neuron_scores: (L, I) one score per neuron.
    """
    gs = dims.group_size
    layers = []
    for head_row, neuron_row in zip(head_scores.double(), neuron_scores.double(), strict=True):
        if budget.gqa_mode == "group":
            group_scores = head_row.view(dims.num_kv_heads, gs).sum(dim=1)  # (G,)
            dropped_groups = _lowest(group_scores, budget.kv_heads_removed)
            kv_kept = [g for g in range(dims.num_kv_heads) if g not in dropped_groups]
            heads_kept = [g * gs + j for g in kv_kept for j in range(gs)]
        else:
            per_group = budget.heads_removed // dims.num_kv_heads
            kv_kept = list(range(dims.num_kv_heads))
            heads_kept = []
            for g in kv_kept:
                dropped = _lowest(head_row[g * gs : (g + 1) * gs], per_group)
                heads_kept += [g * gs + j for j in range(gs) if j not in dropped]
        dropped_neurons = _lowest(neuron_row, budget.neurons_removed)
        layers.append(
            LayerPlan(
                heads_kept=heads_kept,
                kv_heads_kept=kv_kept,
                neurons_kept=[i for i in range(dims.intermediate_size) if i not in dropped_neurons],
                head_scores=head_row.tolist(),
                neuron_scores=neuron_row.tolist(),
            )
        )
    return layers
