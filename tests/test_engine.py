"""The layer engine: lazily loaded weights ≡ the whole model in memory, for every family, GQA mode,
scorer and correction; sharded ≡ single-file input; hidden states on disk ≡ in RAM; bfloat16 end to end;
the engine's plain AMP is the plan's plain surgery."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    CASES,
    assert_same_checkpoint,
    budget_for,
    char_tokenizer,
    family_and_dims,
    random_plan,
    random_plans,
    random_samples,
    run_engine,
    save_tiny,
    tensors,
    tiny_model,
)
from transformers import AutoModelForCausalLM

from amprune import pipeline
from amprune.engine import Run
from amprune.pipeline import PruneRequest, prune
from amprune.surgery import apply_plan
from amprune.weights import Checkpoint, NoSafetensorsError

CALIB = dict(samples=4, seq_len=32, batch_size=3, progress=False)  # batches of 3 and 1: padding-free but uneven


def whole_model(monkeypatch) -> list:
    """Make `prune` load the whole model into memory (as for a checkpoint without safetensors); the
    returned list records every refusal."""
    refused = []

    def refuse(*args, **kwargs):
        refused.append(args)
        raise NoSafetensorsError("forced by the test")

    monkeypatch.setattr(pipeline, "Checkpoint", refuse)
    return refused


# Every family with each correction; group mode where a family has several KV groups.
ENGINE_CASES = [(case, "query", correction, "amp") for case in sorted(CASES)
                for correction in ("none", "refit", "refit-one-pass")]
ENGINE_CASES += [(case, "group", "refit", "amp") for case in ("llama_gqa", "mistral", "qwen2", "phi3_gqa")]
ENGINE_CASES += [("llama_gqa", "query", "refit-one-pass", "obs"), ("phi3_gqa", "group", "refit-one-pass", "obs"),
                 ("llama_mha", "query", "bias", "flap"), ("phi", "query", "bias", "amp")]
ENGINE_CASES += [("llama_gqa", "query", "none", scorer) for scorer in ("reversed", "random", "magnitude", "wanda_sp",
                                                                       "flap")]
ENGINE_CASES += [("qwen2", "group", "refit-one-pass", scorer) for scorer in ("wanda_sp", "random")]


@pytest.mark.parametrize("case, gqa_mode, correction, scorer", ENGINE_CASES)
def test_lazy_weights_give_the_same_checkpoint_as_the_whole_model(case, gqa_mode, correction, scorer, tmp_path,
                                                                  calib_text, monkeypatch):
    folder = save_tiny(tmp_path / "dense", case)
    request = dict(model=folder, ratio=0.3, gqa_mode=gqa_mode, correction=correction, scorer=scorer,
                   calib=calib_text, **CALIB)
    lazy = prune(PruneRequest(recipe="paper", out=str(tmp_path / "lazy"), **request))
    with monkeypatch.context() as patch:
        refused = whole_model(patch)
        whole = prune(PruneRequest(recipe="paper", out=str(tmp_path / "whole"), **request))
    assert len(refused) == 1
    assert lazy.plan.budget.heads_removed + lazy.plan.budget.neurons_removed > 0
    assert lazy.memory["hidden_place"] == "ram" and whole.plan.layers == lazy.plan.layers
    assert_same_checkpoint(lazy.out, whole.out)


def test_taylor_runs_on_the_whole_model_and_says_so(tmp_path, calib_text, caplog):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    result = prune(PruneRequest(recipe="paper",
                                out=str(tmp_path / "out"), model=folder, ratio=0.3, scorer="taylor", calib=calib_text,
                                **CALIB))
    assert "gradients" in result.seconds and result.plan.settings["method"] == "taylor"
    reloaded = AutoModelForCausalLM.from_pretrained(result.out)
    assert sum(p.numel() for p in reloaded.parameters()) == result.plan.budget.params_after


def test_taylor_that_cannot_fit_is_refused_before_loading(tmp_path, calib_text, monkeypatch):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    monkeypatch.setattr(pipeline.psutil, "virtual_memory", lambda: type("M", (), {"available": 1000})())
    monkeypatch.setattr(pipeline, "open_weights", lambda *a, **k: pytest.fail("the weights were opened"))
    with pytest.raises(pipeline.AmpruneError, match=r"^--scorer taylor needs the whole model's gradients in memory "
                       r"\(about 0\.0 GiB, 0\.0 GiB available\); use a forward-only scorer such as amp$"):
        prune(PruneRequest(recipe="paper",
                           out=str(tmp_path / "out"), model=folder, ratio=0.3, scorer="taylor", calib=calib_text,
                           **CALIB))


def test_plain_amp_slices_exactly_as_the_plan_says(tmp_path, calib_text):
    """The engine's plain surgery is `apply_plan` of its own plan on the dense model."""
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    result = prune(PruneRequest(recipe="paper",
                                out=str(tmp_path / "out"), model=folder, ratio=0.3, calib=calib_text, **CALIB))
    dense = AutoModelForCausalLM.from_pretrained(folder)
    family, _ = family_and_dims(dense)
    apply_plan(dense, family, result.plan)
    saved = tensors(result.out)
    for name, param in dense.named_parameters():
        assert torch.equal(saved[name], param), name


