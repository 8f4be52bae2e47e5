"""Shared fixtures: a local character tokenizer and tiny random models of every family (no downloads)."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 128
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

# Tiny configs per family; each case names what it exercises. Built fresh every time: transformers
# models share their config object by reference, and surgery mutates it.
TINY_CONFIGS = {
    "llama_mha": ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                intermediate_size=48)),
    "llama_gqa": ("llama", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                intermediate_size=40)),
    "mistral": ("mistral", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                intermediate_size=40, sliding_window=None)),
    "qwen2": ("qwen2", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            intermediate_size=40)),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character; ids below VOCAB; saves and reloads like any HF tokenizer."""
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(case: str, **overrides):
    model_type, sizes = TINY_CONFIGS[case]
    fields = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    fields.update(sizes)
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def random_model(config, seed: int = 0):
    """A model of `config` with deterministic weights large enough that every unit matters in the logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2 if param.dim() > 1 else 0.1)
    return model.eval()


def tiny_model(case: str, seed: int = 0, **overrides):
    return random_model(tiny_config(case, **overrides), seed)


def save_tiny(folder, case: str, seed: int = 0, **overrides) -> str:
    model = tiny_model(case, seed, **overrides)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def calib_text(tmp_path):
    """A local .txt calibration file long enough for a few 32-token samples."""
    path = tmp_path / "calib.txt"
    path.write_text(
        " ".join(f"The {w} jumps over {n} lazy dogs near the river bank." for n in range(40) for w in ("fox", "cat"))
    )
    return str(path)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}"
