"""FLAP bias compensation: the mean is preserved, zero biases keep the function, stock configs only."""

from __future__ import annotations

import pytest
import torch
from helpers import char_tokenizer, family_and_dims, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from amprune.calibration import calibration_set
from amprune.cli import main
from amprune.compensation import add_zero_biases, biased_config, biased_linears
from amprune.errors import AmpruneError
from amprune.models import get_family
from amprune.pipeline import PruneRequest, prune
from amprune.scoring import flap_compensation
from amprune.surgery import dropped_inputs


def test_compensation_preserves_the_mean_output():
    torch.manual_seed(0)
    x, weight = torch.randn(50, 6) + 2.0, torch.randn(3, 6)  # (T, C), (D, C)
    kept, dropped = [0, 2, 3], [1, 4, 5]
    pruned = x[:, kept] @ weight[:, kept].t() + flap_compensation(weight, x.mean(0), dropped)
    torch.testing.assert_close(pruned.mean(0), (x @ weight.t()).mean(0))


def test_zero_biases_keep_the_function_and_count():
    model = tiny_model("llama_gqa")  # 2 layers, H=6, G=2, d=8, D=48, I=40
    family = get_family("llama")
    probe = torch.randint(4, 100, (1, 12))
    before = model(probe).logits
    count = sum(p.numel() for p in model.parameters())
    names = biased_linears(biased_config(model.config, family), family)
    assert names == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    for layer in family.decoder_layers(model):
        add_zero_biases(layer, names)
    assert sum(p.numel() for p in model.parameters()) - count == 2 * ((6 + 2 * 2) * 8 + 2 * 40 + 2 * 48)
    torch.testing.assert_close(model(probe).logits, before)


@pytest.mark.parametrize("case", ["mistral", "qwen2"])
def test_refused_where_no_stock_bias_flag_exists(case):
    config = tiny_model(case).config
    with pytest.raises(AmpruneError, match=rf"^bias compensation needs o_proj and down_proj biases, which a stock "
                                           rf"'{case}' config cannot hold \(no standard flag adds them\); "
                                           r"prune without --correction bias$"):
        biased_config(config, get_family(case))


def test_prune_with_compensation_saves_a_stock_checkpoint(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "tiny", "llama_gqa")
    request = dict(model=folder, ratio=0.3, scorer="flap", calib=calib_text, samples=4, seq_len=32, progress=False)
    plain = prune(PruneRequest(recipe="paper", out=None, **request))
    result = prune(PruneRequest(recipe="paper",
                                out=str(tmp_path / "out"), correction="bias", keep_model=True, **request))  # + reload
    assert [lp.neurons_kept for lp in result.plan.layers] == [lp.neurons_kept for lp in plain.plan.layers]
    layer = result.model.model.layers[0]
    assert layer.self_attn.q_proj.bias.abs().sum() == 0 and layer.mlp.up_proj.bias.abs().sum() == 0
    # Layer 0 reads the embeddings in the dense model too: its o_proj bias is W[:, dropped] · E[x_dropped] there.
    dense = AutoModelForCausalLM.from_pretrained(folder)
    rows = []
    hook = dense.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0][0]))
    with torch.no_grad():
        for sample in calibration_set(calib_text, char_tokenizer(), 4, 32, 0).samples:
            dense(sample[None])
    hook.remove()
    dropped = dropped_inputs(result.plan.layers[0], family_and_dims(dense)[1])[0]
    expected = flap_compensation(dense.model.layers[0].self_attn.o_proj.weight, torch.cat(rows).mean(0), dropped)
    torch.testing.assert_close(layer.self_attn.o_proj.bias, expected, rtol=1e-4, atol=1e-6)
    assert layer.mlp.down_proj.bias.abs().sum() > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(reloaded.model.layers[0].mlp.down_proj.bias, layer.mlp.down_proj.bias)
    assert sum(p.numel() for p in reloaded.parameters()) == result.plan.budget.params_after


def test_compensation_and_reconstruction_refused_together(tmp_path, capsys):
    folder = save_tiny(tmp_path / "tiny", "llama_gqa")
    capsys.readouterr()
    code = main(["prune", "--recipe", "paper",
                 "--model", folder, "--ratio", "0.3", "--bias-compensation", "--reconstruct",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err == (
        "amprune: error: --reconstruct --bias-compensation cannot be combined that way; use --correction "
        "{none,bias,refit,refit-one-pass}\n"
    )
