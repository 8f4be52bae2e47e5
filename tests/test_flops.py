"""Parameter, byte and FLOP counts of tiny models against hand-computed values and torch's FLOP counter."""

from __future__ import annotations

import torch
from helpers import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from amprune.flops import ModelCost, model_cost
from amprune.models import get_family

LLAMA = get_family("llama")

# llama_gqa: L=2 layers, D=48, H=6 query heads, G=2 KV heads, d=8, I=40, V=128, untied LM head.
ATTN = 2 * 2 * (48 * 48 + 48 * 16 + 48 * 16 + 48 * 48)  # 2·L·(q + k + v + o) = 24,576
MLP = 2 * 2 * (3 * 48 * 40)  # 2·L·(gate + up + down) = 23,040
HEAD = 2 * 48 * 128  # 2·D·V = 12,288
SCORE = 4 * 2 * 6 * 8  # 4·L·H·d per key = 384
PARAMS = 128 * 48 + 2 * (48 * 48 + 2 * 48 * 16 + 48 * 48 + 3 * 48 * 40 + 2 * 48) + 48 + 48 * 128  # = 36,336


def test_tiny_gqa_counts_by_hand():
    cost = model_cost(tiny_model("llama_gqa"), LLAMA)
    assert (ATTN, MLP, HEAD, SCORE, PARAMS) == (24_576, 23_040, 12_288, 384, 36_336)
    assert cost == ModelCost(
        params=PARAMS,
        weight_bytes=4 * PARAMS,  # float32
        kv_bytes_per_token=2 * 2 * 2 * 8 * 4,  # K and V · L · G · d · 4 bytes = 256
        attn_flops=ATTN,
        mlp_flops=MLP,
        head_flops=HEAD,
        score_flops_per_key=SCORE,
    )


def test_tied_head_counted_once_and_bfloat16_bytes():
    cost = model_cost(tiny_model("llama_gqa", tie_word_embeddings=True).to(torch.bfloat16), LLAMA)
    assert cost.params == PARAMS - 48 * 128  # the LM head is the embedding matrix
    assert cost.weight_bytes == 2 * (PARAMS - 48 * 128)
    assert cost.kv_bytes_per_token == 128
    assert cost.head_flops == HEAD  # a tied head still multiplies


def test_pruned_sizes_change_only_their_terms():
    # 4 heads in 2 groups (head_dim 8) and 24 neurons: what a plan removing 2 heads and 16 neurons leaves.
    cost = model_cost(tiny_model("llama_gqa", num_attention_heads=4, intermediate_size=24), LLAMA)
    assert cost.attn_flops == 2 * 2 * (48 * 32 + 48 * 16 + 48 * 16 + 32 * 48)
    assert cost.mlp_flops == 2 * 2 * 3 * 48 * 24
    assert cost.score_flops_per_key == 4 * 2 * 4 * 8
    assert (cost.head_flops, cost.kv_bytes_per_token) == (HEAD, 256)


def test_workload_formulas_by_hand():
    cost = model_cost(tiny_model("llama_gqa"), LLAMA)
    per_token = ATTN + MLP  # 47,616
    assert cost.token_flops(10) == per_token + SCORE * 10 + HEAD
    assert cost.token_flops(10, logits=False) == per_token + SCORE * 10
    # 4 prompt tokens attend to 1, 2, 3, 4 keys; one set of logits.
    assert cost.prefill_flops(4) == 4 * per_token + SCORE * (1 + 2 + 3 + 4) + HEAD == 206_592
    # 3 new tokens after a 3-token prompt: the prefill, then steps whose input attends to 4 and 5 keys.
    prefill = 3 * per_token + SCORE * 6 + HEAD
    assert cost.generation_flops(3, 3) == prefill + 2 * (per_token + HEAD) + SCORE * (4 + 5) == 280_704


def test_counts_match_torch_flop_counter():
    """Eager attention computes the full P×P score matrix, causal mask or not: P(P−1)/2 keys more."""
    model = tiny_model("llama_gqa")
    model.set_attn_implementation("eager")  # the CPU SDPA kernel is invisible to FlopCounterMode
    cost = model_cost(model, LLAMA)
    prompt = torch.arange(4, 11).unsqueeze(0)  # 7 tokens
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            out = model(prompt, logits_to_keep=1)
        assert counter.get_total_flops() == cost.prefill_flops(7) + SCORE * 7 * 6 // 2
        with FlopCounterMode(display=False) as counter:
            model(torch.tensor([[5]]), cache=out.past_key_values, logits_to_keep=1)
        assert counter.get_total_flops() == cost.token_flops(8)
