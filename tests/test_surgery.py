"""The surgery contract, for every family: the sliced model computes exactly what the masked one does."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    CASES,
    assert_params_removed,
    family_and_dims,
    max_diff,
    plan_cases,
    random_plan,
    random_plans,
    tiny_model,
)

from amprune.surgery import apply_plan, mask_plan

PLAN_CASES = plan_cases()


def sliced_and_masked(case: str, plan_index: int, dtype: torch.dtype = torch.float32):
    model = tiny_model(case).to(dtype)
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_everything_is_the_identity(case):
    model = tiny_model(case)
    family, dims = family_and_dims(model)
    plan = random_plan(dims, "group" if dims.num_kv_heads > 1 else "query", 0, dims.intermediate_size, seed=0)
    sliced = copy.deepcopy(model)
    apply_plan(sliced, family, plan)
    ids = torch.arange(4, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(sliced(ids).logits, model(ids).logits)
