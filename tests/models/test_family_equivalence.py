"""Phi, Phi-3 and Gemma-3: surgery ≡ masking, KV-cache generation, stock reload, AMP scores ≡ brute force."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import char_tokenizer, max_diff
from family_cases import CASES, brute_force_scores, family_and_dims, family_model
from test_surgery import assert_params_removed, random_plans
from transformers import AutoConfig, AutoModelForCausalLM

from amprune.calibration import CalibrationSet, collect_amp_stats
from amprune.checkpoint import save_checkpoint
from amprune.plan import Plan
from amprune.surgery import apply_plan, mask_plan

PLAN_CASES = [
    (case, i) for case in sorted(CASES) for i in range(len(random_plans(family_and_dims(family_model(case))[1])))
]


def sliced_and_masked(case: str, plan_index: int, dtype: torch.dtype = torch.float32):
    model = family_model(case).to(dtype)
    family, dims = family_and_dims(model)
    plan = random_plans(dims, seed=plan_index)[plan_index]
    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    mask_plan(masked, family, plan)
    apply_plan(sliced, family, plan)
    return model, masked, sliced, plan, family


@pytest.mark.parametrize("case, plan_index", PLAN_CASES)
def test_sliced_logits_equal_masked_logits(case, plan_index):
    # float64: Gemma's post-MLP RMSNorm rescales a one-neuron MLP output to unit size, so in float32 the
    # rounding noise of a nearly cancelled activation reaches 7e-5 in the logits (of ~12).
    dense, masked, sliced, _, _ = sliced_and_masked(case, plan_index, torch.float64)
    ids = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(0))  # 11 > sliding window 6
    with torch.no_grad():
        want, got, original = masked(ids).logits, sliced(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=lambda m: f"{m}\n{max_diff(got, want)}")
    assert (original - want).abs().max() > 1e-3  # the plan really changed the model


@pytest.mark.parametrize("case, plan_index", PLAN_CASES)
def test_parameter_count_and_config_after_surgery(case, plan_index):
    dense, _, sliced, plan, family = sliced_and_masked(case, plan_index)
    assert_params_removed(dense, sliced, plan, family)
    dims, after = plan.dims, plan.dims_after
    cfg = family.sizes_config(sliced.config)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        after.num_heads, after.num_kv_heads, dims.head_dim, after.intermediate_size)
    for layer in family.decoder_layers(sliced):
        assert family.o_proj(layer).in_features == after.num_heads * dims.head_dim
        assert family.down_proj(layer).in_features == after.intermediate_size
        assert family.attention_block(layer).num_key_value_groups == after.num_heads // after.num_kv_heads


@pytest.mark.parametrize("case, plan_index", PLAN_CASES)
def test_greedy_generation_with_kv_cache_matches_masked_model(case, plan_index):
    _, masked, sliced, _, _ = sliced_and_masked(case, plan_index)
    prompt = torch.tensor([[5, 17, 33, 9, 60, 41, 22, 8]])  # the cache outgrows Gemma's 6-token window
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        got, want = sliced.generate(prompt, **kwargs), masked.generate(prompt, **kwargs)
    assert got.shape == (1, 18)
    assert got.tolist() == want.tolist()


def _savable(case: str, plan_index: int) -> bool:
    model = family_model(case)
    family, dims = family_and_dims(model)
    accepted = family.accepted_head_counts(model.config)
    return accepted is None or len(random_plans(dims, plan_index)[plan_index].layers[0].heads_kept) in accepted


# Phi keeps 3 of 4 heads with hidden size 32 (an explicit head_dim); Gemma's 3 of 4 are refused (see rules).
@pytest.mark.parametrize("case, plan_index", [c for c in PLAN_CASES if _savable(*c)])
def test_save_then_stock_reload_gives_identical_config_and_logits(case, plan_index, tmp_path):
    model = family_model(case)
    family, dims = family_and_dims(model)
    plan = random_plans(dims, seed=plan_index)[plan_index]
    apply_plan(model, family, plan)
    out = save_checkpoint(model, char_tokenizer(), plan, family, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    cfg = family.sizes_config(AutoConfig.from_pretrained(out))
    after = plan.dims_after
    assert cfg.model_type == family.sizes_config(model.config).model_type
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        after.num_heads, after.num_kv_heads, after.head_dim, after.intermediate_size)
    assert Plan.load(out) == plan


@pytest.mark.parametrize("case", sorted(CASES))
def test_hooked_amp_scores_equal_brute_force_with_padding(case):
    model = family_model(case)
    family, dims = family_and_dims(model)
    gen = torch.Generator().manual_seed(3)
    samples = [torch.randint(4, 100, (n,), generator=gen) for n in (9, 5, 12, 7)]  # batches need padding
    calib = CalibrationSet(samples=samples, source="test", seq_len=12, seed=0)
    stats = collect_amp_stats(model, family, dims, calib, batch_size=3, pad_id=0, progress=False)
    heads, neurons = stats.scores()
    want_heads, want_neurons = brute_force_scores(model, samples)
    torch.testing.assert_close(heads, want_heads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(neurons, want_neurons, rtol=1e-5, atol=1e-6)