def test_a_sharded_checkpoint_gives_what_one_file_gives(tmp_path, calib_text):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    save_tiny(single, "llama_gqa")
    tiny_model("llama_gqa").save_pretrained(sharded, max_shard_size="20KB")
    char_tokenizer().save_pretrained(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    request = dict(ratio=0.3, correction="refit", calib=calib_text, **CALIB)
    one = prune(PruneRequest(recipe="paper", out=str(tmp_path / "one"), model=str(single), **request))
    many = prune(PruneRequest(recipe="paper", out=str(tmp_path / "many"), model=str(sharded), **request))
    assert_same_checkpoint(one.out, many.out, atol=0.0)


def test_hidden_states_on_disk_give_what_ram_gives(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "qwen2")
    request = dict(model=folder, ratio=0.3, correction="refit", calib=calib_text, **CALIB)
    ram = prune(PruneRequest(recipe="paper", out=str(tmp_path / "ram"), hidden_states="ram", **request))
    disk = prune(PruneRequest(recipe="paper", out=str(tmp_path / "disk"), hidden_states="disk", **request))
    assert (ram.memory["hidden_place"], disk.memory["hidden_place"]) == ("ram", "disk")
    assert disk.memory["hidden_bytes"] == ram.memory["hidden_bytes"] > 0
    assert_same_checkpoint(ram.out, disk.out, atol=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "dense", "disk", "ram"]  # no spill left
    assert not list(disk.out.glob(".hidden-*"))


def _separated(case: str) -> torch.nn.Module:
    """A model whose units' AMP scores are far apart: head n's o_proj columns and neuron m's down_proj
    column are scaled by distinct factors, so bfloat16 rounding cannot reorder them."""
    model = tiny_model(case)
    family, dims = family_and_dims(model)
    with torch.no_grad():
        for layer in family.decoder_layers(model):
            heads = torch.arange(1, dims.num_heads + 1, dtype=torch.float32).repeat_interleave(dims.head_dim)
            family.o_proj(layer).weight.mul_(heads.pow(2))
            family.down_proj(layer).weight.mul_(torch.linspace(0.1, 10.0, dims.intermediate_size))
    return model


@pytest.mark.parametrize("correction", ["none", "refit"])
def test_bfloat16_prunes_in_its_dtype_and_chooses_what_float32_chooses(correction, tmp_path, calib_text):
    model = _separated("llama_gqa")
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype).save_pretrained(tmp_path / str(dtype))
        char_tokenizer().save_pretrained(tmp_path / str(dtype))
    request = dict(ratio=0.3, correction=correction, calib=calib_text, **CALIB)
    full = prune(PruneRequest(recipe="paper",
                              out=str(tmp_path / "f32"), model=str(tmp_path / str(torch.float32)), **request))
    half = prune(PruneRequest(recipe="paper",
                              out=str(tmp_path / "bf16"), model=str(tmp_path / str(torch.bfloat16)), **request))
    assert [layer.heads_kept for layer in half.plan.layers] == [layer.heads_kept for layer in full.plan.layers]
    assert [layer.neurons_kept for layer in half.plan.layers] == [layer.neurons_kept for layer in full.plan.layers]
    assert half.plan.settings["dtype"] == "bfloat16" and half.plan.settings["compute_dtype"] in ("bfloat16", "float32")
    assert {t.dtype for t in tensors(half.out).values()} == {torch.bfloat16}
    assert json.loads((half.out / "config.json").read_text())["dtype"] == "bfloat16"


