"""Writing checkpoints: stock reload with identical logits for every family, LLaMA→Mistral, shards,
atomicity, output-folder rules."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import CASES, char_tokenizer, family_and_dims, random_plan, random_plans, tiny_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from amprune import checkpoint
from amprune.checkpoint import CheckpointWriter, check_output_dir, save_model, verify_reload
from amprune.errors import AmpruneError
from amprune.plan import Plan
from amprune.surgery import apply_plan, mask_plan


def pruned(case: str, plan_index: int = 0):
    model = tiny_model(case)
    family, dims = family_and_dims(model)
    plan = random_plans(dims, seed=4)[plan_index]
    apply_plan(model, family, plan)
    return model, family, plan


def _savable(case: str) -> bool:
    """Gemma refuses 3 of 4 heads (see tests/models/test_family_rules.py): its first plan cannot be saved."""
    _, family, plan = pruned(case)
    accepted = family.accepted_head_counts(tiny_model(case).config)
    return accepted is None or plan.dims_after.num_heads in accepted


def _settings(config) -> dict:
    """A config's every setting, except where it was loaded from and the dtype it was loaded in."""
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "dtype", "torch_dtype")}


@pytest.mark.parametrize("case", [case for case in sorted(CASES) if _savable(case)])
def test_save_then_stock_reload_gives_identical_config_and_logits(case, tmp_path):
    model, family, plan = pruned(case)
    out = save_model(model, char_tokenizer(), plan, family, tmp_path / "out", overwrite=False)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    after = plan.dims_after
    cfg = family.sizes_config(AutoConfig.from_pretrained(out))
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        after.num_heads, after.num_kv_heads, after.head_dim, after.intermediate_size)
    saved, mine = _settings(AutoConfig.from_pretrained(out)), _settings(model.config)  # the whole config
    assert saved == _settings(reloaded.config)
    differ = {k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k)}
    if saved["model_type"] == model.config.model_type:
        assert differ <= {"architectures"}
    else:  # saved as an equivalent family (next test): only LLaMA's no-op switches are missing from it
        assert differ == {"architectures", "model_type", "attention_bias", "mlp_bias", "pretraining_tp"}
        assert (mine["attention_bias"], mine["mlp_bias"], mine["pretraining_tp"]) == (False, False, 1)
    assert Plan.load(out) == plan
    with torch.no_grad():
        expected = model(ids).logits
    assert verify_reload(out, ids, expected, torch.float32, torch.device("cpu")) == 0.0


