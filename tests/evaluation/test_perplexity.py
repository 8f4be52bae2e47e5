"""Perplexity equals a brute-force token-by-token computation; windows, tokens and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import char_tokenizer, tiny_model

from amprune.errors import AmpruneError
from amprune.evaluation import perplexity

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 2  # 172 tokens


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def brute_force_nll(model, ids: list[int], seq_len: int, windows: int) -> float:
    """Mean NLL of every token but the first of each window, one forward pass per predicted token."""
    total, count = 0.0, 0
    for w in range(windows):
        window = ids[w * seq_len : (w + 1) * seq_len]
        for t in range(1, seq_len):
            with torch.no_grad():
                logits = model(torch.tensor([window[:t]])).logits[0, -1].double()
            total -= logits.log_softmax(-1)[window[t]].item()
            count += 1
    return total / count


def test_perplexity_equals_brute_force(text_file):
    model, tokenizer = tiny_model("llama_gqa", seed=2), char_tokenizer()
    # 3 windows in batches of 2: a full batch and a partial one
    result = perplexity(model, tokenizer, text_file, seq_len=16, max_windows=3, batch_size=2, progress=False)
    assert (result["windows"], result["tokens"], result["seq_len"]) == (3, 3 * 15, 16)
    nll = brute_force_nll(model, tokenizer(TEXT)["input_ids"], 16, 3)
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_all_full_windows_are_used_and_the_tail_dropped(text_file):
    result = perplexity(tiny_model("llama_gqa"), char_tokenizer(), text_file, seq_len=50, progress=False)
    assert (result["windows"], result["tokens"]) == (len(TEXT) // 50, len(TEXT) // 50 * 49)


def test_text_shorter_than_one_window(text_file):
    with pytest.raises(AmpruneError) as err:
        perplexity(tiny_model("llama_gqa"), char_tokenizer(), text_file, seq_len=256, progress=False)
    assert str(err.value) == (
        f"the text '{text_file}' has {len(TEXT)} tokens, fewer than one perplexity window of 256; "
        "give a longer text or a smaller --ppl-seq-len"
    )


def test_window_longer_than_the_model_context(text_file):
    with pytest.raises(AmpruneError, match=r"^--ppl-seq-len 2048 exceeds the model's maximum context of 256 tokens$"):
        perplexity(tiny_model("llama_gqa"), char_tokenizer(), text_file, progress=False)


def test_missing_text_file(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(AmpruneError) as err:
        perplexity(tiny_model("llama_gqa"), char_tokenizer(), missing, seq_len=16)
    assert str(err.value) == f"perplexity text not found: {missing} (use c4 or wiki, or a .txt file)"