def test_layer_by_layer_reads_only_one_layer(tmp_path):
    """Opening reads the shell alone; each layer comes from disk on demand and goes back to meta."""
    folder = save_tiny(tmp_path / "dense", "gemma3_mm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    checkpoint = Checkpoint(folder, model.config, torch.device("cpu"))
    shell = checkpoint.shell()
    family, _ = family_and_dims(shell)
    layers = family.decoder_layers(shell)
    assert all(p.is_meta for p in layers.parameters())
    assert not any(p.is_meta for name, p in shell.named_parameters() if ".layers." not in name)
    layer = checkpoint.load_layer(1)
    want = dict(family.decoder_layers(model)[1].named_parameters())
    for name, param in layer.named_parameters():
        assert torch.equal(param, want[name]), name
    assert all(p.is_meta for p in layers[0].parameters())
    checkpoint.release_layer(1)
    assert all(p.is_meta for p in layers.parameters())


def test_given_keep_lists_are_applied_and_refitted():
    """A run with the units chosen already (a saved plan) re-fits on exactly those."""
    model = tiny_model("llama_gqa")
    _, dims = family_and_dims(model)
    plan = random_plan(dims, "query", 1, 30, seed=2)
    budget = budget_for(model, head_ratio=0.34, mlp_ratio=0.25)
    dense = copy.deepcopy(model)
    (result,) = run_engine(model, random_samples([20, 20, 20]), [Run("amp", budget, "refit", given=plan.layers)],
                           keep_layers=True)
    assert result.layers == plan.layers
    assert all(errors["o_proj"]["refit"] <= errors["o_proj"]["surgery"] for errors in result.errors)
    assert model.config.intermediate_size == 30 and dense.config.intermediate_size == 40


@pytest.mark.parametrize("case", ["llama_gqa", "phi", "gemma3_mqa"])
@pytest.mark.parametrize("correction", ["none", "refit"])
def test_a_dropped_layer_passes_the_stream_by(case, correction):
    """A run dropping layer 0 keeps layer 1, fed the embeddings directly: without re-fit the result is the
    plan's plain surgery; with re-fit, layer 1's o_proj is fitted on that stream (its error is reported)."""
    model = tiny_model(case)
    family, dims = family_and_dims(model)
    plan = random_plans(dims, seed=4)[-1]
    plain = copy.deepcopy(model)
    apply_plan(plain, family, plan)
    (result,) = run_engine(model, random_samples([20, 20]), [Run("amp", plan.budget, correction, given=plan.layers)],
                           keep_layers=True)
    assert len(family.decoder_layers(model)) == 1 and family.sizes_config(model.config).num_hidden_layers == 1
    got, want = dict(model.named_parameters()), dict(plain.named_parameters())
    assert {n: p.shape for n, p in got.items()} == {n: p.shape for n, p in want.items()}
    refitted = {n for n in got if not torch.equal(got[n], want[n])}
    if correction == "none":
        assert refitted == set() and result.errors == []
    else:
        assert refitted and all(family.o in n or family.down in n for n in refitted)
        assert [e["layer"] for e in result.errors] == [1]
    ids = torch.randint(4, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # the KV cache follows the renumbering
