"""AMP importance scores as pure functions of one sample's activations (paper §2.2–2.4).

Notation: T tokens of one sample, H heads, d head_dim, D hidden_size, I intermediate_size.
"""

from __future__ import annotations

import torch

# Head contributions are (T, H, D): chunk tokens so scoring a 7B layer never holds more than
# TOKEN_CHUNK × H × D floats at once.
TOKEN_CHUNK = 256


def amp_head_scores(o_input: torch.Tensor, o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Token-mean of ‖h_n · W_O[:, n]‖₁ for every head n (Eq. 8 with the code's token-mean).

    Args:
        o_input: (T, H·d) the input of `o_proj`, i.e. the concatenated head outputs of one sample.
        o_weight: (D, H·d) the `o_proj` weight (nn.Linear layout: y = x Wᵀ).
    Returns:
        (H,) float32 scores.
    """
    tokens = o_input.shape[0]
    head_dim = o_input.shape[1] // num_heads
    # W_O rows per head in the paper's x·W convention: (H, d, D)
    per_head_w = o_weight.float().t().reshape(num_heads, head_dim, -1)
    total = torch.zeros(num_heads, dtype=torch.float32, device=o_input.device)
    for start in range(0, tokens, TOKEN_CHUNK):
        h = o_input[start : start + TOKEN_CHUNK].float().view(-1, num_heads, head_dim)  # (t, H, d)
        contributions = torch.einsum("thd,hdD->thD", h, per_head_w)  # (t, H, D)
        total += contributions.abs().sum(dim=(0, 2))
    return total / tokens


def amp_neuron_scores(down_input: torch.Tensor) -> torch.Tensor:
    """Token-mean of |act(x W_gate) · (x W_up)| per neuron: the input of `down_proj` (Eq. 9).

    Args:
        down_input: (T, I) the input of `down_proj` for one sample (for a plain MLP, act(x W_fc1)).
    Returns:
        (I,) float32 scores.
    """
    return down_input.float().abs().mean(dim=0)
