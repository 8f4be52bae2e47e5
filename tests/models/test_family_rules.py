"""Phi, Phi-3 and Gemma-3 through the whole pipeline, and the config rules each family must respect."""

from __future__ import annotations

import pytest
from helpers import CASES, char_tokenizer, family_and_dims, random_plans, save_tiny, tiny_model
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM

import amprune.pipeline
from amprune.checkpoint import save_model
from amprune.cli import build_parser
from amprune.errors import AmpruneError
from amprune.models import loading, supported_model_types
from amprune.pipeline import PruneRequest, prune
from amprune.plan import make_budget
from amprune.surgery import apply_plan, unit_params

CALIB = dict(samples=4, seq_len=32, progress=False)
LONGROPE = dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
                                 "long_factor": [2.0, 2.5, 3.0, 3.5]},
                original_max_position_embeddings=64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prune_thirty_percent_end_to_end_and_reload(case, tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", case)
    result = prune(PruneRequest(recipe="paper",
                                out=str(tmp_path / "out"), model=folder, ratio=0.3, calib=calib_text, **CALIB))
    budget, after = result.plan.budget, result.plan.dims_after
    assert abs(budget.achieved_fraction - 0.3) < 0.05
    assert budget.heads_removed > 0 and budget.neurons_removed > 0
    reloaded = AutoModelForCausalLM.from_pretrained(result.out)  # prune() already compared its logits
    assert sum(p.numel() for p in reloaded.parameters()) == budget.params_after
    sizes = family_and_dims(reloaded)[0].sizes_config(reloaded.config)
    assert (sizes.num_attention_heads, sizes.num_key_value_heads, sizes.intermediate_size) == (
        after.num_heads, after.num_kv_heads, after.intermediate_size)


def test_phi3_longrope_head_pruning_is_refused_before_loading(tmp_path, calib_text, monkeypatch):
    folder = save_tiny(tmp_path / "dense", "phi3_gqa", **LONGROPE)
    monkeypatch.setattr(amprune.pipeline, "open_weights", lambda *a, **k: pytest.fail("the weights were opened"))
    message = (
        "cannot prune the attention heads of this 'phi3' model: Phi3Config requires its longrope "
        "short_factor/long_factor to have (hidden_size // num_attention_heads · partial_rotary_factor) / 2 = 4 "
        "entries, so a config with fewer heads fails to load; prune the MLP only with --mlp-ratio"
    )
    for request in (dict(ratio=0.3), dict(head_ratio=0.34, mlp_ratio=0.2)):
        with pytest.raises(AmpruneError) as err:
            prune(PruneRequest(recipe="paper",
                               out=str(tmp_path / "out"), model=folder, calib=calib_text, **request, **CALIB))
        assert str(err.value) == message


def test_phi3_longrope_rule_is_real_and_mlp_only_pruning_works(tmp_path, calib_text):
    model = tiny_model("phi3_gqa", **LONGROPE)
    fields = dict(model.config.to_dict(), num_attention_heads=4, head_dim=8)
    with pytest.raises(StrictDataclassClassValidationError, match="short_factor field must have length 6, got 4"):
        AutoConfig.for_model(**fields)  # what a head-pruned checkpoint's config would do on load
    folder = save_tiny(tmp_path / "dense", "phi3_gqa", **LONGROPE)
    result = prune(PruneRequest(recipe="paper",
                                out=str(tmp_path / "out"), model=folder, mlp_ratio=0.25, calib=calib_text, **CALIB))
    cfg = AutoConfig.from_pretrained(result.out)
    assert (cfg.num_attention_heads, cfg.intermediate_size) == (6, 30)
    assert cfg.rope_parameters["short_factor"] == [1.0, 1.1, 1.2, 1.3]


def test_phi_qk_layernorm_head_pruning_is_refused(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "phi", qk_layernorm=True)
    with pytest.raises(AmpruneError, match=r"^cannot prune the attention heads of this 'phi' model: its q/k "
                       r"LayerNorms are built with hidden_size // num_attention_heads channels, .*--mlp-ratio$"):
        prune(PruneRequest(recipe="paper",
                           out=str(tmp_path / "out"), model=folder, head_ratio=0.25, calib=calib_text, **CALIB))


def test_gemma_head_count_refused_by_its_config_is_steered_not_saved(tmp_path, calib_text):
    model = tiny_model("gemma3_mqa")
    family, dims = family_and_dims(model)
    accepted = family.accepted_head_counts(model.config)
    assert accepted == {1, 2, 4}  # 64 hidden: 3 heads are refused by Gemma3TextConfig
    total = sum(p.numel() for p in model.parameters())
    units = unit_params(family, family.decoder_layers(model)[0], dims)
    free = make_budget(dims, units, total, ratio=0.2)
    steered = make_budget(dims, units, total, ratio=0.2, accepted_heads=accepted)
    assert dims.num_heads - free.heads_removed == 3
    assert (dims.num_heads - steered.heads_removed, steered.neurons_removed) == (2, 18)
    assert free.notes == [] and steered.notes == [
        "the stock config accepts only [1, 2, 4] heads: keeping 2 heads per layer instead of 3 "
        "(the plan closest to --ratio 0.2)"
    ]

    result = prune(PruneRequest(recipe="paper",
                                out=str(tmp_path / "out"), model=save_tiny(tmp_path / "dense", "gemma3_mqa"),
                                ratio=0.2, calib=calib_text, **CALIB))
    assert result.plan.budget == steered
    assert AutoConfig.from_pretrained(result.out).num_attention_heads == 2

    three_heads = random_plans(dims)[0]  # one query head of four removed
    apply_plan(model, family, three_heads)
    with pytest.raises(AmpruneError, match=r"^a stock 'gemma3_text' config refuses 3 attention heads with hidden "
                       r"size 64; keep one of \[1, 2\] heads$"):
        save_model(model, char_tokenizer(), three_heads, family, tmp_path / "three", overwrite=False)
    assert not (tmp_path / "three").exists()


@pytest.mark.parametrize("case", ["gemma3_mqa", "gemma3_mm"])
def test_gemma_group_mode_is_refused_for_its_single_kv_head(case, tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", case)
    with pytest.raises(AmpruneError, match=r"^--gqa-mode group cannot prune heads of a model with a single KV head"):
        prune(PruneRequest(recipe="paper",
                           out=None, model=folder, ratio=0.3, gqa_mode="group", calib=calib_text, **CALIB))


def test_every_new_family_is_listed_in_help():
    help_text = " ".join(build_parser().format_help().split())
    listed = help_text.split("Families: ")[1].split(".")[0].split(", ")
    for model_type in ("phi", "phi3", "gemma3_text", "gemma3"):
        assert model_type in supported_model_types() and model_type in listed


def test_packaged_model_without_its_packages_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(loading.PACKAGED_GGUFS, "nothing-1m", ("amprune_no_such_package", "no-such==1.0"))
    with pytest.raises(AmpruneError) as err:
        loading.resolve_model("nothing-1m")
    assert str(err.value) == (
        "--model nothing-1m needs no-such==1.0 (`make setup` installs them): No module named 'amprune_no_such_package'"
    )
