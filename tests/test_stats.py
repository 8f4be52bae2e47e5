"""What the hooks collect: AMP scores through the layer engine ≡ brute force for every family, padding
excluded; hooks always removed; non-finite activations named by layer."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, brute_force_scores, budget_for, family_and_dims, random_samples, run_engine, tiny_model

from amprune.engine import Run
from amprune.errors import AmpruneError
from amprune.stats import LayerStats, recording


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_amp_scores_equal_brute_force_with_padding(case):
    model = tiny_model(case)
    calib = random_samples([9, 5, 12, 7], seed=3)  # batches of 3 need padding
    want_heads, want_neurons = brute_force_scores(model, calib.samples)
    (result,) = run_engine(model, calib, [Run("amp", budget_for(model, mlp_ratio=0.25))], batch_size=3)
    heads = torch.tensor([layer.head_scores for layer in result.layers], dtype=torch.float64)
    neurons = torch.tensor([layer.neuron_scores for layer in result.layers], dtype=torch.float64)
    torch.testing.assert_close(heads, want_heads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(neurons, want_neurons, rtol=1e-5, atol=1e-6)


def test_hooks_are_removed_even_on_error():
    model = tiny_model("llama_gqa")
    family, dims = family_and_dims(model)
    layer = family.decoder_layers(model)[0]
    with pytest.raises(RuntimeError), recording(family, layer, LayerStats(dims)):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_non_finite_activations_are_reported_with_the_layer():
    model = tiny_model("llama_gqa")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(AmpruneError, match="non-finite activations in decoder layer 1"):
        run_engine(model, random_samples([16]), [Run("amp", budget_for(model, mlp_ratio=0.25))])
