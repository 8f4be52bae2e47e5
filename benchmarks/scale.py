"""Pruning a model larger than this machine's memory, end to end, with the layer engine.

1. Generate a LLaMA-architecture checkpoint with random bfloat16 weights whose safetensors exceed the
   machine's RAM (default: hidden 5120, 48 layers, 40 query / 8 KV heads, MLP 13824, untied, the packaged
   SmolLM2 tokenizer's 49152-token vocabulary: 13.7 B parameters, 27.4 GB = 25.5 GiB), written layer by
   layer in 5 GB shards through amprune's own shard writer (so generating it never holds it either).
2. `amprune prune --model SYNTH --ratio 0.3 --recipe paper …` (`--recipe` is a flag: the default recipe's
   search and obs re-fit are float64 work sized for a GPU at this scale) in a fresh process, with a small
   calibration set: the
   engine reads one layer at a time, writes the pruned layers into the output's shards, then reloads
   the result with stock transformers (accelerate's device map, most of it offloaded to disk) and
   compares a probe's logits with its own.
3. The peak RSS the command reports against the target: embedding + LM head + 2 decoder layers +
   hidden-state buffer + 1 GiB (computed from the config, in bfloat16).
4. Delete the generated and the pruned checkpoints.

Usage: python benchmarks/scale.py [--work /var/tmp/amprune-scale] [--json benchmarks/results/scale.json]
       [--hidden 5120 --layers 48 --heads 40 --kv-heads 8 --intermediate 13824] [--samples 8 --seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoTokenizer, LlamaConfig

from amprune import checkpoint
from amprune.checkpoint import CheckpointWriter
from amprune.models import get_family
from amprune.models.loading import resolve_model
from amprune.weights import empty_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import machine  # noqa: E402

GIB = 2**30


@torch.no_grad()
def generate(folder: Path, config: LlamaConfig, tokenizer, device: str = "cpu") -> float:
    """Random weights (normal, std 0.02; norms 1) written layer by layer; returns the seconds it took.
    `device`: where the random numbers are drawn (a GPU draws 7 B of them in seconds; the CPU, in minutes)."""
    started = time.perf_counter()
    family = get_family("llama")
    model = empty_model(config)  # every parameter on the meta device
    checkpoint.SHARD_SIZE = "5GB"  # a sharded input, like the checkpoints people download
    writer = CheckpointWriter(folder, True, config, torch.bfloat16, family.layers + ".")
    generator = torch.Generator(device).manual_seed(0)

    def fill(module: torch.nn.Module, prefix: str = "") -> None:
        tensors = {}
        for name, param in module.named_parameters(recurse=True):
            if "norm" in name:
                tensors[name] = torch.ones(param.shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.empty(param.shape, dtype=torch.bfloat16, device=device)
                                 .normal_(0, 0.02, generator=generator).cpu())
        module.load_state_dict(tensors, strict=False, assign=True)

    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        fill(part)
    writer.write_shell(model)
    layers = family.decoder_layers(model)
    for index, layer in enumerate(layers):
        fill(layer)
        writer.write_layer(index, layer)
        layer.to("meta")
        print(f"generated layer {index + 1}/{len(layers)}", flush=True)
    writer.finish(tokenizer, None)
    return time.perf_counter() - started


def _bytes(text: str) -> float:
    """"20.0 MiB" → bytes (the summary's human-readable sizes)."""
    number, unit = text.split()
    return float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": GIB}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/var/tmp/amprune-scale")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=13824)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--recipe", default="paper")
    parser.add_argument("--keep", action="store_true", help="keep the generated and pruned checkpoints")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    synth, pruned = work / "synth", work / "pruned"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         intermediate_size=args.intermediate, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    result = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "ram_bytes": psutil.virtual_memory().total, "config": config.to_dict()}
    try:
        result["generate_seconds"] = generate(synth, config, tokenizer)
        size = sum(f.stat().st_size for f in synth.glob("*.safetensors"))
        result["checkpoint_bytes"] = size
        print(f"checkpoint: {size / GIB:.1f} GiB in {len(list(synth.glob('*.safetensors')))} shards "
              f"(RAM {psutil.virtual_memory().total / GIB:.1f} GiB)", flush=True)
        command = [sys.executable, "-m", "amprune", "prune", "--model", str(synth), "--ratio", str(args.ratio),
                   "--recipe", args.recipe,
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--out", str(pruned), "--overwrite"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        result["prune_seconds"] = time.perf_counter() - started
        print(done.stdout, done.stderr[-3000:], flush=True)
        if done.returncode != 0:
            raise SystemExit("prune failed")
        result["summary"] = done.stdout
        peak = float(re.search(r"peak memory: ([\d.]+) GiB RSS", done.stdout).group(1)) * GIB
        hidden = _bytes(re.search(r"hidden states ([\d.]+ \w+)", done.stdout).group(1))
        layer = 2 * (2 * args.hidden * args.hidden + 2 * args.hidden * args.hidden * args.kv_heads // args.heads
                     + 3 * args.hidden * args.intermediate)
        embedding = 2 * len(tokenizer) * args.hidden
        target = 2 * embedding + 2 * layer + hidden + GIB
        result["memory"] = {"peak_rss_bytes": peak, "target_bytes": target, "embedding_bytes": embedding,
                            "layer_bytes": layer, "hidden_bytes": hidden, "met": peak <= target}
        result["output_bytes"] = sum(f.stat().st_size for f in pruned.glob("*.safetensors"))
        print(json.dumps(result["memory"], indent=1), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
