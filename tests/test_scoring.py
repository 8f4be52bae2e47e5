"""AMP head scores against loops that follow the paper's formulas literally."""

from __future__ import annotations

import torch

from amprune import scoring
from amprune.scoring import head_contribution_norms


def test_head_norms_equal_per_token_l1_of_each_head_contribution():
    torch.manual_seed(0)
    tokens, heads, head_dim, hidden = 7, 3, 4, 5
    o_input = torch.randn(tokens, heads * head_dim)
    o_weight = torch.randn(hidden, heads * head_dim)
    expected = torch.zeros(tokens, heads)
    for n in range(heads):
        cols = slice(n * head_dim, (n + 1) * head_dim)
        for t in range(tokens):
            contribution = o_weight[:, cols] @ o_input[t, cols]  # h_n · W_n for one token, (hidden,)
            expected[t, n] = contribution.abs().sum()
    torch.testing.assert_close(head_contribution_norms(o_input, o_weight, heads), expected, rtol=1e-5, atol=1e-6)


def test_head_norms_are_chunk_independent(monkeypatch):
    torch.manual_seed(1)
    o_input, o_weight = torch.randn(10, 8), torch.randn(6, 8)
    whole = head_contribution_norms(o_input, o_weight, 2)
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 3 * 2 * 6)  # 3 tokens per chunk
    torch.testing.assert_close(head_contribution_norms(o_input, o_weight, 2), whole)


def test_head_contributions_sum_to_the_attention_output():
    """Eq. 6-7: the o_proj output is the sum of the per-head terms the score is built from."""
    torch.manual_seed(2)
    o_input, o_weight = torch.randn(1, 12), torch.randn(5, 12)
    terms = [o_weight[:, n * 4 : (n + 1) * 4] @ o_input[0, n * 4 : (n + 1) * 4] for n in range(3)]
    torch.testing.assert_close(sum(terms), o_weight @ o_input[0])
    torch.testing.assert_close(
        head_contribution_norms(o_input, o_weight, 3)[0], torch.stack([t.abs().sum() for t in terms])
    )
