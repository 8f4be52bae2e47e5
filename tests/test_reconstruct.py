"""Reconstruction: closed-form least squares against brute force, exact cases, guarantees, bad input."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import (
    budget_for,
    family_and_dims,
    max_diff,
    random_plan,
    random_samples,
    run_engine,
    save_tiny,
    tiny_model,
)
from transformers import AutoModelForCausalLM

from amprune.cli import main
from amprune.engine import Run, RunResult
from amprune.errors import AmpruneError
from amprune.models import Dims, get_family
from amprune.pipeline import PruneRequest, prune
from amprune.plan import LayerPlan, Plan, make_budget
from amprune.reconstruct import DEFAULT_DAMPING, IllConditionedError, NormalEquations, refit
from amprune.report import plan_summary
from amprune.surgery import apply_plan, unit_params


def _equations(x: torch.Tensor, kept: list[int], weight: torch.Tensor, bias: torch.Tensor | None) -> NormalEquations:
    """The statistics of re-fitting the kept columns of the layer (weight, bias) to its own outputs on x."""
    eqs = NormalEquations.zeros(kept, weight.shape[0])
    eqs.add(x, x @ weight.T + (0 if bias is None else bias))
    return eqs


def _plan(model, heads_kept: list[int], neurons_kept: list[int], head_ratio: float, mlp_ratio: float) -> Plan:
    """The same keep lists in every layer, with the budget that removes that many units."""
    family = get_family(model.config.model_type)
    dims = Dims.from_config(model.config)
    units = unit_params(family, family.decoder_layers(model)[0], dims)
    total = sum(p.numel() for p in model.parameters())
    budget = make_budget(dims, units, total, "query", None, head_ratio, mlp_ratio)
    kv = sorted({h // dims.group_size for h in heads_kept})
    layer = LayerPlan(heads_kept, kv, neurons_kept, [0.0] * dims.num_heads, [0.0] * dims.intermediate_size)
    plan = Plan(dims, budget, [copy.deepcopy(layer) for _ in range(dims.num_layers)])
    assert plan.dims_after.num_heads == len(heads_kept) and plan.dims_after.intermediate_size == len(neurons_kept)
    return plan


def reconstruct(model, plan: Plan, lengths: list[int], batch_size: int = 2, damping: float = DEFAULT_DAMPING,
                seed: int = 0) -> RunResult:
    """The engine's re-fit of `model` in place, on exactly `plan`'s units (two streams: the dense one is
    not needed to choose them), on random samples of the given lengths."""
    run = Run("amp", plan.budget, "refit", given=plan.layers)
    (result,) = run_engine(model, random_samples(lengths, seed), [run], batch_size, keep_layers=True, damping=damping)
    return result


def one_pass(model, budget, lengths: list[int], scorer: str = "amp", seed: int = 0) -> RunResult:
    """The engine's one-pass re-fit of `model` in place: `scorer` chooses every layer on the pruned stream."""
    (result,) = run_engine(model, random_samples(lengths, seed), [Run(scorer, budget, "refit-one-pass")],
                           keep_layers=True)
    return result


