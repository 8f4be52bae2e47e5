"""Saving: stock reload with identical logits, the LLaMA→Mistral case, atomicity, output-folder rules."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_CONFIGS, char_tokenizer, tiny_model
from test_surgery import random_plan
from transformers import AutoConfig, AutoModelForCausalLM

from amprune.checkpoint import check_output_dir, save_checkpoint, verify_reload
from amprune.errors import AmpruneError
from amprune.models import Dims, get_family
from amprune.plan import Plan
from amprune.surgery import apply_plan


def pruned(case: str, heads_removed: int = 1, mode: str = "group"):
    model = tiny_model(case)
    family = get_family(model.config.model_type)
    dims = Dims.from_config(model.config)
    plan = random_plan(dims, mode, heads_removed, dims.intermediate_size - 5, seed=4)
    apply_plan(model, family, plan)
    return model, family, plan


@pytest.mark.parametrize("case", sorted(TINY_CONFIGS))
def test_save_then_stock_reload_gives_identical_config_and_logits(case, tmp_path):
    model, family, plan = pruned(case)
    out = save_checkpoint(model, char_tokenizer(), plan, family, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    after = plan.dims_after
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        after.num_heads, after.num_kv_heads, after.head_dim, after.intermediate_size)
    saved, mine = _settings(cfg), _settings(model.config)  # the whole config
    assert saved == _settings(reloaded.config)
    differ = {k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k)}
    if cfg.model_type == model.config.model_type:
        assert differ <= {"architectures"}
    else:  # saved as an equivalent family (next test): only LLaMA's no-op switches are missing from it
        assert differ == {"architectures", "model_type", "attention_bias", "mlp_bias", "pretraining_tp"}
        assert (mine["attention_bias"], mine["mlp_bias"], mine["pretraining_tp"]) == (False, False, 1)
    assert Plan.load(out) == plan
    assert verify_reload(model, out, ids) == 0.0


def _settings(config) -> dict:
    """A config's every setting, except where it was loaded from and the dtype it was loaded in."""
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "dtype", "torch_dtype")}


def test_llama_head_count_refused_by_llama_config_is_saved_as_mistral(tmp_path):
    """64 hidden, 4 heads → 3 heads: LlamaConfig refuses it; the checkpoint becomes an equivalent Mistral."""
    model, family, plan = pruned("llama_mha", heads_removed=1)
    assert plan.dims_after.num_heads == 3 and 64 % 3 != 0
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        copy.deepcopy(model.config).save_pretrained(tmp_path / "refused")
    out = save_checkpoint(model, char_tokenizer(), plan, family, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "mistral" and saved["architectures"] == ["MistralForCausalLM"]
    assert saved["sliding_window"] is None and saved["num_attention_heads"] == 3 and saved["head_dim"] == 16
    assert Plan.load(out).settings["saved_as"] == "mistral"
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
    family = get_family("llama")
    plan = random_plan(Dims.from_config(model.config), "group", 1, 40, seed=0)
    apply_plan(model, family, plan)
    out = save_checkpoint(model, char_tokenizer(), plan, family, tmp_path / "out")
    assert verify_reload(model, out, torch.arange(4, 100).unsqueeze(0), atol=1e-5) <= 1e-5


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
        save_checkpoint(model, tokenizer, plan, family, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    monkeypatch.undo()
    save_checkpoint(model, tokenizer, plan, family, out, overwrite=True)
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
