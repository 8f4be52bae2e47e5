"""Test helpers: a local character tokenizer, the one registry of tiny random models of every family,
random plans, and brute-force references. No downloads."""

from __future__ import annotations

import copy
import string
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from amprune.calibration import CalibrationSet
from amprune.engine import LayerEngine, Run, RunResult, Settings
from amprune.models import Dims, get_family
from amprune.plan import Budget, LayerPlan, Plan, make_budget
from amprune.surgery import unit_params
from amprune.weights import InMemory

VOCAB = 128
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
GEMMA_TEXT = dict(COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  intermediate_size=48, query_pre_attn_scalar=16, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention"])

# Every family's tiny case; each names what it exercises. Built fresh every time: transformers models
# share their config object by reference, and surgery mutates it.
CASES = {
    # plain multi-head attention (every head its own KV group)
    "llama_mha": ("llama", dict(COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                intermediate_size=48)),
    # GQA: 6 query heads in 2 KV groups
    "llama_gqa": ("llama", dict(COMMON, hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                intermediate_size=40)),
    "mistral": ("mistral", dict(COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                intermediate_size=40, sliding_window=None)),
    # q/k/v biases (sliced with their rows), none on o_proj
    "qwen2": ("qwen2", dict(COMMON, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            intermediate_size=40)),
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
    model_type, fields = CASES[case]
    return AutoConfig.for_model(model_type, **copy.deepcopy({**fields, **overrides}))


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


def family_and_dims(model):
    family = get_family(model.config.model_type)
    return family, Dims.from_config(family.sizes_config(model.config))


def random_samples(lengths: list[int], seed: int = 0) -> CalibrationSet:
    """Random token samples of the given lengths (unequal lengths make padded batches)."""
    generator = torch.Generator().manual_seed(seed)
    return CalibrationSet([torch.randint(4, 100, (n,), generator=generator) for n in lengths], "test", max(lengths), 0)


def budget_for(model, gqa_mode: str = "query", **ratios) -> Budget:
    """The budget of `ratio` (or `head_ratio`/`mlp_ratio`) for `model`, as `amprune prune` computes it."""
    family, dims = family_and_dims(model)
    units = unit_params(family, family.decoder_layers(model)[0], dims)
    total = sum(p.numel() for p in model.parameters())
    return make_budget(dims, units, total, gqa_mode, ratios.get("ratio"), ratios.get("head_ratio"),
                       ratios.get("mlp_ratio"))


def run_engine(source, calib: CalibrationSet, runs: list[Run], batch_size: int = 2, **settings) -> list[RunResult]:
    """One layer-engine pass over `source` (a model, loaded whole, or a `weights.Checkpoint`)."""
    source = InMemory(source) if isinstance(source, torch.nn.Module) else source
    settings = Settings(batch_size=batch_size, progress=False, **settings)
    return LayerEngine(source, calib, calib.samples[0][:8], runs, settings).run()[0]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        found.update(load_file(path))
    return found


def assert_same_checkpoint(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Same plan (keep lists), same tensor names and shapes, values within `atol`."""
    plan_a, plan_b = Plan.load(a), Plan.load(b)
    for layer_a, layer_b in zip(plan_a.layers, plan_b.layers, strict=True):
        assert (layer_a.heads_kept, layer_a.kv_heads_kept, layer_a.neurons_kept) == (
            layer_b.heads_kept, layer_b.kv_heads_kept, layer_b.neurons_kept)
    got, want = tensors(a), tensors(b)
    assert sorted(got) == sorted(want)
    for name in got:
        assert got[name].shape == want[name].shape, name
        assert (got[name].float() - want[name].float()).abs().max().item() <= atol, name


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}"


def random_plan(dims: Dims, mode: str, heads_removed: int, neurons_kept: int, seed: int,
                dropped: tuple[int, ...] = ()) -> Plan:
    """A uniform plan with random keep sets: `heads_removed` query heads per group (query mode) or
    KV groups (group mode) go in every layer, `neurons_kept` neurons stay; the layers `dropped` go whole."""
    gen = torch.Generator().manual_seed(seed)
    gs = dims.group_size
    layers = []
    for _ in range(dims.num_layers - len(dropped)):
        if mode == "group":
            kv = sorted(torch.randperm(dims.num_kv_heads, generator=gen)[heads_removed:].tolist())
            heads = [g * gs + j for g in kv for j in range(gs)]
        else:
            kv = list(range(dims.num_kv_heads))
            heads = [g * gs + j for g in kv for j in sorted(torch.randperm(gs, generator=gen)[heads_removed:].tolist())]
        neurons = sorted(torch.randperm(dims.intermediate_size, generator=gen)[:neurons_kept].tolist())
        layers.append(LayerPlan(heads, kv, neurons, [0.0] * dims.num_heads, [0.0] * dims.intermediate_size))
    removed_heads = dims.num_heads - len(layers[0].heads_kept)
    removed_kv = dims.num_kv_heads - len(layers[0].kv_heads_kept)
    budget = Budget(mode, removed_heads, removed_kv, dims.intermediate_size - neurons_kept, 1, 1, None,
                    layers_dropped=dropped)
    return Plan(dims, budget, layers)


def random_plans(dims: Dims, seed: int = 0) -> list[Plan]:
    """Random uniform plans in every mode the model allows, including keeping a single unit and dropping
    the first layer whole."""
    out = []
    if dims.num_kv_heads > 1:  # whole KV groups (plain MHA: whole heads)
        out += [random_plan(dims, "group", 1, dims.intermediate_size // 2, seed),
                random_plan(dims, "group", dims.num_kv_heads - 1, 1, seed + 1)]
    if dims.group_size > 1:  # query heads inside every group (MQA: the only choice)
        out += [random_plan(dims, "query", 1, dims.intermediate_size - 3, seed + 2),
                random_plan(dims, "query", dims.group_size - 1, 1, seed + 3)]
    mode = "group" if dims.num_kv_heads > 1 else "query"
    out.append(random_plan(dims, mode, 0, dims.intermediate_size - 5, seed + 4, dropped=(0,)))
    return out


def plan_cases() -> list[tuple[str, int]]:
    """(case, plan index) for every family case and every random plan it allows."""
    return [(case, i) for case in sorted(CASES) for i in range(len(random_plans(family_and_dims(
        tiny_model(case))[1])))]


def assert_params_removed(dense, sliced, plan: Plan, family) -> None:
    """The sliced model lost exactly the parameters of the dropped units and layers, counted per unit."""
    dims, after = plan.dims, plan.dims_after
    units = unit_params(family, family.decoder_layers(dense)[0], dims)
    removed = after.num_layers * (
        (dims.num_heads - after.num_heads) * units.head
        + (dims.num_kv_heads - after.num_kv_heads) * units.kv_head
        + (dims.intermediate_size - after.intermediate_size) * units.neuron
    ) + len(plan.budget.layers_dropped) * units.layer
    assert sum(p.numel() for p in sliced.parameters()) == sum(p.numel() for p in dense.parameters()) - removed


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