@pytest.mark.parametrize("with_bias", [False, True])
def test_refit_is_the_damped_least_squares_solution(with_bias):
    torch.manual_seed(0)
    x = torch.randn(300, 12) @ torch.randn(12, 12) + 0.5  # correlated channels with a mean
    weight, bias = torch.randn(5, 12), (torch.randn(5) if with_bias else None)
    kept = [0, 2, 3, 5, 7, 8, 11]
    gram = _equations(x, kept, weight, bias)
    target = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    inputs = x.double()[:, kept]
    if with_bias:
        inputs = torch.cat([inputs, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    # Brute force, no damping: ordinary least squares on the kept channels (plus the constant).
    expected = torch.linalg.lstsq(inputs, target).solution.T
    new_weight, new_bias = refit(weight, bias, gram, damping=0.0)
    assert torch.allclose(new_weight.double(), expected[:, : len(kept)], atol=1e-4), max_diff(new_weight, expected)
    if with_bias:
        assert torch.allclose(new_bias.double(), expected[:, -1], atol=1e-4)
    # Damped: the ridge solution pulled towards the plain-surgery weights, from its normal equations.
    lam = 0.3 * gram.xtx.diagonal().mean()
    start = torch.cat([weight[:, kept], bias[:, None]], 1).double() if with_bias else weight[:, kept].double()
    eye = torch.eye(inputs.shape[1], dtype=torch.float64)
    ridge = torch.linalg.solve(inputs.T @ inputs + lam * eye, inputs.T @ target + lam * start.T).T
    new_weight, new_bias = refit(weight, bias, gram, damping=0.3)
    assert torch.allclose(new_weight.double(), ridge[:, : len(kept)], atol=1e-4)


@pytest.mark.parametrize("damping", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_refit_error_never_exceeds_plain_surgery(damping, with_bias):
    torch.manual_seed(1)
    x = torch.randn(200, 10) @ torch.randn(10, 10)
    weight, bias = torch.randn(4, 10), (torch.randn(4) if with_bias else None)
    kept = [1, 2, 4, 6, 9]
    gram = _equations(x, kept, weight, bias)
    new_weight, new_bias = refit(weight, bias, gram, damping)

    def brute(w_k, b):
        out = x[:, kept] @ w_k.T + (0 if b is None else b)
        target = x @ weight.T + (0 if bias is None else bias)
        return ((out - target).pow(2).sum() / target.pow(2).sum()).item()

    surgery, refitted = brute(weight[:, kept], bias), brute(new_weight, new_bias)
    assert gram.relative_error(weight[:, kept], bias) == pytest.approx(surgery, rel=1e-4)
    assert gram.relative_error(new_weight, new_bias) == pytest.approx(refitted, rel=1e-4, abs=1e-9)
    assert refitted <= surgery
    assert refitted < 0.9 * surgery  # correlated channels: the re-fit recovers a good part


def test_refit_refuses_singular_and_zero_systems():
    weight = torch.randn(3, 4)
    x = torch.randn(50, 4)
    x[:, 1] = x[:, 0]  # two identical kept channels: singular without damping
    with pytest.raises(IllConditionedError, match=r"singular|ill-conditioned"):
        refit(weight, None, _equations(x, [0, 1, 2], weight, None), damping=0.0)
    x[:, :3] = 0  # the kept channels never fire
    with pytest.raises(IllConditionedError, match="all zero"):
        refit(weight, None, _equations(x, [0, 1, 2], weight, None))


def test_nothing_pruned_returns_the_original_weights():
    model = tiny_model("llama_gqa")
    original = {name: p.clone() for name, p in model.named_parameters()}
    plan = _plan(model, list(range(6)), list(range(40)), 0.0, 0.0)
    reconstruct(model, plan, [20, 32, 32])
    for name, param in model.named_parameters():
        assert torch.equal(param, original[name]), name


def _make_redundant(model) -> None:
    """In every layer, head 2 duplicates head 0, head 5 duplicates head 3 (same KV group, same queries), and
    neurons 30..39 are fixed multiples of neurons 0..9: the removed units are linear in the kept ones."""
    family = get_family(model.config.model_type)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in family.decoder_layers(model):
            q = layer.self_attn.q_proj.weight  # (H·d, D), d = 8
            q[16:24] = q[0:8]
            q[40:48] = q[24:32]
            mlp = layer.mlp
            mlp.gate_proj.weight[30:40] = mlp.gate_proj.weight[0:10]
            mlp.up_proj.weight[30:40] = mlp.up_proj.weight[0:10] * torch.randn(10, 1, generator=generator)


def test_removed_units_that_are_linear_in_kept_ones_are_reconstructed_exactly():
    model = tiny_model("llama_gqa")  # 6 heads in 2 KV groups, 40 neurons, 2 layers
    _make_redundant(model)
    family = get_family("llama")
    plan = _plan(model, [0, 1, 3, 4], list(range(30)), 1 / 3, 0.25)
    probe = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        dense = model(probe).logits
        plain = copy.deepcopy(model)
        apply_plan(plain, family, plan)
        assert (plain(probe).logits - dense).abs().max() > 0.1  # plain surgery loses the removed units
        reconstruct(model, plan, [40, 33, 40, 25, 40, 40], batch_size=4, damping=0.0)
        assert [p.shape for p in model.parameters()] == [p.shape for p in plain.parameters()]
        assert torch.allclose(model(probe).logits, dense, atol=1e-3), max_diff(model(probe).logits, dense)


def test_report_matches_brute_force_and_refit_beats_surgery_in_every_layer():
    model = tiny_model("qwen2")  # q/k/v biases; 4 heads in 2 KV groups, 40 neurons
    family = get_family("qwen2")
    dense = copy.deepcopy(model)
    plan = _plan(model, [0, 2], sorted([*range(0, 40, 2), 1, 3, 5]), 0.5, 0.425)
    lengths = [30, 24, 30, 17, 30]
    errors = reconstruct(model, plan, lengths).errors
    assert [layer["layer"] for layer in errors] == [0, 1]
    for layer in errors:
        for proj in ("o_proj", "down_proj"):
            assert layer[proj]["refit"] <= layer[proj]["surgery"], layer
    # Layer 0's o_proj sees the same input in the dense and the pruned model: check the numbers directly.
    rows = []
    hook = family.o_proj(family.decoder_layers(dense)[0]).register_forward_pre_hook(lambda m, a: rows.append(a[0][0]))
    with torch.no_grad():
        for sample in random_samples(lengths).samples:  # one at a time: no padding at all
            dense(sample[None])
    hook.remove()
    x = torch.cat(rows)  # (tokens, H·d)
    kept = [c for h in plan.layers[0].heads_kept for c in range(h * 8, h * 8 + 8)]
    w_dense = family.o_proj(family.decoder_layers(dense)[0]).weight
    w_new = family.o_proj(family.decoder_layers(model)[0]).weight
    target = x @ w_dense.T
    with torch.no_grad():
        surgery = ((x[:, kept] @ w_dense[:, kept].T - target).pow(2).sum() / target.pow(2).sum()).item()
        refitted = ((x[:, kept] @ w_new.T - target).pow(2).sum() / target.pow(2).sum()).item()
    assert errors[0]["o_proj"]["surgery"] == pytest.approx(surgery, rel=1e-3)
    assert errors[0]["o_proj"]["refit"] == pytest.approx(refitted, rel=1e-3)


def test_dead_kept_channels_warn_naming_the_layer_and_keep_surgery_weights(caplog):
    model = tiny_model("llama_gqa")
    family = get_family("llama")
    plan = _plan(model, [0, 1, 3, 4], list(range(30)), 1 / 3, 0.25)
    layer1 = family.decoder_layers(model)[1]
    with torch.no_grad():
        layer1.mlp.up_proj.weight[:30] = 0  # layer 1's kept neurons never fire
    expected = layer1.mlp.down_proj.weight[:, :30].clone()
    with caplog.at_level(logging.WARNING, logger="amprune.reconstruct"):
        reconstruct(model, plan, [24, 24])
    assert "reconstruction of layer 1 down_proj skipped, plain surgery weights kept" in caplog.text
    assert "all zero" in caplog.text
    assert torch.equal(layer1.mlp.down_proj.weight, expected)


def test_prune_with_reconstruct_saves_a_stock_checkpoint_with_the_plan(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    common = dict(model=folder, head_ratio=1 / 3, mlp_ratio=0.25, calib=calib_text, samples=4, seq_len=32,
                  progress=False)
    plain = prune(PruneRequest(recipe="paper", out=None, **common))
    result = prune(PruneRequest(recipe="paper", out=str(tmp_path / "pruned"), correction="refit", **common))
    assert result.plan.layers == plain.plan.layers  # the same units go; only o_proj/down_proj differ
    assert result.plan.settings["correction"] == "refit"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    shapes = {n: p.shape for n, p in plain.model.named_parameters()}
    assert {n: p.shape for n, p in reloaded.named_parameters()} == shapes
    changed = {n for n, p in reloaded.named_parameters() if not torch.equal(p, dict(plain.model.named_parameters())[n])}
    assert changed == {f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")}
    saved = Plan.load(tmp_path / "pruned")
    assert saved.settings["reconstruction"]["damping"] == 0.01
    assert len(saved.settings["reconstruction"]["relative_calibration_error"]) == 2


# Families with biases on o_proj/down_proj and parallel blocks (phi), post-block norms, sliding-window
# and global layers with their own masks and rotary tables (gemma3_mqa): GQA mode and heads to remove.
REFIT_FAMILIES = {"llama_gqa": ("query", 1), "qwen2": ("query", 1), "phi": ("group", 1), "gemma3_mqa": ("query", 2)}


@pytest.mark.parametrize("case", sorted(REFIT_FAMILIES))
def test_last_layer_error_matches_the_dense_layer_run_on_the_pruned_stream(case):
    """End to end through capture, replay and slicing, with the Family accessors only: the reported
    re-fit error of the last o_proj equals a brute-force comparison with the dense layer run on the
    inputs the pruned model gives it."""
    model = tiny_model(case)
    mode, heads_removed = REFIT_FAMILIES[case]
    family, dims = family_and_dims(model)
    plan = random_plan(dims, mode, heads_removed, dims.intermediate_size // 2, seed=1)
    plan.budget = budget_for(model, mode, head_ratio=heads_removed / (dims.group_size if mode == "query" else
                                                                       dims.num_kv_heads), mlp_ratio=0.5)
    dense = copy.deepcopy(model)
    lengths = [30, 21, 30]
    errors = reconstruct(model, plan, lengths, seed=2).errors
    plain = copy.deepcopy(dense)
    apply_plan(plain, family, plan)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    for layer in errors:
        assert layer[family.o]["refit"] <= layer[family.o]["surgery"]
        assert layer[family.down]["refit"] <= layer[family.down]["surgery"]

    pruned_layer, dense_layer = family.decoder_layers(model)[-1], family.decoder_layers(dense)[-1]
    seen: dict = {}
    hooks = [
        pruned_layer.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True),
        family.o_proj(pruned_layer).register_forward_hook(lambda m, a, out: seen.update(pruned=out)),
        family.o_proj(dense_layer).register_forward_hook(lambda m, a, out: seen.update(dense=out)),
    ]
    error = energy = 0.0
    with torch.no_grad():
        for sample in random_samples(lengths, seed=2).samples:  # one at a time: no padding
            model(sample[None], use_cache=False)
            dense_layer(*seen["args"], **seen["kwargs"])
            error += (seen["pruned"] - seen["dense"]).double().pow(2).sum().item()
            energy += seen["dense"].double().pow(2).sum().item()
    for hook in hooks:
        hook.remove()
    assert errors[-1][family.o]["refit"] == pytest.approx(error / energy, rel=1e-3)



def _brute_force_amp(layer_in: list[tuple], dense_layer, pruned_layer, family, num_heads: int, head_dim: int):
    """AMP scores of `dense_layer` on the given (args, kwargs) inputs, one unpadded sample each: heads on its
    own attention, neurons on the MLP input the pruned layer computes (after its re-fitted attention)."""
    seen: dict = {}
    hooks = [
        family.o_proj(dense_layer).register_forward_pre_hook(lambda m, a: seen.update(o_in=a[0])),
        family.down_proj(dense_layer).register_forward_pre_hook(lambda m, a: seen.update(down_in=a[0])),
        family.mlp_block(pruned_layer).register_forward_pre_hook(lambda m, a: seen.update(mlp_in=a[0])),
    ]
    o_weight = family.o_proj(dense_layer).weight.double()
    heads, neurons = torch.zeros(num_heads, dtype=torch.float64), 0.0
    with torch.no_grad():
        for args, kwargs in layer_in:
            dense_layer(*args, **kwargs)  # its o_proj input: the dense heads on the pruned stream
            pruned_layer(*args, **kwargs)  # its MLP input
            family.mlp_block(dense_layer)(seen["mlp_in"])
            h = seen["o_in"][0].double()  # (T, H·d)
            for n in range(num_heads):
                block = slice(n * head_dim, (n + 1) * head_dim)
                heads[n] += (h[:, block] @ o_weight[:, block].T).abs().sum(-1).mean()
            neurons = neurons + seen["down_in"][0].double().abs().mean(0)
    for hook in hooks:
        hook.remove()
    return heads / len(layer_in), neurons / len(layer_in)


@pytest.mark.parametrize("case", sorted(REFIT_FAMILIES))
def test_one_pass_scores_every_layer_on_the_pruned_stream(case):
    """One-pass mode: the last layer's AMP scores equal a brute-force computation with the dense layer on
    the inputs the pruned layers before it give (padding excluded), and it keeps the lowest-scoring units."""
    model = tiny_model(case)
    mode = REFIT_FAMILIES[case][0]
    family, dims = family_and_dims(model)
    dense = copy.deepcopy(model)
    budget = budget_for(model, mode, head_ratio=0.25, mlp_ratio=0.3)
    lengths = [30, 21, 30]
    result = one_pass(model, budget, lengths, seed=2)
    assert len(result.layers) == dims.num_layers
    assert sum(p.numel() for p in model.parameters()) == budget.params_after

    pruned_layer, dense_layer = family.decoder_layers(model)[-1], family.decoder_layers(dense)[-1]
    layer_in: list[tuple] = []
    hook = pruned_layer.register_forward_pre_hook(lambda m, a, kw: layer_in.append((a, kw)), with_kwargs=True)
    with torch.no_grad():
        for sample in random_samples(lengths, seed=2).samples:  # one at a time: no padding
            model(sample[None], use_cache=False)
    hook.remove()
    heads, neurons = _brute_force_amp(layer_in, dense_layer, pruned_layer, family, dims.num_heads, dims.head_dim)
    last = result.layers[-1]
    assert torch.allclose(torch.tensor(last.head_scores, dtype=torch.float64), heads, rtol=1e-4)
    assert torch.allclose(torch.tensor(last.neuron_scores, dtype=torch.float64), neurons, rtol=1e-4)
    assert last.neurons_kept == sorted(neurons.argsort(stable=True)[budget.neurons_removed :].tolist())
    (on_dense,) = run_engine(dense, random_samples(lengths, seed=2), [Run("amp", budget)])
    dense_heads = torch.tensor(on_dense.layers[-1].head_scores, dtype=torch.float64)
    assert not torch.allclose(dense_heads, heads, rtol=1e-2)  # the dense model's own stream gives other scores


def test_prune_one_pass_saves_a_stock_checkpoint_and_its_first_heads_match_the_dense_scores(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    common = dict(model=folder, head_ratio=1 / 3, mlp_ratio=0.25, calib=calib_text, samples=4, seq_len=32,
                  progress=False)
    plain = prune(PruneRequest(recipe="paper", out=None, **common))
    result = prune(PruneRequest(recipe="paper", out=str(tmp_path / "pruned"), correction="refit-one-pass", **common))
    # layer 0 sees the same embeddings either way: the same head scores, so the same heads
    assert result.plan.layers[0].head_scores == pytest.approx(plain.plan.layers[0].head_scores, rel=1e-5)
    assert result.plan.layers[0].heads_kept == plain.plan.layers[0].heads_kept
    saved = Plan.load(tmp_path / "pruned")
    assert saved.layers == result.plan.layers
    assert saved.settings["correction"] == "refit-one-pass"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    shapes = {n: p.shape for n, p in plain.model.named_parameters()}
    assert {n: p.shape for n, p in reloaded.named_parameters()} == shapes
    flap = prune(PruneRequest(recipe="paper", out=None, correction="refit-one-pass", scorer="flap", **common))
    assert sum(p.numel() for p in flap.model.parameters()) == flap.plan.budget.params_after


def test_one_pass_bad_inputs(tmp_path, calib_text, capsys):
    common = dict(out=None, model=save_tiny(tmp_path / "dense", "llama_gqa"), ratio=0.2, calib=calib_text)
    args = ["--quiet", "prune", "--recipe", "paper",
            "--model", common["model"], "--ratio", "0.2", "--out", str(tmp_path / "o")]
    assert main([*args, "--one-pass"]) == 2  # the deprecated flag alone meant nothing
    assert "--one-pass cannot be combined that way; use --correction {none,bias,refit,refit-one-pass}" in (
        capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
    with pytest.raises(AmpruneError, match=r"^--correction refit-one-pass cannot use --scorer taylor: it needs the "
                       r"whole model's gradients$"):
        prune(PruneRequest(recipe="paper", correction="refit-one-pass", scorer="taylor", **common))
    with pytest.raises(AmpruneError, match=r"^unknown scorer 'nope'; choose from: amp, reversed, random, magnitude, "
                       r"wanda_sp, flap, obs$"):  # the scorers one pass can run
        prune(PruneRequest(recipe="paper", correction="refit-one-pass", scorer="nope", **common))


def _damped_refit_error(x: torch.Tensor, weight: torch.Tensor, kept: list[int], lam: float) -> float:
    """Brute force: the least-squares error of re-fitting the columns `kept` of `weight` to x Wᵀ, with the
    damping λ as √λ·I rows appended to x (the objective the obs scorer's damped Gram matrix describes)."""
    rows = torch.cat([x, lam**0.5 * torch.eye(x.shape[1], dtype=x.dtype)])
    target = rows @ weight.T
    fit = rows[:, kept] @ torch.linalg.lstsq(rows[:, kept], target).solution
    return (fit - target).pow(2).sum().item()


@pytest.mark.parametrize("case", sorted(REFIT_FAMILIES))
def test_one_pass_obs_removes_the_heads_the_refit_misses_least(case):
    """`--scorer obs`: layer 0 (the embeddings feed it either way) loses, step by step, the head (or KV
    group) whose removal leaves the smallest damped re-fit error of the dense o_proj on its inputs — brute
    force from hooked inputs, one unpadded sample at a time — taking the same number from every KV group."""
    model = tiny_model(case)
    mode = REFIT_FAMILIES[case][0]
    family, dims = family_and_dims(model)
    budget = budget_for(model, mode, head_ratio=0.5, mlp_ratio=0.3)
    lengths = [30, 21, 30]
    o_proj = family.o_proj(family.decoder_layers(model)[0])
    seen: list[torch.Tensor] = []
    hook = o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].double()))
    with torch.no_grad():
        for sample in random_samples(lengths, seed=2).samples:
            model(sample[None], use_cache=False)
    hook.remove()
    x, weight = torch.cat(seen), o_proj.weight.detach().double()
    channels = dims.num_heads * dims.head_dim
    if o_proj.bias is not None:  # the constant channel: never removed, re-fitted like a column
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        weight = torch.cat([weight, o_proj.bias.detach().double()[:, None]], 1)
    lam = 0.01 * x[:, :channels].pow(2).sum(0).mean().item()
    if mode == "group":
        unit_heads = [list(range(g * dims.group_size, (g + 1) * dims.group_size)) for g in range(dims.num_kv_heads)]
        removals, group_of = budget.kv_heads_removed, list(range(dims.num_kv_heads))
    else:
        unit_heads = [[h] for h in range(dims.num_heads)]
        removals, group_of = budget.heads_removed, [h // dims.group_size for h in range(dims.num_heads)]
    assert removals >= 1
    removed: list[int] = []
    for _ in range(removals):  # greedy, round robin over the groups
        taken = [sum(group_of[r] == group_of[u] for r in removed) for u in range(len(unit_heads))]
        least = min(taken[u] for u in range(len(unit_heads)) if u not in removed)
        errors = {}
        for u in range(len(unit_heads)):
            if u not in removed and taken[u] == least:
                gone = {h for r in [*removed, u] for h in unit_heads[r]}
                kept = [c for c in range(x.shape[1]) if c >= channels or c // dims.head_dim not in gone]
                errors[u] = _damped_refit_error(x, weight, kept, lam)
        removed.append(min(errors, key=errors.get))
    expected = sorted(set(range(dims.num_heads)) - {h for r in removed for h in unit_heads[r]})

    plan = one_pass(model, budget, lengths, scorer="obs", seed=2)
    assert plan.layers[0].heads_kept == expected
    for step, unit in enumerate(removed):  # the plan's scores are the removal order
        assert [plan.layers[0].head_scores[h] for h in unit_heads[unit]] == [step] * len(unit_heads[unit])
    assert [len(layer.neurons_kept) for layer in plan.layers] == [dims.intermediate_size - budget.neurons_removed] * 2
    assert sum(p.numel() for p in model.parameters()) == budget.params_after


def test_prune_one_pass_obs_saves_a_stock_checkpoint(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    result = prune(PruneRequest(recipe="paper",
                                out=str(tmp_path / "pruned"), model=folder, ratio=0.3, calib=calib_text, samples=4,
                                seq_len=32, progress=False, correction="refit-one-pass", scorer="obs", keep_model=True))
    saved = Plan.load(tmp_path / "pruned")
    assert saved.settings["method"] == "obs" and saved.layers == result.plan.layers
    for layer in saved.layers:  # the removed units are the lowest scores, in removal order 0, 1, …
        removed = sorted(set(range(len(layer.neuron_scores))) - set(layer.neurons_kept))
        assert sorted(layer.neuron_scores[i] for i in removed) == list(range(len(removed)))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    probe = torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        expected, got = result.model(probe).logits, reloaded(probe).logits
    assert torch.allclose(got, expected, atol=1e-5), max_diff(got, expected)


def _layer_outputs(model, layer_index: int, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """Decoder layer `layer_index`'s output hidden states on each sample (one at a time: no padding)."""
    family = get_family(model.config.model_type)
    seen = []
    hook = family.decoder_layers(model)[layer_index].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        for sample in samples:
            model(sample[None], use_cache=False)
    hook.remove()
    return seen


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2", "phi"])
def test_toward_dense_blends_the_mlp_target_with_the_dense_stream(case):
    """α = 0 is today's re-fit; layer 0 sees the dense stream itself (its heads all kept, so the dense and
    the aimed-at outputs coincide) and is re-fitted alike for every α; at α = 1 the last layer's output
    lands nearer the dense model's than at α = 0 (the fit's own objective, up to the damping)."""
    model = tiny_model(case)
    family, dims = family_and_dims(model)
    plan = random_plan(dims, "query", 0, dims.intermediate_size // 2, seed=1)
    plan.budget = budget_for(model, "query", head_ratio=0.0, mlp_ratio=0.5)
    lengths = [30, 21, 30]
    models = {}
    for alpha in (0.0, 0.5, 1.0):
        models[alpha] = copy.deepcopy(model)
        run = Run("amp", plan.budget, "refit", given=plan.layers)
        run_engine(models[alpha], random_samples(lengths, 2), [run], keep_layers=True, toward_dense=alpha)
    plain = copy.deepcopy(model)
    run_engine(plain, random_samples(lengths, 2), [Run("amp", plan.budget, "refit", given=plan.layers)],
               keep_layers=True)
    first = [family.down_proj(family.decoder_layers(m)[0]).weight for m in (models[0.0], models[0.5], models[1.0])]
    assert torch.equal(first[0], family.down_proj(family.decoder_layers(plain)[0]).weight)
    assert torch.allclose(first[1], first[0], atol=1e-5) and torch.allclose(first[2], first[0], atol=1e-5)
    last = [family.down_proj(family.decoder_layers(m)[-1]).weight for m in (models[0.0], models[1.0])]
    assert (last[0] - last[1]).abs().max() > 1e-3

    samples = random_samples(lengths, 2).samples
    dense = _layer_outputs(model, -1, samples)
    distance = {alpha: sum((got - want).double().pow(2).sum().item() for got, want in
                           zip(_layer_outputs(models[alpha], -1, samples), dense, strict=True))
                for alpha in (0.0, 1.0)}
    assert distance[1.0] < 0.9 * distance[0.0], distance


def test_toward_dense_bad_inputs(tmp_path, calib_text):
    common = dict(out=None, ratio=0.2, calib=calib_text, samples=4, seq_len=32, progress=False)
    llama = save_tiny(tmp_path / "llama", "llama_gqa")
    with pytest.raises(AmpruneError, match=r"^--toward-dense must be between 0 and 1, got 1\.5$"):
        prune(PruneRequest(model=llama, toward_dense=1.5, **common))
    with pytest.raises(AmpruneError, match=r"^--toward-dense sets the re-fit's target, and --correction none "
                       r"re-fits nothing: use --correction refit-one-pass or refit$"):
        prune(PruneRequest(model=llama, recipe="paper", toward_dense=0.25, **common))
    with pytest.raises(AmpruneError, match=r"^--toward-dense: gemma3 normalises each MLP output before adding it "
                       r"to the residual stream, so a re-fit cannot move the stream towards the dense model's$"):
        prune(PruneRequest(model=save_tiny(tmp_path / "gemma", "gemma3_mqa"), toward_dense=0.25, **common))


def test_prune_toward_dense_records_it_and_saves_a_stock_checkpoint(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    result = prune(PruneRequest(out=str(tmp_path / "pruned"), model=folder, ratio=0.3, calib=calib_text, samples=8,
                                heldout=64, seq_len=32, toward_dense=0.25, progress=False,
                                keep_model=True))
    saved = Plan.load(tmp_path / "pruned")
    assert saved.settings["reconstruction"]["toward_dense"] == 0.25
    assert "--round-to 8, --toward-dense 0.25" in plan_summary(saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    probe = torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        expected, got = result.model(probe).logits, reloaded(probe).logits
    assert torch.allclose(got, expected, atol=1e-5), max_diff(got, expected)
