"""The allocation search: every candidate recorded with its held-out NLL, which is the pruned model's own;
the lowest wins; the plan and the summary say so."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_samples, save_tiny, tiny_model

from amprune import search as search_module
from amprune.allocation import Allocation
from amprune.engine import LayerEngine, Run, Settings
from amprune.pipeline import PruneRequest, describe_model, prune
from amprune.plan import Plan
from amprune.recipes import resolve
from amprune.report import plan_summary
from amprune.search import coarse_grid, refinement, search
from amprune.weights import InMemory

LONG_TEXT = " ".join(f"The {w} jumps over {n} lazy dogs near the river bank." for n in range(400)
                     for w in ("fox", "cat"))


@pytest.mark.parametrize("correction", ["none", "refit-one-pass"])
def test_every_candidate_is_ranked_by_its_own_heldout_nll(correction, tmp_path):
    folder = save_tiny(tmp_path / "dense", "llama_gqa", num_hidden_layers=4)
    model = tiny_model("llama_gqa", num_hidden_layers=4)
    info = describe_model(folder)
    calib = random_samples([32] * 6, seed=1)
    calib.heldout = random_samples([32] * 64, seed=2).samples  # 2048 tokens
    recipe = resolve("default", scorer="amp", correction=correction, round_to=1, search_samples=4)
    found = search(InMemory(copy.deepcopy(model)), info, calib, recipe, "query", 0.3, Settings(batch_size=2,
                                                                                                 progress=False))
    losses = [c.loss for c in found.candidates]
    assert len(found.candidates) > 3 and all(loss is not None for loss in losses)
    assert found.chosen == losses.index(min(losses)) and found.runner_up.loss == sorted(losses)[1]
    assert {c.allocation.layers for c in found.candidates} == {0, 1} and len(found.distances) == 4
    chosen = found.candidates[found.chosen]
    # The candidate's loss is the NLL of the model its recipe prunes on the slice, measured by transformers.
    pruned = copy.deepcopy(model)
    slice_ = copy.copy(calib)
    slice_.samples, slice_.heldout = calib.samples[:4], []
    LayerEngine(InMemory(pruned), slice_, calib.samples[0][:8], [Run("amp", chosen.budget, correction)],
                Settings(batch_size=2, keep_layers=True, progress=False)).run()
    ids = torch.stack(calib.heldout)
    with torch.no_grad():
        nll = pruned(ids, labels=ids).loss.item()
    assert chosen.loss == pytest.approx(nll, rel=1e-5)
    for candidate in found.candidates:  # dropped layers are the ones that change the stream least
        dropped = candidate.budget.layers_dropped
        assert list(dropped) == sorted(sorted(range(4), key=lambda i: found.distances[i])[: len(dropped)])


def test_default_recipe_end_to_end_records_the_search_and_summarises_it(tmp_path):
    folder = save_tiny(tmp_path / "dense", "llama_gqa", num_hidden_layers=4)
    calib = tmp_path / "calib.txt"
    calib.write_text(LONG_TEXT)
    result = prune(PruneRequest(out=str(tmp_path / "out"), model=folder, ratio=0.3, calib=str(calib), samples=8,
                                seq_len=32, heldout=64, progress=False))
    settings = result.plan.settings
    allocation = settings["allocation"]
    assert settings["recipe"] == "default" and settings["heldout_samples"] == 64
    chosen = allocation["candidates"][allocation["chosen"]]
    assert chosen["loss"] == min(c["loss"] for c in allocation["candidates"])
    budget = result.plan.budget
    assert (budget.heads_removed, budget.neurons_removed, list(budget.layers_dropped)) == (
        chosen["heads_removed"], chosen["neurons_removed"], chosen["layers_dropped"])
    assert result.plan.dims_after.num_layers == 4 - len(budget.layers_dropped)
    summary = plan_summary(result.plan)
    assert f"allocation: {chosen['allocation']} (held-out NLL {chosen['loss']:.3f})" in summary
    assert "runner-up:" in summary and "recipe default" in summary


def test_the_grid_spreads_head_counts_evenly_and_the_refinement_fills_in_around_the_best():
    found = [Allocation(h, h, 0, layers, 0) for layers, count in ((0, 31), (1, 5)) for h in range(count)]
    grid = coarse_grid(found, 8)
    assert grid == [0, 4, 9, 13, 17, 21, 26, 30, 31, 32, 33, 34, 35]  # 31 head counts → 8, both ends; 5 → all
    assert refinement(found, grid, 9) == [5, 6, 7, 8, 10, 11, 12]
    assert refinement(found, grid, 0) == [1, 2, 3]
    assert refinement(found, grid, 30) == [27, 28, 29]
    assert refinement(found, grid, 33) == []  # every head count of that depth was on the grid


def test_a_grid_search_prunes_fewer_candidates_with_the_losses_a_full_search_gives_them(monkeypatch, tmp_path):
    mha = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=16, num_key_value_heads=16, head_dim=4)
    folder = save_tiny(tmp_path / "dense", "llama_gqa", **mha)
    model = tiny_model("llama_gqa", **mha)  # 8 head counts reach 30 %: a grid of 4, then 1 to 3 around its best
    info = describe_model(folder)
    calib = random_samples([32] * 6, seed=1)
    calib.heldout = random_samples([32] * 64, seed=2).samples
    recipe = resolve("default", scorer="amp", correction="refit-one-pass", round_to=1, search_samples=4,
                     max_dropped=0)

    def run(coarse: int):
        monkeypatch.setattr(search_module, "COARSE", coarse)
        return search(InMemory(copy.deepcopy(model)), info, calib, recipe, "query", 0.3,
                      Settings(batch_size=2, progress=False))

    full, capped = run(100), run(4)
    assert [c.allocation for c in capped.candidates] == [c.allocation for c in full.candidates]
    assert {c.stage for c in full.candidates} == {"coarse"}
    allocations = [c.allocation for c in full.candidates]
    grid = coarse_grid(allocations, 4)
    pruned = [i for i, c in enumerate(capped.candidates) if c.stage != "skipped"]
    assert len(full.candidates) == 8 and len(grid) == 4 and 4 < len(pruned) < 8
    assert [i for i, c in enumerate(capped.candidates) if c.stage == "coarse"] == grid
    best_on_grid = min(grid, key=lambda i: full.candidates[i].loss)
    assert [i for i, c in enumerate(capped.candidates) if c.stage == "refine"] == refinement(
        allocations, grid, best_on_grid)
    for i, candidate in enumerate(capped.candidates):  # each candidate's loss does not depend on the others
        assert candidate.loss == (full.candidates[i].loss if i in pruned else None)
    assert capped.chosen == min(pruned, key=lambda i: full.candidates[i].loss)
    plan = Plan(dims=info.dims, budget=capped.budget, layers=[], settings={"allocation": capped.to_dict(info.dims)})
    line = f"best of 8 candidates ({len(pruned)} pruned: a grid of head counts, then around its best)"
    assert line in plan_summary(plan)