def test_llama_head_count_refused_by_llama_config_is_saved_as_mistral(tmp_path):
    """64 hidden, 4 heads → 3 heads: LlamaConfig refuses it; the checkpoint becomes an equivalent Mistral."""
    model, family, plan = pruned("llama_mha")
    assert plan.dims_after.num_heads == 3 and 64 % 3 != 0
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        copy.deepcopy(model.config).save_pretrained(tmp_path / "refused")
    out = save_model(model, char_tokenizer(), plan, family, tmp_path / "out", overwrite=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "mistral" and saved["architectures"] == ["MistralForCausalLM"]
    assert saved["sliding_window"] is None and saved["num_attention_heads"] == 3 and saved["head_dim"] == 16
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    prompt = torch.tensor([[5, 17, 33, 9, 60, 7, 7, 12]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, model(prompt).logits, atol=1e-6, rtol=0)
        kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert reloaded.generate(prompt, **kwargs).tolist() == model.generate(prompt, **kwargs).tolist()


def test_llama3_rope_scaling_survives_the_mistral_conversion(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model("llama_mha", rope_parameters=rope)
    family, dims = family_and_dims(model)
    plan = random_plan(dims, "group", 1, 40, seed=0)
    apply_plan(model, family, plan)
    out = save_model(model, char_tokenizer(), plan, family, tmp_path / "out", overwrite=False)
    ids = torch.arange(4, 100).unsqueeze(0)
    with torch.no_grad():
        expected = model(ids).logits
    assert verify_reload(out, ids, expected, torch.float32, torch.device("cpu"), atol=1e-5) <= 1e-5


def test_shards_follow_the_index_layout_and_reload(tmp_path, monkeypatch):
    """Past the shard size the weights go to model-0000k-of-0000N.safetensors files with the standard index."""
    model, family, plan = pruned("llama_gqa")
    monkeypatch.setattr(checkpoint, "SHARD_SIZE", 20_000)  # bytes: a few tensors per shard
    out = save_model(model, char_tokenizer(), plan, family, tmp_path / "out", overwrite=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    stored = {}
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            stored.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    assert set(stored) == set(index["weight_map"]) == set(dict(model.named_parameters()))
    for name, param in model.named_parameters():
        assert torch.equal(stored[name], param), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(4, 30).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_layer_of_the_wrong_shape_is_refused_and_nothing_is_left(tmp_path):
    dense = tiny_model("mistral")
    model, family, _ = pruned("mistral")
    writer = CheckpointWriter(tmp_path / "out", False, dense.config, torch.float32, family.layers + ".")
    writer.write_shell(model)
    with pytest.raises(RuntimeError, match=r"self_attn.q_proj.weight \(16, 32\) torch.float32, expected .* \(32, 32\)"):
        writer.write_layer(0, family.decoder_layers(model)[0])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_the_output_folder_untouched(tmp_path, monkeypatch):
    model, family, plan = pruned("mistral")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old checkpoint")
    tokenizer = char_tokenizer()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tokenizer, plan, family, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    monkeypatch.undo()
    save_model(model, tokenizer, plan, family, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "amprune_plan.json").is_file()


def test_output_folder_rules(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(AmpruneError, match="is not empty; pass --overwrite to replace it"):
        check_output_dir(tmp_path / "full", overwrite=False)
    check_output_dir(tmp_path / "full", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AmpruneError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file", overwrite=True)
    with pytest.raises(AmpruneError, match="is not a writable folder"):
        check_output_dir(tmp_path / "missing" / "deeper" / "out", overwrite=False)
    check_output_dir(tmp_path / "empty", overwrite=False)


def test_a_model_too_large_for_memory_is_checked_with_disk_offload(tmp_path, monkeypatch, caplog):
    model, family, plan = pruned("llama_gqa")
    out = save_model(model, char_tokenizer(), plan, family, tmp_path / "out", overwrite=False)
    ids = torch.arange(4, 30).unsqueeze(0)
    with torch.no_grad():
        expected = model(ids).logits
    monkeypatch.setattr(checkpoint, "fits_in_memory", lambda nbytes: False)
    with caplog.at_level("WARNING"):
        assert verify_reload(out, ids, expected, torch.float32, torch.device("cpu"), budget=30_000) == 0.0
    assert "offloaded to the disk" in caplog.text  # accelerate's device map kept most weights on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the offload folder is gone


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_dropped_layer_reloads_stock_and_every_per_layer_setting_follows(case, tmp_path):
    """Dropping the first layer: the config keeps one layer and the remaining layer's entry of every per-layer
    list (Gemma's sliding/full `layer_types`), and stock transformers computes what the masked model does."""
    model = tiny_model(case)
    family, dims = family_and_dims(model)
    plan = random_plans(dims, seed=4)[-1]
    assert plan.budget.layers_dropped == (0,)
    masked = copy.deepcopy(model)
    mask_plan(masked, family, plan)
    apply_plan(model, family, plan)
    out = save_model(model, char_tokenizer(), plan, family, tmp_path / "out", overwrite=False)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    saved = family.sizes_config(AutoConfig.from_pretrained(out))
    dense = family.sizes_config(tiny_model(case).config)
    assert saved.num_hidden_layers == 1 == len(family.decoder_layers(reloaded))
    if hasattr(dense, "layer_types"):
        assert saved.layer_types == dense.layer_types[1:]
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, masked(ids).logits, atol=1e-5, rtol=0)
