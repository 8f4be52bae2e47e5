"""Gemma-3-270M (the packaged Q4_K_M GGUF, dequantized) before and after AMP pruning: Wikipedia perplexity.

    nohup nice -n 5 .venv/bin/python benchmarks/gemma_prune.py > /tmp/gemma_prune.log 2>&1 &

Every ratio is one run of the command line, `amprune prune --model gemma3-270m --ratio R --out DIR` (the
default calibration: the packaged C4), in a process of its own, its summary printed here; the perplexity is
measured on that checkpoint reloaded with stock `AutoModelForCausalLM.from_pretrained`.
Writes benchmarks/results/gemma_prune.json and prints the markdown table for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host import machine
from transformers import AutoModelForCausalLM

from amprune.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from amprune.evaluation import perplexity
from amprune.models.loading import load_model, load_tokenizer, resolve_device_dtype, resolve_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemma3-270m"


def sizes(config) -> dict:
    return {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "neurons": config.intermediate_size}


def row(name: str, record: dict, dense_params: int) -> str:
    removed = 1 - record["params"] / dense_params
    cells = [name, f"{record['heads']} / {record['kv_heads']}", str(record["neurons"]),
             f"{record['params'] / 1e6:.1f} M", f"{removed:.1%}", f"{record['ppl']:.2f}",
             f"{record['seconds']['prune']:.0f}" if "prune" in record["seconds"] else "–"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows (default: 16)")
    parser.add_argument("--ppl-seq-len", type=int, default=512, help="tokens per perplexity window (default: 512)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="calibration tokens per sample")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gemma_prune.json"))
    args = parser.parse_args()

    command = "python benchmarks/gemma_prune.py " + " ".join(sys.argv[1:])
    device, dtype = resolve_device_dtype(None, None)
    source = resolve_model(MODEL)
    tokenizer = load_tokenizer(source)
    dense = load_model(source, device, dtype)
    tick = time.perf_counter()
    ppl = perplexity(dense, tokenizer, "wiki", args.ppl_seq_len, max_windows=args.windows)
    records = {"dense": dict(sizes(dense.config), params=sum(p.numel() for p in dense.parameters()),
                             ppl=ppl["ppl"], seconds={"ppl": time.perf_counter() - tick})}
    del dense
    for ratio in args.ratios:
        with tempfile.TemporaryDirectory(prefix="gemma-prune-") as folder:
            cli = ["amprune", "prune", "--recipe", "paper", "--model", MODEL, "--ratio", str(ratio), "--samples",
                   str(args.samples),
                   "--seq-len", str(args.seq_len), "--out", folder]
            print("$", " ".join(cli), flush=True)
            tick = time.perf_counter()
            subprocess.run([sys.executable, "-m", "amprune", *cli[1:]], check=True)
            seconds = {"prune": time.perf_counter() - tick}
            budget = json.loads((Path(folder) / "amprune_plan.json").read_text())["budget"]
            pruned = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
            tick = time.perf_counter()
            ppl = perplexity(pruned, tokenizer, "wiki", args.ppl_seq_len, max_windows=args.windows)
            seconds["ppl"] = time.perf_counter() - tick
            records[f"--ratio {ratio}"] = dict(
                sizes(pruned.config), params=sum(p.numel() for p in pruned.parameters()), ppl=ppl["ppl"],
                seconds=seconds, command=" ".join(cli), notes=budget["notes"],
                achieved_fraction=budget["achieved_fraction"])
            print(json.dumps(records, indent=1), flush=True)

    settings = {"command": command.strip(), "machine": machine(), "dtype": str(dtype), "model": MODEL,
                "perplexity": {"text": "wiki (evaluation half)", "seq_len": args.ppl_seq_len, "windows": args.windows},
                "calibration": {"text": "c4", "samples": args.samples, "seq_len": args.seq_len}}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "models": records}, indent=1) + "\n")
    dense_params = records["dense"]["params"]
    print("| model | heads / KV heads | MLP neurons | parameters | removed | Wikipedia ppl | prune s (CLI) |")
    print("|---|---|---|---|---|---|---|")
    for name, record in records.items():
        print(row(name, record, dense_params))


if __name__ == "__main__":
    main()
