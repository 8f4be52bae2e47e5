"""The layer engine against the whole-model pipeline it replaced, on the packaged SmolLM2-135M.

Two passes, each command in a fresh process (`python -m amprune prune …`), from `git archive` snapshots
so that edits in the working tree cannot reach them:

- `same`: the paper's AMP (`--ratio 0.3`, the old default command) and the README's best recipe (one-pass
  re-fit with the obs scorer on 144 samples of C4 + Wikipedia), once with the code before the engine
  (`--before`, a commit) and once with the engine (`--after`, a commit), alternating (the order reverses every
  other round).
  Records wall time and the peak RSS each command reports (its own `ru_maxrss`), and compares the two
  checkpoints: the same keep lists, and the largest absolute difference over all saved tensors.
- `ranks`: the engine's `--recipe paper` command in one process (2 threads) and under `torchrun` with 2 gloo
  ranks (1 thread each), alternating: calibration tokens per second of the pruning pass.

Usage:
  python benchmarks/layer_engine.py --before 25d6d0e --after HEAD [--rounds 2] [--passes same,ranks]
      [--recipes paper,best]
      [--json benchmarks/results/layer_engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import machine  # noqa: E402

RECIPES = {  # the same commands in the flags of each version (the engine's with recipes: --recipe paper)
    "paper": ([], ["--recipe", "paper"]),
    "best": (["--reconstruct", "--one-pass", "--scorer", "obs", "--calib", "c4,wiki", "--samples", "144"],
             ["--recipe", "paper", "--correction", "refit-one-pass", "--scorer", "obs", "--calib", "c4,wiki",
              "--samples", "144"]),
}


def snapshot(commit: str, work: Path) -> Path:
    """The source tree of `commit`, extracted once under `work`."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    folder = work / f"src-{sha}"
    if not folder.exists():
        folder.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def timed(command: list[str], env: dict) -> dict:
    """Run `command`; its wall time, the peak RSS its summary reports (rank 0's under torchrun), its output."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    peak = re.search(r"peak memory: ([\d.]+) GiB", stdout)
    return {"seconds": seconds, "peak_rss_gib": float(peak.group(1)) if peak else None, "stdout": stdout}


def prune_command(source: Path, flags: list[str], out: Path, ranks: int = 1) -> list[str]:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc-per-node", str(ranks)]
    return [*launcher, "-m", "amprune", "--quiet", "prune", "--ratio", "0.3", *flags, "--out", str(out),
            "--overwrite"]


def compare_checkpoints(a: Path, b: Path) -> dict:
    plans = [json.loads((folder / "amprune_plan.json").read_text())["layers"] for folder in (a, b)]
    same_units = all(x[key] == y[key] for x, y in zip(*plans, strict=True)
                     for key in ("heads_kept", "kv_heads_kept", "neurons_kept"))
    tensors = [{k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
               for folder in (a, b)]
    same_names = sorted(tensors[0]) == sorted(tensors[1])
    worst = max((tensors[0][k].float() - tensors[1][k].float()).abs().max().item()
                for k in tensors[0] if k in tensors[1])
    return {"same_units": same_units, "same_tensor_names": same_names, "max_abs_diff": worst}


def env_for(source: Path, threads: int) -> dict:
    return dict(os.environ, PYTHONPATH=str(source / "src"), OMP_NUM_THREADS=str(threads))


def pass_same(args, work: Path) -> dict:
    versions = {"before": snapshot(args.before, work), "after": snapshot(args.after, work)}
    results = {}
    for recipe, (old_flags, new_flags) in ((r, RECIPES[r]) for r in args.recipes.split(",")):
        rows = {"before": [], "after": []}
        for round_ in range(args.rounds):
            order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
            for version in order:
                flags = old_flags if version == "before" else new_flags
                out = work / f"{recipe}-{version}"
                run = timed(prune_command(versions[version], flags, out), env_for(versions[version], args.threads))
                rows[version].append({k: v for k, v in run.items() if k != "stdout"})
                print(f"{recipe} {version} round {round_}: {run['seconds']:.1f} s, peak {run['peak_rss_gib']} GiB",
                      flush=True)
        check = compare_checkpoints(work / f"{recipe}-before", work / f"{recipe}-after")
        median = {v: statistics.median(r["seconds"] for r in rows[v]) for v in rows}
        results[recipe] = {"runs": rows, "checkpoints": check, "median_seconds": median,
                           "time_ratio_after_before": median["after"] / median["before"],
                           "flags": {"before": old_flags, "after": new_flags}}
        print(recipe, json.dumps({k: v for k, v in results[recipe].items() if k != "runs"}), flush=True)
    return results


def pass_ranks(args, work: Path) -> dict:
    source = snapshot(args.after, work)
    flags = RECIPES["paper"][1]
    rows = {1: [], 2: []}
    for round_ in range(args.rounds):
        for ranks in ([1, 2] if round_ % 2 == 0 else [2, 1]):
            env = env_for(source, args.threads // ranks)
            run = timed(prune_command(source, flags, work / f"ranks-{ranks}", ranks), env)
            pass_seconds = float(re.search(r"prune ([\d.]+) s", run["stdout"]).group(1))
            tokens = int(re.search(r"\((\d+) tokens\)", run["stdout"]).group(1))
            rows[ranks].append({"seconds": run["seconds"], "pass_seconds": pass_seconds,
                                "tokens_per_second": tokens / pass_seconds, "peak_rss_gib": run["peak_rss_gib"]})
            print(f"{ranks} rank(s) round {round_}: pass {pass_seconds:.1f} s, {tokens / pass_seconds:.0f} tokens/s",
                  flush=True)
    check = compare_checkpoints(work / "ranks-1", work / "ranks-2")
    return {"runs": {str(k): v for k, v in rows.items()}, "checkpoints": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="25d6d0e", help="commit of the whole-model pipeline")
    parser.add_argument("--after", default="HEAD", help="commit of the layer engine")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the ranks)")
    parser.add_argument("--passes", default="same,ranks")
    parser.add_argument("--recipes", default="paper,best", help="which commands the `same` pass compares")
    parser.add_argument("--work", default=None, help="folder for snapshots and checkpoints (default: a temporary one)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "layer_engine.json"))
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="amprune-engine-"))
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    result = {"command": "python benchmarks/layer_engine.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "torch": torch.__version__}
    for name in args.passes.split(","):
        result[name] = {"same": pass_same, "ranks": pass_ranks}[name](args, work)
        result["date"] = f"{started}–{time.strftime('%H:%M', time.gmtime())} UTC"
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
