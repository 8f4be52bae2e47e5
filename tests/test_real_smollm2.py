"""End to end on the real packaged SmolLM2-135M-Instruct: prune 30 % through the CLI, reload stock."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amprune.cli import main

pytestmark = pytest.mark.real


def test_prune_smollm2_30_percent_and_reload(tmp_path, capsys):
    out = tmp_path / "smol30"
    code = main(["--quiet", "prune", "--recipe", "paper",
                 "--ratio", "0.3", "--samples", "4", "--seq-len", "64", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    plan = json.loads((out / "amprune_plan.json").read_text())
    assert plan["dims_before"]["num_heads"] == 9 and plan["dims_before"]["num_kv_heads"] == 3
    assert plan["dims_after"]["num_heads"] == 6 and plan["dims_after"]["num_kv_heads"] == 3  # 1 per KV group
    assert abs(plan["budget"]["achieved_fraction"] - 0.3) < 1e-3
    assert "(−29.9" in printed.out or "(−30.0" in printed.out

    model = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, nothing of ours
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama"  # 576 % 6 == 0: no Mistral fallback needed
    assert sum(p.numel() for p in model.parameters()) == plan["budget"]["params_after"]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape == (1, ids.shape[1], 49152)


def test_default_calibration_fits_the_packaged_c4_text():
    from amprune.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_set
    from amprune.models.loading import load_tokenizer, resolve_model

    calib = calibration_set("c4", load_tokenizer(resolve_model(None)), DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, seed=0)
    assert len(calib.samples) == DEFAULT_SAMPLES and calib.num_tokens == DEFAULT_SAMPLES * DEFAULT_SEQ_LEN
