"""Baseline scorers: hand-computed values, permutation with the units, and their wiring into the pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import budget_for, char_tokenizer, family_and_dims, run_engine, save_tiny, tiny_model

from amprune.calibration import batches, calibration_set
from amprune.engine import Run
from amprune.errors import AmpruneError
from amprune.pipeline import PruneRequest, prune
from amprune.plan import select_units
from amprune.scoring import (
    SCORERS,
    flap_compensation,
    flap_scores,
    magnitude_scores,
    obs_removal_scores,
    taylor_scores,
    wanda_sp_scores,
)
from amprune.stats import collect_gradients


def test_magnitude_by_hand():
    # Two units of two channels; unit 0 = channels 0,1 and rows 0,1.
    out_weight = torch.tensor([[1.0, 2.0, 0.0, 3.0]])  # (D=1, 4)
    in_weight = torch.tensor([[2.0], [0.0], [1.0], [1.0]])  # (4, D=1)
    # squares per channel: out [1, 4, 0, 9] + in [4, 0, 1, 1] = [5, 4, 1, 10] → units [9, 11]
    torch.testing.assert_close(magnitude_scores([in_weight], out_weight, 2), torch.tensor([3.0, 11.0**0.5]))


def test_wanda_sp_by_hand():
    out_weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    sq_mean = torch.tensor([4.0, 9.0])  # RMS [2, 3]
    # Σ_i |W_ij| = [4, 6] → [8, 18]
    torch.testing.assert_close(wanda_sp_scores(out_weight, sq_mean, 1), torch.tensor([8.0, 18.0]))
    torch.testing.assert_close(wanda_sp_scores(out_weight, sq_mean, 2), torch.tensor([26.0]))


def test_flap_by_hand():
    out_weight = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mean, sq_mean = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 4.0])  # variance [4, 0]
    # ‖W[:, j]‖² = [10, 4] → [40, 0]
    torch.testing.assert_close(flap_scores(out_weight, mean, sq_mean, 1), torch.tensor([40.0, 0.0]))


def test_flap_compensation_by_hand():
    out_weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mean = torch.tensor([1.0, 1.0, 2.0])
    torch.testing.assert_close(flap_compensation(out_weight, mean, [0, 2]), torch.tensor([7.0, 16.0]))


def test_taylor_by_hand():
    in_weight, in_grad = torch.tensor([[2.0], [3.0]]), torch.tensor([[0.5], [-2.0]])  # |w·g| rows [1, 6]
    out_weight, out_grad = torch.tensor([[1.0, -1.0]]), torch.tensor([[4.0, 2.0]])  # |w·g| cols [4, 2]
    torch.testing.assert_close(
        taylor_scores([in_weight], [in_grad], out_weight, out_grad, 1), torch.tensor([5.0, 8.0])
    )


@pytest.mark.parametrize("name", ["magnitude", "wanda_sp", "flap", "taylor"])
def test_scores_permute_with_units(name):
    """Reordering the units (their rows, columns and statistics together) reorders the scores the same way."""
    torch.manual_seed(0)
    units, size, hidden = 5, 3, 4
    channels = units * size

    def layer(perm_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = (perm_units[:, None] * size + torch.arange(size)).flatten()
        return SCORERS[name].layer_scores(
            _tensors(q, o, gate, up, down, mean, sq, grads, cols, perm_neurons=perm_units, size=size)
        )

    q, o = torch.randn(channels, hidden), torch.randn(hidden, channels)
    gate, up, down = torch.randn(units, hidden), torch.randn(units, hidden), torch.randn(hidden, units)
    mean, sq = torch.randn(channels), torch.rand(channels) + 2
    grads = [torch.randn_like(t) for t in (q, o, gate, up, down)]
    perm = torch.randperm(units)
    (heads, neurons), (heads_perm, neurons_perm) = layer(torch.arange(units)), layer(perm)
    torch.testing.assert_close(heads_perm, heads[perm])
    torch.testing.assert_close(neurons_perm, neurons[perm])
    assert not torch.equal(heads_perm, heads)  # the permutation did move something


def _tensors(q, o, gate, up, down, mean, sq, grads, cols, perm_neurons, size):
    from amprune.scoring import LayerTensors

    g_q, g_o, g_gate, g_up, g_down = grads
    return LayerTensors(
        head_dim=size,
        head_in=[q[cols]],
        o_weight=o[:, cols],
        neuron_in=[gate[perm_neurons], up[perm_neurons]],
        down_weight=down[:, perm_neurons],
        o_moments=(mean[cols], sq[cols]),
        down_moments=(mean[perm_neurons], sq[perm_neurons]),
        head_in_grads=[g_q[cols]],
        o_grad=g_o[:, cols],
        neuron_in_grads=[g_gate[perm_neurons], g_up[perm_neurons]],
        down_grad=g_down[:, perm_neurons],
    )


def _setup(case: str, calib_text: str):
    model = tiny_model(case)
    family, dims = family_and_dims(model)
    calib = calibration_set(calib_text, char_tokenizer(), num_samples=4, seq_len=32, seed=0)
    return model, family, dims, calib


def engine_scores(model, calib, scorers: list[str], batch_size: int = 3, seed: int = 0, **settings) -> dict:
    """{scorer: ((L, H) head scores, (L, I) neuron scores)} as the layer engine records them in the plan, from
    one pass over a copy of `model` (every activation scorer reads the same dense-stream statistics), or over
    `model` itself when it carries Taylor `gradients` (a copy would not)."""
    budget = budget_for(model, mlp_ratio=0.05)
    source = model if settings.get("gradients") else copy.deepcopy(model)
    results = run_engine(source, calib, [Run(name, budget) for name in scorers], batch_size, seed=seed, **settings)
    return {name: (torch.tensor([layer.head_scores for layer in result.layers], dtype=torch.float64),
                   torch.tensor([layer.neuron_scores for layer in result.layers], dtype=torch.float64))
            for name, result in zip(scorers, results, strict=True)}


def test_reversed_removes_what_amp_keeps(calib_text):
    model, _, dims, calib = _setup("llama_mha", calib_text)  # 4 heads, 48 neurons
    scores = engine_scores(model, calib, ["amp", "reversed"], batch_size=2)
    half = budget_for(model, head_ratio=0.5, mlp_ratio=0.5)  # at one half, reversed keeps exactly what amp removes
    amp = select_units(*scores["amp"], dims, half)
    rev = select_units(*scores["reversed"], dims, half)
    for a, r in zip(amp, rev, strict=True):
        assert r.heads_kept == sorted(set(range(4)) - set(a.heads_kept))
        assert r.neurons_kept == sorted(set(range(48)) - set(a.neurons_kept))
    small = budget_for(model, head_ratio=0.25, mlp_ratio=10 / 48)  # elsewhere: same counts, the highest AMP scores go
    for a, r, heads in zip(select_units(*scores["amp"], dims, small), select_units(*scores["reversed"], dims, small),
                           scores["amp"][0], strict=True):
        assert len(r.heads_kept) == len(a.heads_kept) == 3 and len(r.neurons_kept) == len(a.neurons_kept) == 38
        assert set(range(4)) - set(r.heads_kept) == {int(heads.argmax())}


def test_activation_scorers_match_brute_force(calib_text):
    """wanda_sp and flap from the engine's shared dense-stream statistics equal the formulas on the collected
    inputs."""
    model, family, dims, calib = _setup("llama_gqa", calib_text)
    inputs: dict[str, list[torch.Tensor]] = {"o": [], "down": []}
    layer = family.decoder_layers(model)[1]
    handles = [
        family.o_proj(layer).register_forward_pre_hook(lambda m, a: inputs["o"].append(a[0].flatten(0, 1))),
        family.down_proj(layer).register_forward_pre_hook(lambda m, a: inputs["down"].append(a[0].flatten(0, 1))),
    ]
    with torch.no_grad():
        for sample in calib.samples:  # every sample is 32 tokens: no padding
            model.model(input_ids=sample[None])
    for h in handles:
        h.remove()
    o_in, down_in = torch.cat(inputs["o"]).double(), torch.cat(inputs["down"]).double()  # (T, H·d), (T, I)
    scores = engine_scores(model, calib, ["wanda_sp", "flap"])
    o_w, down_w = family.o_proj(layer).weight.double(), family.down_proj(layer).weight.double()

    wanda_heads = (o_w.abs().sum(0) * o_in.pow(2).mean(0).sqrt()).view(dims.num_heads, -1).sum(1)
    wanda_neurons = down_w.abs().sum(0) * down_in.pow(2).mean(0).sqrt()
    flap_heads = (o_in.var(0, unbiased=False) * o_w.pow(2).sum(0)).view(dims.num_heads, -1).sum(1)
    flap_neurons = down_in.var(0, unbiased=False) * down_w.pow(2).sum(0)
    torch.testing.assert_close(scores["wanda_sp"][0][1], wanda_heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores["wanda_sp"][1][1], wanda_neurons, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores["flap"][0][1], flap_heads, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(scores["flap"][1][1], flap_neurons, rtol=1e-3, atol=1e-6)


def test_taylor_matches_autograd(calib_text):
    model, family, dims, calib = _setup("llama_gqa", calib_text)
    scored = copy.deepcopy(model)
    collect_gradients(scored, family, list(batches(calib.samples, 2, 0)), torch.device("cpu"), progress=False)
    assert all(p.requires_grad for p in scored.parameters())  # the trainable flags are restored
    assert scored.model.embed_tokens.weight.grad is None  # only decoder weights get gradients
    scores = engine_scores(scored, calib, ["taylor"], gradients=True)
    for ids, in [(torch.stack(calib.samples[:2]),), (torch.stack(calib.samples[2:]),)]:
        model(input_ids=ids, labels=ids).loss.backward()
    layer = family.decoder_layers(model)[0]
    q, o = family.attention_block(layer).q_proj, family.o_proj(layer)
    d = dims.head_dim
    expected = ((q.weight * q.weight.grad).abs().sum(1) + (o.weight * o.weight.grad).abs().sum(0)).view(-1, d).sum(1)
    torch.testing.assert_close(scores["taylor"][0][0], expected.double().detach(), rtol=1e-4, atol=1e-7)


def test_random_is_seeded(calib_text):
    model, _, _, calib = _setup("qwen2", calib_text)
    first = engine_scores(model, calib, ["random"], seed=3)["random"]
    again = engine_scores(model, calib, ["random"], seed=3)["random"]
    other = engine_scores(model, calib, ["random"], seed=4)["random"]
    assert torch.equal(first[1], again[1]) and not torch.equal(first[1], other[1])
    assert first[0].shape == (2, 4) and first[1].shape == (2, 40)


def _refit_error(x: torch.Tensor, weight: torch.Tensor, size: int, removed: set[int], constant: bool) -> float:
    """Brute force: the squared error of the best least-squares re-fit of the columns left after `removed`."""
    units = x.shape[1] // size
    kept = x[:, [u * size + j for u in range(units) if u not in removed for j in range(size)]]
    if constant:
        kept = torch.cat([kept, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    target = x @ weight[:, : x.shape[1]].T + (weight[:, -1] if constant else 0)
    return (kept @ torch.linalg.lstsq(kept, target).solution - target).pow(2).sum().item()


@pytest.mark.parametrize(("size", "constant"), [(3, False), (1, False), (2, True)])
def test_obs_removes_greedily_what_the_refit_misses_least(size, constant):
    """Each greedy step removes the unit whose removal leaves the smallest brute-force re-fit error, given the
    units removed before it; with a bias the constant channel is never removed and re-fitted too."""
    generator = torch.Generator().manual_seed(size)
    units = 6
    x = torch.randn(200, units * size, generator=generator, dtype=torch.float64)
    x = x @ torch.randn(units * size, units * size, generator=generator, dtype=torch.float64) + 0.3
    weight = torch.randn(4, units * size + constant, generator=generator, dtype=torch.float64)
    inputs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if constant else x
    scores = obs_removal_scores(inputs.T @ inputs, weight, size, 3, fixed=int(constant))
    order = scores.argsort().tolist()
    assert sorted(scores.tolist()) == list(range(units))
    removed: set[int] = set()
    for unit in order[:3]:
        errors = {u: _refit_error(x, weight, size, removed | {u}, constant) for u in range(units) if u not in removed}
        assert unit == min(errors, key=errors.get)
        removed.add(unit)
    errors = {u: _refit_error(x, weight, size, removed | {u}, constant) for u in order[3:]}
    assert order[3:] == sorted(errors, key=errors.get)  # the kept units: by the error of removing them next


def test_obs_spreads_removals_evenly_over_groups_and_steps_remove_several():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=generator, dtype=torch.float64) * torch.tensor([1e-3, 1e-3, 1e-3, 1, 1, 1, 1, 1])
    weight = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    # the three tiny channels are the cheapest to remove; two of them are in group 0, which can give only one
    scores = obs_removal_scores(x.T @ x, weight, 1, 2, groups=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    first, second = scores.argsort()[:2].tolist()
    assert first in (0, 1, 2) and second >= 4
    joint = obs_removal_scores(x.T @ x, weight, 1, 3, per_step=3)
    assert sorted(joint.argsort()[:3].tolist()) == [0, 1, 2]
    transposed = weight.T.contiguous().T  # a view whose transpose is contiguous: must still not be written to
    gram = x.T @ x
    obs_removal_scores(gram, transposed, 1, 3)
    assert torch.equal(transposed, weight) and torch.equal(gram, x.T @ x)


def test_prune_with_a_baseline_scorer(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "tiny", "llama_gqa")
    result = prune(PruneRequest(recipe="paper", out=None, model=folder, ratio=0.3, scorer="wanda_sp", calib=calib_text,
                                samples=4, seq_len=32, progress=False))
    assert result.plan.settings["method"] == "wanda_sp"
    assert sum(p.numel() for p in result.model.parameters()) == result.plan.budget.params_after


def test_unknown_scorer_fails_before_loading(tmp_path):
    folder = save_tiny(tmp_path / "tiny", "llama_gqa")
    with pytest.raises(AmpruneError, match=r"^unknown scorer 'nope'; choose from: amp, reversed, random, magnitude, "
                       r"wanda_sp, flap, taylor$"):
        prune(PruneRequest(recipe="paper", out=None, model=folder, ratio=0.3, scorer="nope", calib="no-such-file.txt"))
    with pytest.raises(AmpruneError, match=r"^the obs scorer ranks units by .* it runs only with --correction "
                       r"refit-one-pass$"):
        prune(PruneRequest(recipe="paper",
                           out=None, model=folder, ratio=0.3, scorer="obs", correction="refit", calib="no-such.txt"))
