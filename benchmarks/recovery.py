"""LoRA recovery settings, side by side, from one pruned checkpoint of the packaged SmolLM2-135M-Instruct.

    python benchmarks/recovery.py --model /tmp/amprune-v5/obs1-0.3 --calib c4,wiki --max-steps 300 --lrs 1e-3

For every (learning rate, rank) pair `amprune recover` runs as a child process (its wall time, per-step
times and peak RSS are its own), then the perplexities of the dense model the plan names, the pruned
checkpoint and every recovered one are measured in this process on the evaluation halves of the packaged
Wikipedia and C4 texts (the protocol of benchmarks/reconstruction.py: 8 windows of 512 tokens). Results
go to `--out` after every measurement; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from host import machine
from reconstruction import ROOT, load, perplexities, run_step

from amprune.models.loading import resolve_model
from amprune.plan import Plan


def table(results: dict) -> str:
    dense = results["models"]["dense"]
    lines = ["| model | lr | rank | wiki ppl | × dense | C4 ppl | × dense | recover (s) | peak RSS (GiB) |",
             "|" + "---|" * 9]
    for name, entry in results["models"].items():
        run = entry.get("run")
        recover = f"{run['steps_s']['recover']:.0f} | {run['peak_rss_bytes'] / 2**30:.2f}" if run else "— | —"
        lines.append(
            f"| {name} | {entry.get('lr', '—')} | {entry.get('rank', '—')} | {entry['ppl_wiki']:.2f} | "
            f"{entry['ppl_wiki'] / dense['ppl_wiki']:.3f} | {entry['ppl_c4']:.2f} | "
            f"{entry['ppl_c4'] / dense['ppl_c4']:.3f} | {recover} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder written by `amprune prune` (its plan names the dense)")
    parser.add_argument("--calib", default="c4,wiki", help="recovery text(s), `recover --calib` (default: c4,wiki)")
    parser.add_argument("--max-steps", type=int, default=300, help="recovery steps of 512 tokens (default: 300)")
    parser.add_argument("--lrs", default="3e-4", help="learning rates, comma-separated (default: 3e-4, the paper's)")
    parser.add_argument("--ranks", default="8", help="LoRA ranks, comma-separated; alpha = 2 × rank (default: 8)")
    parser.add_argument("--distill", action="store_true",
                        help="`recover --distill`: KL to the dense model the plan names instead of the next-token loss")
    parser.add_argument("--ppl-windows", type=int, default=8, help="perplexity windows per text (default: 8)")
    parser.add_argument("--work", default="/tmp/amprune-recovery", help="folder for the recovered checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="reuse recovered checkpoints already in --work (their recovery time is not measured)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recovery.json"))
    args = parser.parse_args()
    plan = Plan.load(args.model)
    dense_source = resolve_model(plan.settings["model"])
    results: dict = {
        "meta": {"command": "python benchmarks/recovery.py " + " ".join(sys.argv[1:]), "machine": machine(),
                 "date": time.strftime("%Y-%m-%d"), "settings": vars(args)},
        "models": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)

    def measure_ppl(name: str, folder: str) -> None:
        results["models"][name] |= perplexities(*load(folder), args.ppl_windows, 512)
        print(name, results["models"][name], flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")

    runs = {}
    for lr, rank in itertools.product(args.lrs.split(","), args.ranks.split(",")):
        kind = "distill" if args.distill else "lora"
        folder = str(Path(args.work) / f"{kind}-lr{lr}-r{rank}")
        flags = ["--calib", args.calib, "--max-steps", str(args.max_steps), "--lr", lr, "--rank", rank,
                 "--alpha", str(2 * int(rank)), *(["--distill"] if args.distill else [])]
        reuse = args.resume and (Path(folder) / "config.json").is_file()  # saved atomically: present = complete
        run = None if reuse else run_step(["recover", "--model", args.model, "--out", folder, *flags, "--overwrite"])
        runs[f"+{kind} lr {lr} rank {rank}"] = folder, {"lr": float(lr), "rank": int(rank), "run": run}
    for name, folder in (("dense", dense_source), ("pruned", args.model)):
        results["models"][name] = {}
        measure_ppl(name, folder)
    for name, (folder, entry) in runs.items():
        results["models"][name] = entry
        measure_ppl(name, folder)
    print(table(results))


if __name__ == "__main__":
    main()
