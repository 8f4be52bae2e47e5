"""Tiny random models of the Phi, Phi-3 and Gemma-3 families, and family-generic test helpers.

The core tests in tests/ name LLaMA modules directly; everything here goes through the `Family`
accessors so it also covers fused projections, Phi's `dense`/`fc1`/`fc2` and the multimodal wrapper.
"""

from __future__ import annotations

import copy

import torch
from conftest import VOCAB, random_model
from transformers import AutoConfig

from amprune.models import Dims, get_family

COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
GEMMA_TEXT = dict(COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  intermediate_size=48, query_pre_attn_scalar=16, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention"])
# Each case names what it exercises. Built fresh every time: surgery mutates the (shared) config.
CASES = {
    # MHA with biases everywhere, partial rotary (half of each head), parallel attention ∥ MLP
    "phi": ("phi", dict(COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=40, partial_rotary_factor=0.5)),
    # fused qkv/gate_up with GQA (6 query heads in 2 KV groups), no head_dim in the stock config
    "phi3_gqa": ("phi3", dict(COMMON, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                              intermediate_size=40)),
    # fused qkv as in Phi-3-mini: every head its own KV group (4 heads of 12 in hidden 48)
    "phi3_mha": ("phi3", dict(COMMON, hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                              intermediate_size=40)),
    # MQA, q/k norms, one sliding-window (6 tokens) and one global layer; heads must divide 64
    "gemma3_mqa": ("gemma3_text", GEMMA_TEXT),
    # the same text decoder inside the multimodal wrapper (a 1-layer SigLIP tower that is never pruned)
    "gemma3_mm": ("gemma3", dict(
        text_config=dict(GEMMA_TEXT, model_type="gemma3_text"),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=125, eoi_token_index=126, image_token_index=127,
        tie_word_embeddings=False)),
}


def family_config(case: str, **overrides):
    model_type, fields = CASES[case]
    return AutoConfig.for_model(model_type, **copy.deepcopy({**fields, **overrides}))


def family_model(case: str, seed: int = 0, **overrides):
    return random_model(family_config(case, **overrides), seed)


def family_and_dims(model):
    family = get_family(model.config.model_type)
    return family, Dims.from_config(family.sizes_config(model.config))


@torch.no_grad()
def brute_force_scores(model, samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """AMP scores by re-running each layer's attention and MLP blocks by hand, one unit at a time.

    A head's score is the token-mean L1 norm of the attention block's output when only that head's
    `o` columns are kept (bias removed); a neuron's is the token-mean |input of `down`|, read off the
    MLP block run with `down` replaced by the identity. Samples run one at a time (no padding).
    """
    family, dims = family_and_dims(model)
    layers = family.decoder_layers(model)
    d = dims.head_dim
    heads = torch.zeros(dims.num_layers, dims.num_heads, dtype=torch.float64)
    neurons = torch.zeros(dims.num_layers, dims.intermediate_size, dtype=torch.float64)
    calls = {}
    for sample in samples:
        handles = []
        for i, layer in enumerate(layers):
            handles.append(family.attention_block(layer).register_forward_pre_hook(
                lambda m, a, k, i=i: calls.__setitem__(("attn", i), (a, k)), with_kwargs=True))
            handles.append(family.mlp_block(layer).register_forward_pre_hook(
                lambda m, a, k, i=i: calls.__setitem__(("mlp", i), (a, k)), with_kwargs=True))
        model(sample.unsqueeze(0), use_cache=False)
        for handle in handles:
            handle.remove()
        for i, layer in enumerate(layers):
            attn = copy.deepcopy(family.attention_block(layer))
            o = getattr(attn, family.o)
            weight = o.weight.clone()
            if o.bias is not None:
                o.bias.zero_()
            args, kwargs = calls[("attn", i)]
            for n in range(dims.num_heads):
                o.weight.zero_()
                o.weight[:, n * d : (n + 1) * d] = weight[:, n * d : (n + 1) * d]
                out = attn(*args, **kwargs)[0][0]  # (T, D): head n's contribution
                heads[i, n] += out.abs().sum(dim=1).mean()
            mlp = copy.deepcopy(family.mlp_block(layer))
            setattr(mlp, family.down, torch.nn.Identity())
            args, kwargs = calls[("mlp", i)]
            neurons[i] += mlp(*args, **kwargs)[0].abs().mean(dim=0)
    return heads / len(samples), neurons / len(samples)
