"""LLaMA-style families: separate q/k/v/o projections and a SwiGLU gate/up/down MLP."""

from __future__ import annotations

from .base import Family

# transformers 5.24's LlamaConfig refuses `hidden_size % num_attention_heads != 0` even with an explicit
# head_dim. MistralForCausalLM computes exactly the same function for a bias-free LLaMA (same RMSNorm,
# rotary embedding, attention, SwiGLU MLP and weight names; `sliding_window=None` is full attention) and
# its config accepts any head count, so such checkpoints are saved as `mistral`.
LLAMA = Family(
    name="llama",
    model_types=("llama",),
    heads_must_divide_hidden=True,
    equivalent_model_type="mistral",
)

MISTRAL = Family(name="mistral", model_types=("mistral",))

# Qwen2 has biases on q/k/v (sliced with their rows) and none on o_proj.
QWEN2 = Family(name="qwen2", model_types=("qwen2",))
