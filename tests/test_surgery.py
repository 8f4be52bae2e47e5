"""The core equivalence: for any plan, the sliced model computes exactly what the masked model does."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CONFIGS, max_diff, tiny_config, tiny_model

from amprune.models import Dims, get_family
from amprune.plan import Budget, LayerPlan, Plan
from amprune.surgery import apply_plan, mask_plan, unit_params


def random_plan(dims: Dims, mode: str, heads_removed: int, neurons_kept: int, seed: int) -> Plan:
    """A uniform plan with random keep sets: `heads_removed` query heads per group (query mode) or
    KV groups (group mode) go in every layer, `neurons_kept` neurons stay."""
    gen = torch.Generator().manual_seed(seed)
    gs = dims.group_size
    layers = []
    for _ in range(dims.num_layers):
        if mode == "group":
            kv = sorted(torch.randperm(dims.num_kv_heads, generator=gen)[heads_removed:].tolist())
            heads = [g * gs + j for g in kv for j in range(gs)]
        else:
            kv = list(range(dims.num_kv_heads))
            heads = [g * gs + j for g in kv for j in sorted(torch.randperm(gs, generator=gen)[heads_removed:].tolist())]
        neurons = sorted(torch.randperm(dims.intermediate_size, generator=gen)[:neurons_kept].tolist())
        layers.append(LayerPlan(heads, kv, neurons, [0.0] * dims.num_heads, [0.0] * dims.intermediate_size))
    removed_heads = dims.num_heads - len(layers[0].heads_kept)
    removed_kv = dims.num_kv_heads - len(layers[0].kv_heads_kept)
    budget = Budget(mode, removed_heads, removed_kv, dims.intermediate_size - neurons_kept, 1, 1, None)
    return Plan(dims, budget, layers)


def random_plans(dims: Dims, seed: int = 0) -> list[Plan]:
    """Random uniform plans in every mode the model allows, including keeping a single unit."""
    out = []
    if dims.num_kv_heads > 1:  # whole KV groups (plain MHA: whole heads)
        out += [random_plan(dims, "group", 1, dims.intermediate_size // 2, seed),
                random_plan(dims, "group", dims.num_kv_heads - 1, 1, seed + 1)]
    if dims.group_size > 1:  # query heads inside every group (MQA: the only choice)
        out += [random_plan(dims, "query", 1, dims.intermediate_size - 3, seed + 2),
                random_plan(dims, "query", dims.group_size - 1, 1, seed + 3)]
    return out


def sliced_and_masked(case: str, plan_index: int):
    model = tiny_model(case)
    family = get_family(model.config.model_type)
    plan = random_plans(Dims.from_config(model.config), seed=plan_index)[plan_index]
    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    mask_plan(masked, family, plan)
    apply_plan(sliced, family, plan)
    return model, masked, sliced, plan, family


CASES = [(case, i) for case in sorted(TINY_CONFIGS)
         for i in range(len(random_plans(Dims.from_config(tiny_config(case)))))]


@pytest.mark.parametrize("case, plan_index", CASES)
def test_sliced_logits_equal_masked_logits(case, plan_index):
    dense, masked, sliced, _, _ = sliced_and_masked(case, plan_index)
    ids = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, original = masked(ids).logits, sliced(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, want)}")
    assert (original - want).abs().max() > 1e-3  # the plan really changed the model


def assert_params_removed(dense, sliced, plan: Plan, family) -> None:
    """The sliced model lost exactly the parameters of the dropped units, counted per unit."""
    dims, after = plan.dims, plan.dims_after
    units = unit_params(family, family.decoder_layers(dense)[0], dims)
    removed = dims.num_layers * (
        (dims.num_heads - after.num_heads) * units.head
        + (dims.num_kv_heads - after.num_kv_heads) * units.kv_head
        + (dims.intermediate_size - after.intermediate_size) * units.neuron
    )
    assert sum(p.numel() for p in sliced.parameters()) == sum(p.numel() for p in dense.parameters()) - removed


@pytest.mark.parametrize("case, plan_index", CASES)
def test_shapes_config_and_parameter_count_after_surgery(case, plan_index):
    dense, _, sliced, plan, family = sliced_and_masked(case, plan_index)
    assert_params_removed(dense, sliced, plan, family)
    dims, after = plan.dims, plan.dims_after
    cfg = sliced.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        after.num_heads, after.num_kv_heads, dims.head_dim, after.intermediate_size)
    for layer in family.decoder_layers(sliced):
        attn = layer.self_attn
        assert attn.q_proj.out_features == after.num_heads * dims.head_dim == attn.o_proj.in_features
        assert attn.k_proj.weight.shape == (after.num_kv_heads * dims.head_dim, dims.hidden_size)
        assert attn.num_key_value_groups == after.num_heads // after.num_kv_heads
        if attn.q_proj.bias is not None:
            assert attn.q_proj.bias.shape == (after.num_heads * dims.head_dim,)
        assert layer.mlp.down_proj.weight.shape == (dims.hidden_size, after.intermediate_size)


@pytest.mark.parametrize("case, plan_index", CASES)
def test_greedy_generation_with_kv_cache_matches_masked_model(case, plan_index):
    _, masked, sliced, _, _ = sliced_and_masked(case, plan_index)
    prompt = torch.tensor([[5, 17, 33, 9, 60]])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        got, want = sliced.generate(prompt, **kwargs), masked.generate(prompt, **kwargs)
    assert got.shape == (1, 13)
    assert got.tolist() == want.tolist()


def test_keep_everything_is_the_identity():
    model = tiny_model("qwen2")
    dims = Dims.from_config(model.config)
    plan = random_plan(dims, "group", 0, dims.intermediate_size, seed=0)
    sliced = copy.deepcopy(model)
    apply_plan(sliced, get_family("qwen2"), plan)
    ids = torch.arange(4, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(sliced(ids).logits, model(ids).logits)
