"""Allocations: exactly the stock-valid plans of every family and GQA mode, each as close to the ratio as
the granularity allows; the layers to drop by angular distance."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CASES, family_and_dims, tiny_model

from amprune.allocation import AngularDistance, layers_to_drop
from amprune.errors import AmpruneError
from amprune.pipeline import describe_model
from amprune.recipes import resolve
from amprune.search import candidates
from amprune.surgery import unit_params

LONGROPE = dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
                                 "long_factor": [2.0, 2.5, 3.0, 3.5]},
                original_max_position_embeddings=64)


def brute_force(model, mode: str, ratio: float, round_to: int, max_dropped: int, head_counts: set[int]) -> set:
    """Every (heads, KV heads, neurons, dropped) with a head count in `head_counts` that a stock config takes
    in `mode`, the neuron count (a multiple of `round_to` kept) closest to the ratio, within one step of it."""
    family, dims = family_and_dims(model)
    units = unit_params(family, family.decoder_layers(model)[0], dims)
    total = sum(p.numel() for p in model.parameters())
    found = set()
    for dropped in range(min(max_dropped, dims.num_layers - 1) + 1):
        layers = dims.num_layers - dropped
        for kv in range(dims.num_kv_heads):
            for per_group in range(dims.group_size):
                heads = kv * dims.group_size if mode == "group" else per_group * dims.num_kv_heads
                if (mode == "group" and per_group) or (mode == "query" and kv and dims.group_size > 1):
                    continue
                if dims.num_heads - heads not in head_counts:
                    continue
                kv_removed = kv if mode == "group" or dims.group_size == 1 else 0
                fixed = dropped * units.layer + layers * (heads * units.head + kv_removed * units.kv_head)
                options = [m for m in range(dims.intermediate_size) if m == 0 or (dims.intermediate_size - m) % round_to
                           == 0]
                best = min(options, key=lambda m: (abs(fixed + layers * m * units.neuron - ratio * total), m))
                if abs(fixed + layers * best * units.neuron - ratio * total) <= layers * round_to * units.neuron:
                    found.add((heads, kv_removed, best, dropped))
    return found


CASES_MODES = [(case, mode) for case in sorted(CASES) for mode in ("query", "group")
               if not (mode == "group" and case.startswith("gemma"))]


@pytest.mark.parametrize("case, mode", CASES_MODES)
@pytest.mark.parametrize("ratio, round_to", [(0.2, 1), (0.35, 8)])
def test_allocations_are_exactly_the_stock_valid_plans(case, mode, ratio, round_to, tmp_path):
    model = tiny_model(case)
    model.save_pretrained(tmp_path)
    info = describe_model(str(tmp_path))
    recipe = resolve("default", round_to=round_to)
    found = candidates(info, recipe, mode, ratio)
    accepted = info.family.accepted_head_counts(info.config) or set(range(1, info.dims.num_heads + 1))
    effective = "group" if info.dims.group_size == 1 else mode  # plain MHA: both modes remove whole heads
    want = brute_force(model, effective, ratio, round_to, recipe.max_dropped, accepted)
    assert {(a.heads_removed, a.kv_heads_removed, a.neurons_removed, a.layers) for a in found} == want
    step = max(info.dims.num_layers - a.layers for a in found) * round_to * info.units.neuron
    for allocation in found:  # as close to the ratio as one rounding step of the neurons allows
        assert abs(allocation.params_removed - ratio * info.total_params) <= step
        assert (info.dims.intermediate_size - allocation.neurons_removed) % round_to == 0 or not \
            allocation.neurons_removed
    if case.startswith("gemma"):  # 64 hidden: 4, 2 or 1 heads, never 3
        assert {info.dims.num_heads - a.heads_removed for a in found} <= {4, 2, 1}


def test_phi3_longrope_allocations_keep_every_head(tmp_path):
    tiny_model("phi3_gqa", num_hidden_layers=4, **LONGROPE).save_pretrained(tmp_path)  # 4 layers: 3 may go
    info = describe_model(str(tmp_path))
    found = candidates(info, resolve("default"), "query", 0.3)
    assert found and all(a.heads_removed == 0 for a in found)
    assert {a.layers for a in found} >= {0, 1}  # the MLP and whole layers carry the cut


def test_a_ratio_no_plan_reaches_is_refused(tmp_path):
    tiny_model("llama_gqa").save_pretrained(tmp_path)
    info = describe_model(str(tmp_path))
    with pytest.raises(AmpruneError, match=r"^no stock-valid plan removes 97\.0% of the parameters: every head count, "
                       r"layer count and neuron count misses it; use a smaller --ratio$"):
        candidates(info, resolve("default"), "query", 0.97)


def test_angular_distance_and_the_layers_it_drops():
    distance = AngularDistance(3)
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # (B=1, T=3, D=2)
    turned = torch.tensor([[[0.0, 1.0], [0.0, 3.0], [1.0, 1.0]]])  # 90°, 0°, 0°; the last token is padding
    distance(0, x, turned, torch.tensor([[1, 1, 0]]))
    distance(1, x, x, torch.tensor([[1, 1, 1]]))
    distance(2, x, -x, torch.tensor([[1, 1, 1]]))
    assert distance.distances() == pytest.approx([0.25, 0.0, 1.0], abs=1e-8)  # arccos(cos)/π over real tokens
    assert layers_to_drop(distance.distances(), 2) == (0, 1)
    assert layers_to_drop([0.3, 0.1, 0.2, 0.1], 2) == (1, 3) and layers_to_drop([0.3, 0.1], 0) == ()
    assert math.isclose(AngularDistance(1).distances()[0], 0.0)
