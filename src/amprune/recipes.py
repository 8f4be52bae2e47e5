"""Recipes: named defaults for how `amprune prune` ranks, allocates, corrects and calibrates.

`default` is the best recipe measured on held-out text of both packaged domains (docs/RESULTS.md,
"Where to cut"). `paper` is AMP exactly as published: the same fraction p of heads and of neurons in
every layer, AMP scores on the dense model, no re-fit, exact neuron counts (with the calibration this
project has always used, 48 windows of 512 tokens of C4, as Alpaca is not available offline). An
option given explicitly overrides its recipe's value; the plan records the recipe and every value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import AmpruneError

ALLOCATIONS = ("search", "uniform")


@dataclass(frozen=True)
class Recipe:
    scorer: str
    correction: str  # none | bias | refit | refit-one-pass
    allocation: str  # search: the held-out loss picks heads/neurons/layers; uniform: the paper's single p
    calib: str
    samples: int
    round_to: int  # keep a multiple of this many neurons per layer
    heldout: int = 0  # held-out calibration samples the search ranks candidates on
    search_samples: int = 0  # calibration samples every candidate is pruned on during the search
    max_dropped: int = 0  # at most this many whole decoder layers dropped
    toward_dense: float = 0.0  # how far each re-fitted MLP aims at the dense model's own stream (0: its block)


RECIPES = {
    "default": Recipe(scorer="obs", correction="refit-one-pass", allocation="search", calib="mix", samples=48,
                      round_to=8, heldout=8, search_samples=8, max_dropped=2),
    "paper": Recipe(scorer="amp", correction="none", allocation="uniform", calib="c4", samples=48, round_to=1),
}


def resolve(name: str, **given) -> Recipe:
    """Recipe `name` with every value in `given` that is not None in place of its own."""
    if name not in RECIPES:
        raise AmpruneError(f"unknown --recipe '{name}'; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    values = {f.name: getattr(recipe, f.name) if given.get(f.name) is None else given[f.name] for f in fields(recipe)}
    if values["allocation"] not in ALLOCATIONS:
        raise AmpruneError(f"unknown --allocation '{values['allocation']}'; choose one of: {', '.join(ALLOCATIONS)}")
    return Recipe(**values)
