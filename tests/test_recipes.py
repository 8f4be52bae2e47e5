"""Recipes: `paper` reproduces the plan the paper's AMP gave before recipes existed, bit for bit; explicit
options override a recipe's values; the plan names its recipe."""

from __future__ import annotations

import pytest
from helpers import save_tiny

from amprune.errors import AmpruneError
from amprune.pipeline import PruneRequest, prune
from amprune.recipes import RECIPES, resolve

CALIB_TEXT = " ".join(f"The {w} jumps over {n} lazy dogs near the river bank." for n in range(40)
                      for w in ("fox", "cat"))

# `amprune prune --ratio 0.3` before recipes existed (commit 25d6d0e), on save_tiny(…, "llama_gqa", seed=5),
# calibrated on CALIB_TEXT with --samples 6 --seq-len 32: every layer's kept heads and neurons, and head scores.
GOLDEN_KEEP = [
    [[0, 5], [4, 7, 12, 13, 14, 15, 17, 20, 21, 22, 25, 26, 28, 29, 30, 31, 32, 33, 35, 37]],
    [[2, 4], [2, 3, 4, 6, 8, 10, 12, 16, 17, 18, 19, 21, 25, 27, 28, 29, 31, 34, 36, 38]],
]
GOLDEN_HEAD_SCORES = [[17.558912, 16.395432, 17.05233, 15.300502, 15.515074, 15.94302],
                      [18.350815, 20.714967, 21.582105, 20.036137, 20.664458, 18.809746]]


def test_paper_recipe_reproduces_the_former_default_plan_bit_for_bit(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    folder = save_tiny(tmp_path / "dense", "llama_gqa", seed=5)
    result = prune(PruneRequest(out=str(tmp_path / "out"), model=folder, ratio=0.3, recipe="paper", calib=str(calib),
                                samples=6, seq_len=32, progress=False))
    assert [[layer.heads_kept, layer.neurons_kept] for layer in result.plan.layers] == GOLDEN_KEEP
    for layer, scores in zip(result.plan.layers, GOLDEN_HEAD_SCORES, strict=True):
        # float32 sums: their last bits follow the CPU's vector width (a few ulps apart between machines)
        assert layer.head_scores == pytest.approx(scores, rel=1e-6, abs=0)
    settings = result.plan.settings
    assert (settings["recipe"], settings["method"], settings["correction"], settings["allocation"],
            settings["round_to"]) == ("paper", "amp", "none", "uniform", 1)


def test_explicit_options_override_the_recipe():
    paper = RECIPES["paper"]
    assert resolve("paper") == paper
    mixed = resolve("paper", correction="refit", round_to=8, scorer=None)
    assert (mixed.scorer, mixed.correction, mixed.round_to, mixed.allocation) == ("amp", "refit", 8, "uniform")
    assert resolve("default", allocation="uniform").allocation == "uniform"
    with pytest.raises(AmpruneError, match=r"^unknown --recipe 'best'; choose one of: default, paper$"):
        resolve("best")
    with pytest.raises(AmpruneError, match=r"^unknown --allocation 'greedy'; choose one of: search, uniform$"):
        resolve("default", allocation="greedy")


def test_the_search_slice_never_exceeds_the_samples_unless_asked():
    assert PruneRequest(out=None).resolved().search_samples == RECIPES["default"].search_samples == 8
    assert PruneRequest(out=None, samples=5).resolved().search_samples == 5
    assert PruneRequest(out=None, samples=48, search_samples=16).resolved().search_samples == 16
    with pytest.raises(AmpruneError, match=r"^--search-samples must be between 1 and --samples \(5\), got 6$"):
        PruneRequest(out=None, samples=5, search_samples=6).check()
