"""Recovery: LoRA training lowers the loss; merged checkpoints are stock and exact; bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import char_tokenizer, max_diff, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from amprune.checkpoint import save_model
from amprune.cli import main
from amprune.errors import AmpruneError
from amprune.models import get_family
from amprune.pipeline import PruneRequest, prune
from amprune.plan import PLAN_FILE, Plan
from amprune.recovery import (
    RecoverRequest,
    add_lora,
    count_steps,
    distillation_loss,
    recover,
    target_modules,
    train,
    training_windows,
)


def _windows(count: int = 4, length: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, 100, (count, length), generator=generator)


def test_lora_targets_every_projection_of_the_family():
    assert target_modules(get_family("llama")) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]


def test_training_lowers_the_loss():
    model = add_lora(tiny_model("llama_gqa"), get_family("llama"), RecoverRequest(model="", out=None, dropout=0.0))
    windows = _windows()
    request = RecoverRequest(model="", out=None, lr=1e-2, batch_size=2, progress=False)
    losses = train(model, windows, steps=8, request=request)
    assert len(losses) == 8
    assert losses[-1] < 0.9 * losses[0], losses
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # only the adapters learn


def test_distillation_loss_is_the_token_mean_kl_from_teacher_to_student():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=generator), torch.randn(2, 3, 7, generator=generator)
    p, q = teacher.softmax(-1), student.softmax(-1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()  # 6 tokens
    assert torch.allclose(distillation_loss(student, teacher), by_hand, atol=1e-6)
    assert distillation_loss(teacher, teacher).abs() < 1e-6


def test_distillation_starts_at_zero_from_itself_and_moves_towards_another_teacher():
    request = RecoverRequest(model="", out=None, lr=1e-2, batch_size=2, distill=True, progress=False)
    itself = tiny_model("llama_gqa").requires_grad_(False)
    model = add_lora(tiny_model("llama_gqa"), get_family("llama"), request)
    assert train(model, _windows(), steps=1, request=request, teacher=itself)[0] < 1e-6  # LoRA starts as a no-op
    other = tiny_model("llama_gqa", seed=1).requires_grad_(False)
    model = add_lora(tiny_model("llama_gqa"), get_family("llama"), request)
    losses = train(model, _windows(), steps=8, request=request, teacher=other)
    assert losses[-1] < 0.8 * losses[0], losses


def test_merged_checkpoint_loads_stock_and_equals_the_unmerged_model(tmp_path):
    base = tiny_model("mistral")
    probe = _windows(2, 16)
    with torch.no_grad():
        base_logits = base(probe).logits
    request = RecoverRequest(model="", out=None, lr=1e-2, progress=False)
    model = add_lora(base, get_family("mistral"), request)
    train(model, _windows(), steps=4, request=request)
    with torch.no_grad():
        unmerged = model(probe).logits
    assert (unmerged - base_logits).abs().max() > 1e-2  # the adapters changed the model
    merged = model.merge_and_unload()
    save_model(merged, char_tokenizer(), None, get_family("mistral"), tmp_path / "out", overwrite=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not (tmp_path / "out" / PLAN_FILE).exists()
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        logits = reloaded(probe).logits
    assert torch.allclose(logits, unmerged, atol=1e-5), max_diff(logits, unmerged)


def test_step_count_follows_epochs_and_bounds():
    request = RecoverRequest(model="", out=None, epochs=2, batch_size=3, seq_len=10)
    assert count_steps(10, request) == 6  # 3 full batches per epoch
    request.max_steps = 5
    assert count_steps(10, request) == 5
    request.max_tokens = 65  # 2 steps of 3 × 10 tokens fit
    assert count_steps(10, request) == 2


def test_training_windows_come_from_the_calibration_half():
    tokenizer = char_tokenizer()
    windows = training_windows(tokenizer, "c4", 64)
    assert windows.shape[1] == 64 and len(windows) > 100
    both = training_windows(tokenizer, "c4,wiki", 64)
    assert torch.equal(both, torch.cat([windows, training_windows(tokenizer, "wiki", 64)]))
    with pytest.raises(AmpruneError, match="unknown recovery text 'alpaca'; choose from: mix, c4, wiki"):
        training_windows(tokenizer, "c4,alpaca", 64)


def test_mix_trains_on_every_packaged_text_equally():
    tokenizer = char_tokenizer()
    c4, wiki = (training_windows(tokenizer, name, 64) for name in ("c4", "wiki"))
    mix = training_windows(tokenizer, "mix", 64)
    count = min(len(c4), len(wiki))
    assert len(mix) == 2 * count and len(c4) != len(wiki)
    longer = max(c4, wiki, key=len)
    spread = torch.linspace(0, len(longer) - 1, count).round().long()
    assert torch.equal(mix, torch.cat([w if len(w) == count else w[spread] for w in (c4, wiki)]))
    assert torch.equal(mix[count], wiki[0]) and torch.equal(mix[-1], wiki[-1])  # from first to last window


@pytest.fixture
def pruned_folder(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    prune(PruneRequest(recipe="paper", out=str(tmp_path / "pruned"), model=folder, head_ratio=1 / 3, mlp_ratio=0.25,
                       calib=calib_text, samples=4, seq_len=32, progress=False))
    return tmp_path / "pruned"


def test_recover_end_to_end_carries_the_plan_over(tmp_path, pruned_folder):
    out = tmp_path / "recovered"
    result = recover(RecoverRequest(model=str(pruned_folder), out=str(out), seq_len=32, max_steps=3, lr=1e-2,
                                    progress=False))
    assert len(result.losses) == 3
    plan = Plan.load(out)
    assert plan.layers == Plan.load(pruned_folder).layers
    settings = plan.settings["recovery"]
    assert (settings["steps"], settings["tokens"], settings["rank"], settings["alpha"]) == (3, 96, 8, 16.0)
    assert settings["text"] == "mix" and settings["text_part"] == "calibration"
    assert settings["losses"] == [round(loss, 4) for loss in result.losses]
    before = AutoModelForCausalLM.from_pretrained(pruned_folder)
    after = AutoModelForCausalLM.from_pretrained(out)
    assert {n: p.shape for n, p in after.named_parameters()} == {n: p.shape for n, p in before.named_parameters()}


def test_distillation_end_to_end_uses_the_dense_model_of_the_plan(tmp_path, pruned_folder):
    # one text, so that four steps' losses compare (mix alternates two domains of different difficulty)
    result = recover(RecoverRequest(model=str(pruned_folder), out=str(tmp_path / "out"), seq_len=32, max_steps=4,
                                    lr=1e-2, distill=True, calib="c4", progress=False))
    settings = Plan.load(tmp_path / "out").settings
    assert settings["recovery"]["teacher"] == settings["model"] == str(tmp_path / "dense")
    assert settings["recovery"]["loss"].startswith("distillation")
    assert result.losses[-1] < result.losses[0], result.losses


def test_folder_without_plan_is_recovered_with_a_warning(tmp_path, caplog):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    with caplog.at_level(logging.WARNING, logger="amprune.recovery"):
        result = recover(RecoverRequest(model=folder, out=str(tmp_path / "out"), seq_len=32, max_steps=1,
                                        progress=False))
    assert f"has no {PLAN_FILE} (not written by `amprune prune`): recovering it anyway" in caplog.text
    assert result.plan is None and not (tmp_path / "out" / PLAN_FILE).exists()


def test_cli_bad_inputs(tmp_path, pruned_folder, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases = [
        (["--out", str(busy)], f"--out {busy} is not empty; pass --overwrite to replace it"),
        (["--out", str(tmp_path / "a"), "--seq-len", "10000000"],
         "recovery text 'mix' gives 0 windows of --seq-len 10000000 tokens, too few for one step of --batch-size 1"),
        (["--out", str(tmp_path / "a"), "--seq-len", "32", "--max-tokens", "31"], "within --max-tokens"),
        (["--out", str(tmp_path / "a"), "--rank", "0"], "argument --rank: must be positive, got 0"),
        (["--out", str(tmp_path / "a"), "--dropout", "1"], "argument --dropout: must be in [0, 1), got 1"),
        (["--out", str(tmp_path / "a"), "--text", "poems"], "unknown recovery text 'poems'"),
        (["--out", str(tmp_path / "a"), "--teacher", str(pruned_folder)],
         "--teacher is the model to distil from: pass --distill too"),
        (["--out", str(tmp_path / "a"), "--distill", "--teacher",
          save_tiny(tmp_path / "other", "llama_gqa", vocab_size=96)],
         "has a vocabulary of 96 tokens, the model 128: distillation needs the same tokenizer"),
    ]
    for extra, message in cases:
        assert main(["--quiet", "recover", "--model", str(pruned_folder), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    dense = save_tiny(tmp_path / "no-plan", "llama_gqa")
    assert main(["--quiet", "recover", "--model", dense, "--out", str(tmp_path / "a"), "--distill"]) == 2
    assert f"{dense} has no amprune plan naming the dense model: pass --teacher MODEL" in capsys.readouterr().err
