"""Speed and memory of AMP-pruned SmolLM2-135M-Instruct against the dense model (docs/RESULTS.md, bench).

1. Prune the packaged SmolLM2 at 20 % and 30 % in both GQA modes (C4 calibration, 16 × 256 tokens: only
   the shapes matter for speed), plus the 30 % query-mode plan with `round_to` 8 and 64 (kept neurons a
   multiple of 8 or 64: 888 and 896 instead of 886), to see what GEMM-friendly widths are worth.
   Existing folders under --work are reused.
2. `amprune.benchmark.bench`, every model in the same process, alternating per round, the paper
   protocol (`--protocol paper`: 10 warm-up + 20 timed rounds, never stopping early):
   - *target*: prefill b8 ×128 only, dense vs the four 30 % query/group models (issue 7's target);
   - *protocol*: dense vs the four 20/30 % models; generation 12+128 (batch 1), prefill ×128 at batch
     1, 8 and 32, peak memory.
3. *widths*: the MLP's GEMMs alone (gate/up: 1024×576 @ 576×I, down: 1024×I @ I×576, i.e. prefill b8
   ×128) at the kept neuron counts of the plans and their rounded neighbours, time per neuron relative to
   the dense 1536, rounds alternating.
4. Print the tables and Markdown tables for docs/RESULTS.md; write JSON and PNG under --results.

Usage: nohup python benchmarks/bench_speed.py > /tmp/bench_speed.log 2>&1 &   (on an otherwise idle machine)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

from amprune.benchmark import BenchRequest, bench
from amprune.pipeline import PruneRequest, prune
from amprune.report import speedup_text, summary

VARIANTS = {  # folder name → how it is pruned
    "amp20-query": dict(ratio=0.2, gqa_mode="query"),
    "amp20-group": dict(ratio=0.2, gqa_mode="group"),
    "amp30-query": dict(ratio=0.3, gqa_mode="query"),
    "amp30-group": dict(ratio=0.3, gqa_mode="group"),
    # 30 % query keeps 6 of 9 heads and 886 neurons; these keep a multiple of 8 / 64 neurons (`--round-to`).
    "amp30-query-r8": dict(ratio=0.3, gqa_mode="query", round_to=8),
    "amp30-query-r64": dict(ratio=0.3, gqa_mode="query", round_to=64),
}
TARGET = ("amp30-query", "amp30-group", "amp30-query-r8", "amp30-query-r64")
PROTOCOL = ("amp20-query", "amp20-group", "amp30-query", "amp30-group")
WIDTHS = (1536, 1188, 1145, 1144, 928, 896, 888, 886)  # dense; the plans' kept neurons and their roundings


def prune_all(work: Path) -> dict[str, str]:
    folders = {}
    for name, how in VARIANTS.items():
        out = work / name
        if not (out / "amprune_plan.json").is_file():
            prune(PruneRequest(out=str(out), recipe="paper", samples=16, seq_len=256, progress=False, **how))
        folders[name] = str(out)
    return folders


def gemm_widths(rounds: int, threads: int | None) -> dict[str, dict[int, float]]:
    """Median time per neuron of the MLP GEMMs at every width, relative to the dense width."""
    if threads:
        torch.set_num_threads(threads)
    tokens, hidden = 8 * 128, 576
    x = torch.randn(tokens, hidden)
    weights = {i: (torch.randn(i, hidden), torch.randn(hidden, i), torch.randn(tokens, i)) for i in WIDTHS}
    ops = {"gate/up": lambda i: torch.nn.functional.linear(x, weights[i][0]),
           "down": lambda i: torch.nn.functional.linear(weights[i][2], weights[i][1])}
    relative = {}
    gc.disable()
    with torch.inference_mode():
        for name, op in ops.items():
            times: dict[int, list[float]] = {i: [] for i in WIDTHS}
            for round_ in range(rounds + 2):  # two warm-up rounds
                for i in WIDTHS:
                    start = time.perf_counter()
                    op(i)
                    if round_ >= 2:
                        times[i].append(time.perf_counter() - start)
            per_neuron = {i: float(np.median(t)) / i for i, t in times.items()}
            relative[name] = {i: per_neuron[i] / per_neuron[WIDTHS[0]] for i in WIDTHS}
    gc.enable()
    return relative


def kept(model: dict) -> str:
    """Heads · KV heads · neurons per layer, from the model's saved config (n/a once it is gone)."""
    path = Path(model["loaded_from"]) / "config.json"
    if not path.is_file():
        return "n/a"
    config = json.loads(path.read_text())
    return f"{config['num_attention_heads']} · {config['num_key_value_heads']} · {config['intermediate_size']}"


