"""AMP at LLaMA-2-7B's shape on one GPU: prune with the layer engine in bfloat16, then time it (RESULTS "On a GPU").

The one script the lent GPU machine runs (`device`), every step a fresh `python -m amprune` process under
its own time limit, the JSON rewritten after each step so that a cut-short run still reports what it did:

1. Generate LLaMA-2-7B's architecture (hidden 4096, 32 layers, 32 query = 32 KV heads, MLP 11008, untied)
   with random bfloat16 weights and the packaged SmolLM2 tokenizer (vocabulary 49152, not LLaMA's 32000):
   6.9 B parameters in 5 GB shards (`scale.generate`, drawing the numbers on the GPU).
2. For each `--round-to` of `--widths`: `amprune prune --model SYNTH --ratio 0.21 --recipe paper
   --round-to W --device cuda`: AMP as published at the paper's speed-up ratio (21.02 %), in the
   checkpoint's bfloat16, default calibration (`--round-to 1` is the paper's own width).
3. `amprune bench --baseline SYNTH --model PAPER21_W… --device cuda`: the paper's latency workload (12 + 128
   tokens, batch 1; `--new-tokens 0` leaves it out) and prefills of 512 tokens at batch 1 and 8, models
   alternating, plus each model's peak memory in a fresh process (`--no-memory` leaves it out).
4. `amprune prune --model SYNTH --ratio 0.3 --device cuda`: the default recipe (allocation search, obs
   re-fit) under `--default-timeout`, to see its time and memory at this scale (random weights: its
   picks mean nothing here); its progress is kept in the JSON.

Random weights make perplexities and the search's choice meaningless; shapes, times and memory are what
this measures. Usage (the machine needs transformers 5.24 and the exllamav2 wheel's texts, see RESULTS):
    python benchmarks/gpu.py --tokenizer TOKENIZER_FOLDER --work /tmp/amprune-gpu --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import cpu_name, gpu_name  # noqa: E402
from scale import GIB, generate  # noqa: E402


def run_step(result: dict, name: str, command: list[str], timeout: float, json_path: Path) -> bool:
    """Run one amprune command; record its time, exit status and output; True if it succeeded."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "amprune", *command], capture_output=True, text=True,
                              timeout=timeout)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as stopped:
        rc, out, err = "timeout", stopped.stdout or "", stopped.stderr or ""
        out, err = (t.decode() if isinstance(t, bytes) else t for t in (out, err))
    seconds = time.perf_counter() - started
    result["steps"][name] = {"command": "amprune " + " ".join(command), "seconds": round(seconds, 1), "rc": rc,
                             "stdout": out[-8000:], "stderr": err[-4000:]}
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(out[-8000:], err[-4000:], f"== {name}: rc {rc} after {seconds:.0f} s", sep="\n", flush=True)
    return rc == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="folder with the SmolLM2 tokenizer's files")
    parser.add_argument("--work", default="/tmp/amprune-gpu")
    parser.add_argument("--json", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 8, 64], help="--round-to of the paper prunes")
    parser.add_argument("--paper-timeout", type=float, default=150, help="seconds for each paper-recipe prune")
    parser.add_argument("--default-timeout", type=float, default=150, help="seconds for the default recipe's")
    parser.add_argument("--bench-timeout", type=float, default=200)
    parser.add_argument("--bench-runs", type=int, default=8)
    parser.add_argument("--bench-warmup", type=int, default=2)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128, help="0: no generation workload")
    parser.add_argument("--no-memory", action="store_true", help="no peak-memory measurement in the bench")
    args = parser.parse_args()
    work, json_path = Path(args.work), Path(args.json)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    synth, default = work / "synth", work / "default30"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         intermediate_size=args.intermediate, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    result = {"command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": gpu_name() or cpu_name(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "cuda": torch.version.cuda},
              "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "intermediate_size", "vocab_size")},
              "steps": {}}
    result["generate_seconds"] = round(generate(synth, config, tokenizer, args.device), 1)
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in synth.glob("*.safetensors"))
    print(f"checkpoint: {result['checkpoint_bytes'] / GIB:.1f} GiB in {result['generate_seconds']} s", flush=True)
    models = []
    for width in args.widths:
        out = work / f"paper21_round{width}"
        if run_step(result, out.name, ["prune", "--model", str(synth), "--ratio", "0.21", "--recipe", "paper",
                                       "--round-to", str(width), "--device", args.device, "--out", str(out),
                                       "--overwrite", "--no-check"], args.paper_timeout, json_path):
            models.append(str(out))
    if models:
        run_step(result, "bench", ["bench", "--baseline", str(synth), "--model", *models,
                                   "--device", args.device, "--dtype", "bfloat16", "--protocol", "paper",
                                   "--warmup", str(args.bench_warmup), "--runs", str(args.bench_runs),
                                   "--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len),
                                   "--batch-sizes", "1", "8", *(["--no-memory"] if args.no_memory else []),
                                   "--out", str(work / "bench.json")], args.bench_timeout, json_path)
        if (work / "bench.json").is_file():
            result["bench"] = json.loads((work / "bench.json").read_text())
    run_step(result, "default30", ["prune", "--model", str(synth), "--ratio", "0.3", "--device", args.device,
                                   "--out", str(default), "--overwrite"], args.default_timeout, json_path)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
