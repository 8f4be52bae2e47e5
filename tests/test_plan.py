"""Budget arithmetic, unit selection and the plan's JSON round trip."""

from __future__ import annotations

import pytest
import torch

from amprune.errors import AmpruneError
from amprune.models.base import Dims
from amprune.plan import Budget, LayerPlan, Plan, UnitParams, make_budget, select_units

# LLaMA-2-7B, worked in paper.md §2.5: 32 layers, d 4096, 32 heads (MHA), d_i 11008, 6,738,415,616 params.
LLAMA2 = Dims(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=11008)
LLAMA2_UNITS = UnitParams(head=2 * 128 * 4096, kv_head=2 * 128 * 4096, neuron=3 * 4096)
LLAMA2_PARAMS = 6_738_415_616
LLAMA2_LAYER = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096  # one decoder layer, norms included

# SmolLM2-135M: 9 query heads in 3 KV groups, head_dim 64.
SMOL = Dims(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
SMOL_UNITS = UnitParams(head=2 * 64 * 576, kv_head=2 * 64 * 576, neuron=3 * 576)
SMOL_PARAMS = 134_515_008


@pytest.mark.parametrize(
    "layers_equivalent, heads, neurons, params_after",
    [(3, 3, 1032, None), (7, 7, 2408, None), (10, 10, 3440, 4_714_663_936), (17, 17, 5848, None)],
)
def test_paper_counts_for_llama2(layers_equivalent, heads, neurons, params_after):
    """The paper's ratios (k whole layers' worth of parameters) give its per-layer counts exactly."""
    ratio = layers_equivalent * LLAMA2_LAYER / LLAMA2_PARAMS
    budget = make_budget(LLAMA2, LLAMA2_UNITS, LLAMA2_PARAMS, "query", ratio=ratio)
    assert (budget.heads_removed, budget.kv_heads_removed, budget.neurons_removed) == (heads, heads, neurons)
    removed = 32 * (heads * (LLAMA2_UNITS.head + LLAMA2_UNITS.kv_head) + neurons * LLAMA2_UNITS.neuron)
    assert budget.params_after == LLAMA2_PARAMS - removed
    if params_after is not None:  # the released 30 % checkpoint: "4.71B params"
        assert budget.params_after == params_after
    assert abs(budget.achieved_fraction - ratio) < 1e-4


def test_ratio_is_closest_achievable_for_gqa_query_mode():
    budget = make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, "query", ratio=0.3)
    assert budget.heads_removed == 3 and budget.kv_heads_removed == 0  # one query head per KV group
    per_layer_target = 0.3 * SMOL_PARAMS / 30 - 3 * SMOL_UNITS.head
    assert budget.neurons_removed == round(per_layer_target / SMOL_UNITS.neuron)
    assert abs(budget.achieved_fraction - 0.3) < SMOL_UNITS.neuron * 30 / SMOL_PARAMS


def test_group_mode_removes_whole_kv_groups():
    budget = make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, "group", head_ratio=0.34, mlp_ratio=0.25)
    assert (budget.heads_removed, budget.kv_heads_removed, budget.neurons_removed) == (3, 1, 384)
    removed = 30 * (3 * SMOL_UNITS.head + SMOL_UNITS.kv_head + 384 * SMOL_UNITS.neuron)
    assert budget.params_after == SMOL_PARAMS - removed


def test_multi_head_attention_heads_are_groups_in_both_modes():
    mha = Dims(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=48)
    units = UnitParams(head=2 * 16 * 64, kv_head=2 * 16 * 64, neuron=3 * 64)
    budget = make_budget(mha, units, 100_000, "query", head_ratio=0.25)
    assert (budget.gqa_mode, budget.heads_removed, budget.kv_heads_removed) == ("group", 1, 1)


def test_accepted_head_counts_steer_the_ratio_and_the_head_ratio():
    mha = Dims(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=48)
    units = UnitParams(head=2 * 16 * 64, kv_head=2 * 16 * 64, neuron=3 * 64)
    budget = make_budget(mha, units, 30_000, "query", head_ratio=0.25, accepted_heads={1, 2, 4})
    assert budget.heads_removed == 0  # 3 heads refused: nearest accepted counts are 4 and 2, fewer removed wins
    assert budget.notes == ["the stock config accepts only [1, 2, 4] heads: keeping 4 heads per layer instead of 3"]
    budget = make_budget(mha, units, 30_000, "query", ratio=0.3, accepted_heads={1, 2, 4})
    assert 4 - budget.heads_removed in {1, 2, 4}


def test_head_ratio_rounded_to_a_coarse_gqa_step_says_so():
    budget = make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, "query", head_ratio=0.2)
    assert budget.heads_removed == 3  # one query head of each of the 3 groups: 33 %, not 20 %
    assert budget.notes == ["--gqa-mode query removes heads in steps of 3 per layer: --head-ratio 0.2 removes 3 of 9 "
                            "(33%)"]
    assert make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, "query", head_ratio=0.3).notes == []  # 3 of 9 is within a head
    assert make_budget(LLAMA2, LLAMA2_UNITS, LLAMA2_PARAMS, "query", head_ratio=0.3).notes == []  # 10 of 32