def markdown(result: dict) -> str:
    """Rows: model × workload, with tokens/s, measured and ideal speedup."""
    names = ["dense"] + [Path(m["source"]).name for m in result["models"][1:]]
    lines = [
        "| model | heads · KV · neurons | params | KV B/token | peak mem MiB | workload | tokens/s "
        "| speedup (median [p25–p75]) | fastest-run speedup | ideal (FLOPs) | measured / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, (name, model) in enumerate(zip(names, result["models"], strict=True)):
        cost, peak = model["cost"], model["peak_memory_bytes"]
        for work in result["workloads"]:
            entry = work["results"][index]
            head = (f"{name} | {kept(model)} | {cost['params'] / 1e6:.1f} M | {cost['kv_bytes_per_token']:,} | "
                    f"{'n/a' if peak is None else f'{peak / 2**20:,.0f}'}")
            if index:
                rest = (f"{speedup_text(entry['speedup'])} | {entry['speedup_of_fastest']:.3f}× | "
                        f"{entry['ideal_speedup']:.3f}× | {entry['fraction_of_ideal']:.0%}")
            else:
                rest = "1 | 1 | 1 | —"
            lines.append(f"| {head} | {work['name']} | {entry['tokens_per_s']:,.1f} | {rest} |")
            if "decode" in entry:  # a generation's cached steps alone
                d = entry["decode"].get("speedup")
                rest = f"{speedup_text(d)} | | |" if d else "1 | | |"
                lines.append(f"| {head} | decode steps | {entry['decode']['tokens_per_s']:,.1f} | {rest} |")
    return "\n".join(lines)


def show(name: str, result: dict) -> None:
    """A pass's result: amprune's own summary, then the Markdown table for docs/RESULTS.md."""
    print(f"## {name} pass\n\n{summary(result)}\n\n{markdown(result)}\n", flush=True)


def print_widths(widths: dict[str, dict[int, float]]) -> None:
    lines = ["| GEMM | " + " | ".join(f"I = {i}" for i in WIDTHS) + " |", "|---" * (len(WIDTHS) + 1) + "|"]
    lines += [f"| {op} | " + " | ".join(f"{v:.2f}" for v in rel.values()) + " |" for op, rel in widths.items()]
    print("## widths: time per neuron relative to I = 1536 (median)\n\n" + "\n".join(lines) + "\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench-speed", help="folder for the pruned models")
    parser.add_argument("--results", default="docs/bench", help="folder for JSON and PNG (default: docs/bench)")
    parser.add_argument("--passes", default="target,widths,protocol",
                        help="which passes, in order (default: all); 'report' prints the tables of the JSONs "
                        "already under --results")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds per workload (default: 10)")
    parser.add_argument("--runs", type=int, default=20, help="timed rounds per workload (default: 20)")
    parser.add_argument("--prefill-len", type=int, default=128, help="prefill length (default: 128)")
    parser.add_argument("--gemm-rounds", type=int, default=30, help="timed rounds of the widths pass (default: 30)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    passes = args.passes.split(",")
    unknown = set(passes) - {"target", "widths", "protocol", "report"}
    if unknown:
        parser.error(f"unknown passes: {', '.join(sorted(unknown))}")
    folders = prune_all(work) if {"target", "protocol"} & set(passes) else {}
    models = {"target": TARGET, "protocol": PROTOCOL}
    for name in passes:
        if name == "report":
            for saved in [m for m in models if (results / f"{m}.json").is_file()]:
                result = json.loads((results / f"{saved}.json").read_text())
                show(saved, result)
            if (results / "widths.json").is_file():
                print_widths(json.loads((results / "widths.json").read_text()))
        elif name == "widths":
            widths = gemm_widths(args.gemm_rounds, args.threads)
            (results / "widths.json").write_text(json.dumps(widths, indent=2) + "\n")
            print_widths(widths)
        else:
            only_prefill_b8 = dict(batch_sizes=[8], new_tokens=0, memory=False) if name == "target" else {}
            result = bench(BenchRequest(
                models=[folders[m] for m in models[name]], out=str(results / f"{name}.json"),
                png=str(results / f"{name}.png"), protocol="paper", prefill_len=args.prefill_len,
                warmup=args.warmup, runs=args.runs, threads=args.threads, **only_prefill_b8,
            ))
            show(name, result)

if __name__ == "__main__":
    main()
