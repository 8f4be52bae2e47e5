"""Where llama.cpp's prefill time goes, dense against pruned (issue 17: why F16 pp512 misses its FLOP ratio).

For every `<name>-<quant>.gguf` that `benchmarks/llamacpp.py` left in --work (with its Hugging Face folder
`<name>/`, or the packaged model for `dense`):

1. `perf record` around --calls llama-bench pp512 calls (--reps repetitions each), pinned to one core, one
   thread, each under its own environment padding as in `benchmarks/llamacpp.py` (the same paddings for
   every model; a process's memory layout can move its speed); their mean tokens/s give the
   seconds of one 512-token prompt.
2. `perf report` by symbol, grouped in three parts: **matmul** (the weight GEMMs: tinyBLAS, ggml's gemm/gemv,
   vec_dot, the activation quantizers), **attention** (flash-attention or the softmax path: the Q·Kᵀ and
   weights·V work) and **rest** (norms, rotary, SwiGLU, adds, copies: every other ggml or libc sample).
   Kernel and loader samples are left out; a part's seconds are its share of the remaining samples times
   the prompt's seconds.
3. Beside each part its FLOPs (`amprune.flops`): the linear FLOPs of 512 tokens for matmul, the attention
   scores s·P(P+1)/2 for attention; so each part's GFLOP/s on this core.
4. Per pruned model: the measured speedup, the FLOP ratio (what `benchmarks/llamacpp.py` compares with),
   and the **part-weighted ideal**: the dense model's seconds with matmul scaled by the linear-FLOP ratio,
   attention by the score-FLOP ratio and the rest kept; that is the most the FLOP ratio can promise in
   an engine whose parts run at the dense model's speeds.

Usage (about 6 minutes for 6 GGUFs; needs `perf` and `make llamacpp`):
  python benchmarks/llamacpp_profile.py --work /tmp/lc-imx --out benchmarks/results/llamacpp_profile.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import machine
from llamacpp import bench_command, folder_cost, layout_env, layout_pads, run, save

from amprune.models.loading import resolve_model

PROMPT = 512  # llama-bench's pp512
PARTS = {  # first match wins, in this order
    "attention": re.compile(r"flash_attn|soft_max"),
    "matmul": re.compile(r"tinyBLAS|gemm|gemv|vec_dot|mul_mat|quantize_row|from_float"),
    "rest": re.compile(r"ggml|^__mem|sincos|expf|silu"),
}


def flops(folder: str) -> dict:
    """Linear and attention-score FLOPs of one 512-token prompt (logits of the last token only)."""
    config, cost = folder_cost(folder)
    score = cost.score_flops_per_key * PROMPT * (PROMPT + 1) // 2
    return {"heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
            "matmul": cost.prefill_flops(PROMPT) - score, "attention": score}


def profile(args, gguf: Path, pads: list[int | None]) -> dict:
    """Seconds of one prompt and of each part, from perf profiles of one llama-bench call per padding."""
    speeds, samples = [], Counter()
    for pad in pads:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "perf.data"
            out = run(["perf", "record", "-q", "-F", str(args.frequency), "-o", str(data), "--",
                       *bench_command(args.cpu, 1, args.reps, gguf, "pp512")], env=layout_env(pad))
            report = run(["perf", "report", "-i", str(data), "--no-children", "--sort", "symbol", "--stdio", "-g",
                          "none", "-F", "sample,sym"])
        speeds.append(json.loads(out)[0]["avg_ts"])
        for line in report.splitlines():
            match = re.match(r"\s*(\d+)\s+\[\.\]\s+(.+?)\s*$", line)  # user-space symbols only
            if match:
                symbol = match.group(2).replace("(anonymous namespace)::", "")
                part = next((p for p, pattern in PARTS.items() if pattern.search(symbol)), None)
                if part:
                    samples[part] += int(match.group(1))
    total = sum(samples.values())
    tokens_per_s = sum(speeds) / len(speeds)
    seconds = PROMPT / tokens_per_s
    return {"tokens_per_s": tokens_per_s, "calls_tokens_per_s": speeds, "samples": dict(samples), "prompt_s": seconds,
            "seconds": {p: seconds * samples[p] / total for p in PARTS}}


def markdown(result: dict) -> str:
    parts = " | ".join(f"{p} s (share)" for p in PARTS)
    lines = [f"| model | type | heads · MLP | pp512 tok/s | {parts} | matmul GFLOP/s | attention GFLOP/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, row in result["profiles"].items():
        name, quant = key.rsplit("-", 1)
        f, s, total = result["flops"][name], row["seconds"], row["prompt_s"]
        shares = " | ".join(f"{s[p]:.3f} ({s[p] / total:.0%})" for p in PARTS)
        speed = f"{f['matmul'] / s['matmul'] / 1e9:.1f} | {f['attention'] / s['attention'] / 1e9:.1f}"
        lines.append(f"| {name} | {quant} | {f['heads']} · {f['intermediate_size']} | {row['tokens_per_s']:.0f} | "
                     f"{shares} | {speed} |")
    lines += ["", "| pruned | type | pp512 speedup | FLOP ratio | of it | part-weighted ideal | of it |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for key, row in result["speedups"].items():
        name, quant = key.rsplit("-", 1)
        lines.append(f"| {name} | {quant} | {row['speedup']:.3f}× | {row['flop_ratio']:.3f}× | "
                     f"{row['speedup'] / row['flop_ratio']:.1%} | {row['part_weighted_ideal']:.3f}× | "
                     f"{row['speedup'] / row['part_weighted_ideal']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="a --work folder of benchmarks/llamacpp.py (required unless --report)")
    parser.add_argument("--calls", type=int, default=5, help="llama-bench calls per GGUF (default: 5)")
    parser.add_argument("--reps", type=int, default=5, help="llama-bench repetitions per call (default: 5)")
    parser.add_argument("--layout-seed", type=int, default=0,
                        help="seed of the per-call environment padding; -1 keeps the environment (default: 0)")
    parser.add_argument("--frequency", type=int, default=1999, help="perf samples per second (default: 1999)")
    parser.add_argument("--cpu", type=int, default=0, help="the core llama-bench is pinned to (default: 0)")
    parser.add_argument("--out", default="benchmarks/results/llamacpp_profile.json", help="results JSON")
    parser.add_argument("--report", metavar="JSON", help="only print the tables of a finished run's JSON")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return
    if args.work is None:
        parser.error("--work is required (a --work folder of benchmarks/llamacpp.py)")
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: apt-get install linux-perf)")

    work = Path(args.work)
    ggufs = sorted(work.glob("*-*.gguf"), key=lambda p: (not p.name.startswith("dense-"), p.name))
    if not any(p.name.startswith("dense-") for p in ggufs):
        sys.exit(f"no dense-<type>.gguf in {work}: run benchmarks/llamacpp.py --work {work} first")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    pads = layout_pads(args.layout_seed, args.calls)
    names = sorted({p.stem.rsplit("-", 1)[0] for p in ggufs})
    result = {"settings": {"command": shlex.join([sys.executable, *sys.argv]), "date": date, "machine": machine(),
                           "pinning": f"taskset -c {args.cpu}, -t 1", "calls": args.calls, "reps": args.reps,
                           "env_pads": pads, "prompt": PROMPT},
              "flops": {n: flops(resolve_model(None) if n == "dense" else str(work / n)) for n in names},
              "profiles": {p.stem: profile(args, p, pads) for p in ggufs}}
    result["speedups"] = {}
    for key, row in result["profiles"].items():
        name, quant = key.rsplit("-", 1)
        dense = result["profiles"].get(f"dense-{quant}")
        if name == "dense" or dense is None:
            continue
        fd, fp, ds = result["flops"]["dense"], result["flops"][name], dense["seconds"]
        weighted = (ds["matmul"] * fp["matmul"] / fd["matmul"] + ds["attention"] * fp["attention"] / fd["attention"]
                    + ds["rest"])
        result["speedups"][key] = {
            "speedup": row["tokens_per_s"] / dense["tokens_per_s"],
            "flop_ratio": (fd["matmul"] + fd["attention"]) / (fp["matmul"] + fp["attention"]),
            "part_weighted_ideal": dense["prompt_s"] / weighted,
        }
    save(result, args.out, markdown)


if __name__ == "__main__":
    main()