def test_round_to_keeps_a_multiple_of_n_neurons_closest_to_the_ratio():
    exact = make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, "query", ratio=0.3)
    rounded = make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, "query", ratio=0.3, round_to=64)
    assert (1536 - exact.neurons_removed, 1536 - rounded.neurons_removed) == (886, 896)  # 896 = 14 × 64
    assert rounded.heads_removed == exact.heads_removed == 3
    assert abs(rounded.achieved_fraction - 0.3) < 64 * SMOL_UNITS.neuron * 30 / SMOL_PARAMS
    explicit = make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, "query", mlp_ratio=0.3, round_to=64)
    assert 1536 - explicit.neurons_removed == 1088  # 0.7 × 1536 = 1075.2 → nearest multiple of 64
    assert make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, "query", mlp_ratio=0.3).neurons_removed == 461


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=1.0), "--ratio must be in [0, 1), got 1.0"),
        (dict(ratio=-0.1), "--ratio must be in [0, 1), got -0.1"),
        (dict(ratio=0.3, head_ratio=0.2), "give either --ratio or --head-ratio/--mlp-ratio, not both"),
        (dict(), "nothing to prune: give --ratio (or --head-ratio/--mlp-ratio)"),
        (dict(head_ratio=0.9), "--head-ratio 0.9 / --mlp-ratio 0.0 would remove every attention head of every layer"),
        (dict(mlp_ratio=0.9999), "would remove every MLP neuron of every layer (1536)"),
        (dict(ratio=0.95), "--ratio 0.95 would remove every attention head"),
        (dict(head_ratio=0.1, gqa_mode="group"), "--gqa-mode group cannot express --head-ratio 0.1"),
        (dict(ratio=0.2, gqa_mode="heads"), "unknown --gqa-mode 'heads'; choose one of: query, group"),
        (dict(ratio=0.2, round_to=0), "--round-to must be between 1 and 1536, got 0"),
    ],
)
def test_bad_requests_are_refused(kwargs, message):
    gqa_mode = kwargs.pop("gqa_mode", "query")
    with pytest.raises(AmpruneError) as err:
        make_budget(SMOL, SMOL_UNITS, SMOL_PARAMS, gqa_mode, **kwargs)
    assert message in str(err.value)


def test_group_mode_refuses_multi_query_attention():
    mqa = Dims(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=48)
    with pytest.raises(AmpruneError, match="single KV head"):
        make_budget(mqa, UnitParams(1, 1, 1), 10_000, "group", ratio=0.2)


def _budget(dims: Dims, mode: str, heads: int, kv: int, neurons: int) -> Budget:
    return Budget(mode, heads, kv, neurons, params_before=1, params_after=1, target_fraction=None)


def test_select_units_drops_the_lowest_scores():
    dims = Dims(num_layers=1, hidden_size=8, num_heads=6, num_kv_heads=2, head_dim=2, intermediate_size=5)
    heads = torch.tensor([[5.0, 1.0, 3.0, 0.5, 4.0, 2.0]])  # group 0: heads 0-2, group 1: heads 3-5
    neurons = torch.tensor([[0.3, 0.1, 0.9, 0.1, 0.5]])
    (query,) = select_units(heads, neurons, dims, _budget(dims, "query", 2, 0, 2))
    assert query.heads_kept == [0, 2, 4, 5] and query.kv_heads_kept == [0, 1]
    assert query.neurons_kept == [0, 2, 4]  # tie 0.1/0.1 at 1 and 3: both go
    (group,) = select_units(heads, neurons, dims, _budget(dims, "group", 3, 1, 1))
    assert group.heads_kept == [0, 1, 2] and group.kv_heads_kept == [0]  # 9.0 > 6.5
    assert group.neurons_kept == [0, 2, 3, 4]  # stable tie-break: the lower index goes first
    assert query.head_scores == heads[0].tolist()


def test_plan_json_round_trip(tmp_path):
    dims = Dims(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=3)
    layers = [
        LayerPlan([1], [0], [0, 2], [0.1, 0.2], [1.0, 0.5, 2.0]),
        LayerPlan([0], [0], [1, 2], [0.3, 0.2], [0.0, 1.0, 2.0]),
    ]
    plan = Plan(dims, _budget(dims, "query", 1, 0, 1), layers, settings={"seed": 3}, versions={"torch": "x"})
    plan.save(tmp_path)
    again = Plan.load(tmp_path)
    assert again == plan
    assert again.dims_after == Dims(2, 8, 1, 1, 4, 2)
    raw = (tmp_path / "amprune_plan.json").read_text()
    for key in ('"heads_kept"', '"neurons_kept"', '"head_scores"', '"neuron_scores"'):
        assert key in raw
    with pytest.raises(AmpruneError, match=r"no amprune_plan\.json in"):
        Plan.load(tmp_path / "missing")
