"""Baselines side by side: every scorer on one model, same calibration, plan rules, surgery and evaluation.

Runs `amprune.compare.run_compare` in up to three phases: perplexity for every scorer and ratio;
zero-shot for a subset; perplexity with `--reconstruct` for a subset. Each phase writes its own folder and
a machine.json (command, machine, load, dates). Sized for a shared 2-core CPU: perplexity on a few
windows of the packaged Wikipedia evaluation half, zero-shot on the first `--limit` documents of each
task; every limit is in each compare.json (`settings`) and must be quoted with the numbers.

Usage:
  python benchmarks/compare.py --out docs/compare/smollm2 [--model M] [--scorers ...] [--ratios 0.1,0.2,0.3,0.5]
      [--ppl-windows 8] [--samples 16] [--reconstruct-scorers amp,flap --reconstruct-ratios 0.3,0.5]
      [--zero-shot-scorers amp,flap,random --zero-shot-ratios 0.3 --tasks amp5 --limit 40] [--phases ...]
  python benchmarks/compare.py --merge DIR1 DIR2 --out DIR     # runs split over processes → one table and plots
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from host import cpu_name, gpu_name

from amprune.compare import CompareRequest, run_compare, write_outputs


def _list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def run_state() -> dict:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": gpu_name(),
        "load_average": os.getloadavg(),
    }


def merge(folders: list[str], out: str) -> None:
    """One results set from runs split over processes (same model, calibration and seed): the dense row
    of the first folder, every run of all of them."""
    parts = [json.loads((Path(folder) / "compare.json").read_text()) for folder in folders]
    for part in parts[1:]:
        same = ("model", "calib", "samples", "seq_len", "seed", "ppl", "ppl_seq_len", "ppl_windows", "tasks")
        if any(part["settings"][key] != parts[0]["settings"][key] for key in same):
            raise SystemExit(f"cannot merge: settings differ between {folders[0]} and another folder")
    runs: dict[tuple, dict] = {}
    for run in (run for part in parts for run in part["runs"]):
        runs.setdefault((run["scorer"], run["ratio"]), run)  # a run present twice: the first folder's
    merged = {**parts[0], "runs": list(runs.values()), "merged_from": folders}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_outputs(merged, Path(out))
    (Path(out) / "perplexity_by_ratio.md").write_text(pivot(merged) + "\n")
    print(pivot(merged))


def pivot(results: dict) -> str:
    """Perplexity with one row per scorer and one column per ratio (parameters removed in the header)."""
    runs = results["runs"]
    ratios = sorted({run["ratio"] for run in runs})
    removed = {run["ratio"]: run["achieved_fraction"] for run in runs}
    header = ["scorer", *(f"{r:g} ({100 * removed[r]:.1f} % removed)" for r in ratios)]
    lines = [f"Dense model: perplexity {results['dense']['perplexity']:.2f}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scorer in dict.fromkeys(run["scorer"] for run in runs):
        cells = []
        for ratio in ratios:
            run = next((r for r in runs if r["scorer"] == scorer and r["ratio"] == ratio), None)
            cells.append("–" if run is None else run.get("error", "") or f"{run['perplexity']:,.2f}")
        lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--scorers", type=_list, default=_list("amp,reversed,random,magnitude,wanda_sp,flap,taylor"))
    parser.add_argument("--ratios", type=lambda t: [float(x) for x in _list(t)], default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--tasks", default="amp5", help="'none' for perplexity only")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration, gradient and evaluation batches")
    parser.add_argument("--reconstruct-scorers", type=_list, default=[],
                        help="then run these scorers with --reconstruct, perplexity only (OUT/reconstruct)")
    parser.add_argument("--reconstruct-ratios", type=lambda t: [float(x) for x in _list(t)])
    parser.add_argument("--zero-shot-scorers", type=_list, default=[],
                        help="then run these scorers with zero-shot --tasks (OUT/zero_shot)")
    parser.add_argument("--zero-shot-ratios", type=lambda t: [float(x) for x in _list(t)])
    parser.add_argument("--merge", nargs="+", metavar="FOLDER",
                        help="only merge these finished result folders into --out (tables and plots)")
    parser.add_argument("--phases", type=_list, default=["perplexity", "zero_shot", "reconstruct"],
                        help="which phases to run (to run them in separate processes)")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Phases, cheapest first, so that what finishes on a busy machine is a complete comparison:
    # perplexity for every (scorer, ratio); zero-shot for a subset; perplexity with reconstruction.
    common = dict(model=args.model, ppl_windows=args.ppl_windows, ppl_seq_len=args.ppl_seq_len, samples=args.samples,
                  seq_len=args.seq_len, limit=args.limit, batch_size=args.batch_size)
    tasks = None if args.tasks == "none" else args.tasks
    phases = [("perplexity", CompareRequest(out=args.out, scorers=args.scorers, ratios=args.ratios, tasks=None,
                                            **common))]
    if args.zero_shot_scorers and tasks:
        phases.append(("zero_shot", CompareRequest(
            out=str(Path(args.out) / "zero_shot"), scorers=args.zero_shot_scorers, tasks=tasks,
            ratios=args.zero_shot_ratios or args.ratios, **common)))
    if args.reconstruct_scorers:
        phases.append(("reconstruct", CompareRequest(
            out=str(Path(args.out) / "reconstruct"), scorers=args.reconstruct_scorers, correction="refit", tasks=None,
            ratios=args.reconstruct_ratios or args.ratios, **common)))
    command = "python " + shlex.join(["benchmarks/compare.py", *sys.argv[1:]])
    for name, request in phases:
        if name not in args.phases:
            continue
        started = run_state()
        run_compare(request)
        record = Path(request.out) / "machine.json"
        record.write_text(json.dumps({"command": command, "phase": name, "started": started,
                                      "finished": run_state()}, indent=1) + "\n")
        print((Path(request.out) / "compare.md").read_text())


if __name__ == "__main__":
    main()
