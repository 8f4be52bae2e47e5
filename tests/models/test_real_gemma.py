"""End to end on the real packaged Gemma-3-270M: prune 30 % through the CLI, reload with stock transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amprune.cli import main

pytestmark = pytest.mark.real


def test_prune_gemma3_270m_30_percent_and_reload(tmp_path, capsys):
    out = tmp_path / "gemma30"
    code = main(["--quiet", "prune", "--recipe", "paper",
                 "--model", "gemma3-270m", "--ratio", "0.3", "--samples", "4", "--seq-len", "64",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    plan = json.loads((out / "amprune_plan.json").read_text())
    assert (plan["dims_before"]["num_heads"], plan["dims_before"]["num_kv_heads"]) == (4, 1)
    # 30 % of all parameters is ~80 % of the decoder parameters (the 262k-token embedding is 63 % of the model):
    # one query head of four, 256 neurons of 2048; 640 % 1 == 0, so Gemma3TextConfig accepts it.
    assert plan["dims_after"] == dict(plan["dims_before"], num_heads=1, intermediate_size=256)
    assert abs(plan["budget"]["achieved_fraction"] - 0.3) < 5e-3

    model = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, nothing of ours
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "gemma3_text"
    assert sum(p.numel() for p in model.parameters()) == plan["budget"]["params_after"]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape == (1, ids.shape[1], 262144)
