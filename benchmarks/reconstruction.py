"""Reconstruction and recovery on the packaged SmolLM2-135M-Instruct at several pruning ratios.

    nohup nice -n 5 .venv/bin/python benchmarks/reconstruction.py > /tmp/reconstruction.log 2>&1 &

For every ratio (in the order given) the builds run as child processes, so each one's wall time,
per-step times (from its summary) and peak memory (the child's peak RSS) are its own:
`amprune prune --reconstruct` (variant amp+rec), with `--one-pass` also `prune --reconstruct --one-pass`
(amp+rec one-pass: AMP scored on the pruned stream in the same pass), with `--obs` also `prune
--reconstruct --one-pass --scorer obs` (obs+rec one-pass: units chosen by the re-fit's own error); then
`amprune recover` from every build named in `--recover-from` (variant BUILD+lora), with `--distill` also
`recover --distill` (BUILD+distill). Plain AMP is the amp+rec plan applied without reconstruction
(`surgery.apply_plan` on the dense model, in this process): the units two-pass AMP removes do not depend on
reconstruction. Then the perplexities of the dense model and every variant are measured on the
evaluation halves of the packaged Wikipedia and C4 texts. No new ratio starts after `--ratio-deadline`.
Zero-shot (`amp5`, `--limit` documents per task) runs last, model by model in the order of the ratios,
until `--deadline`; models it did not reach show no amp5 figure. Results go to
benchmarks/results/reconstruction.json after every measurement; at the end the tables are printed (they
go into docs/RESULTS.md by hand, with the prose) and the plot is drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from host import machine

from amprune.evaluation import perplexity, zero_shot
from amprune.models import get_family
from amprune.models.loading import load_model, load_tokenizer, resolve_model
from amprune.plan import Plan
from amprune.surgery import apply_plan

ROOT = Path(__file__).resolve().parent.parent
# build key: (variant, extra `amprune prune --recipe paper` flags); the checkpoint goes to WORK/KEY-RATIO
BUILDS = {
    "rec": ("amp+rec", ["--correction", "refit"]),
    "rec1": ("amp+rec one-pass", ["--correction", "refit-one-pass"]),  # AMP scored on the pruned stream
    "obs1": ("obs+rec one-pass", ["--correction", "refit-one-pass", "--scorer", "obs"]),  # the re-fit's error decides
}
# recovery key: extra `amprune recover` flags; from build B: variant "VARIANT(B)+KEY", folder WORK/B-KEY-RATIO
RECOVERIES = {"lora": [], "distill": ["--distill"]}


def run_step(args: list[str]) -> dict:
    """Run `python -m amprune ARGS` in a child process; its wall time, peak RSS and per-step times."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "amprune", "--quiet", *args], stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"amprune {' '.join(args)} failed:\n{output}")
    steps = re.search(r"^time: (.*)$", output, re.MULTILINE)
    parts = [part.rsplit(" ", 2) for part in steps.group(1).split(" · ")] if steps else []
    print(output, flush=True)
    return {
        "command": "amprune " + " ".join(args),
        "wall_s": time.perf_counter() - started,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "steps_s": {name: float(value) for name, value, _ in parts},
    }


STARTED = datetime.now(timezone.utc)


def past(deadline: str | None) -> bool:
    """Whether the UTC clock has passed `deadline` (HH:MM: its first occurrence after the script started, so a
    deadline after midnight works; None: never)."""
    if deadline is None:
        return False
    at = datetime.combine(STARTED.date(), datetime.strptime(deadline, "%H:%M").time(), tzinfo=timezone.utc)
    return datetime.now(timezone.utc) >= (at if at >= STARTED else at + timedelta(days=1))


def load(folder: str, plan_from: str | None = None):
    """A model and tokenizer; with `plan_from`, the dense model sliced by that folder's plan (plain AMP)."""
    model = load_model(folder, torch.device("cpu"), torch.float32)
    if plan_from is not None:
        apply_plan(model, get_family(model.config.model_type), Plan.load(plan_from))
    return model, load_tokenizer(folder)


def perplexities(model, tokenizer, windows: int, seq_len: int) -> dict[str, float]:
    """ppl_wiki and ppl_c4: perplexity on `windows` windows of `seq_len` tokens of each evaluation half."""
    return {
        f"ppl_{source}": perplexity(
            model, tokenizer, source=source, seq_len=seq_len, max_windows=windows, progress=False
        )["ppl"]
        for source in ("wiki", "c4")
    }


def table(results: dict) -> str:
    def cell(entry: dict, key: str, digits: int = 2, scale: float = 1.0) -> str:
        return f"{scale * entry[key]:.{digits}f}" if key in entry else "—"

    dense = results["models"]["dense"]
    lines = ["| ratio | model | wiki ppl | × dense | C4 ppl | × dense | amp5 avg (%) |", "|" + "---|" * 7]
    for entry in sorted(results["models"].values(), key=lambda e: (e.get("ratio", 0.0), e.get("variant", ""))):
        ratio = entry.get("ratio", 0.0)
        lines.append(
            f"| {ratio:.0%} | {entry.get('variant', 'dense')} | {cell(entry, 'ppl_wiki')} | "
            f"{entry['ppl_wiki'] / dense['ppl_wiki']:.2f} | {cell(entry, 'ppl_c4')} | "
            f"{entry['ppl_c4'] / dense['ppl_c4']:.2f} | {cell(entry, 'amp5', 1, 100)} |"
        )
    lines += ["", "| ratio | variant | step | time (s) | time beyond a calibration pass, in calibration passes "
              "| process peak RSS (GiB) |", "|" + "---|" * 6]
    for ratio, steps in sorted(results["steps"].items()):
        calibrate = steps["amp+rec"]["steps_s"]["calibrate"]  # the pass plain AMP needs, measured in the same run
        lines.append(f"| {float(ratio):.0%} | amp | calibrate | {calibrate:.0f} | 0 | — |")
        for variant, run in steps.items():
            step = "recover" if "recover" in run["steps_s"] else "reconstruct"
            seconds = run["steps_s"][step]
            # a one-pass build has no calibration pass: its reconstruction replaces that pass
            extra = "—" if step == "recover" else f"{seconds / calibrate - ('calibrate' not in run['steps_s']):.2f}"
            lines.append(f"| {float(ratio):.0%} | {variant} | {step} | {seconds:.0f} | {extra} | "
                         f"{run['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    metrics = (("ppl_wiki", "Wikipedia perplexity"), ("ppl_c4", "C4 perplexity"), ("amp5", "amp5 zero-shot average"))
    metrics = tuple(m for m in metrics if any(m[0] in e for e in models.values()))  # only measured ones
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.7 * len(metrics), 4))
    for ax, (metric, label) in zip(axes, metrics, strict=True):
        for variant in dict.fromkeys(e["variant"] for e in models.values() if "variant" in e):
            points = sorted(
                (e["ratio"], e[metric]) for e in models.values() if e.get("variant") == variant and metric in e
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        if metric in models["dense"]:
            ax.axhline(models["dense"][metric], color="black", linestyle="--", label="dense")
        ax.set_xlabel("pruning ratio (fraction of all parameters)")
        ax.set_title(label)
        if metric != "amp5":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("SmolLM2-135M-Instruct: AMP, + reconstruction, + LoRA recovery (next-token or distillation loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def builds(args) -> list[str]:
    """The build keys a run with these arguments makes at every ratio."""
    return ["rec", *(["rec1"] if args.one_pass else []), *(["obs1"] if args.obs else [])]


def recoveries(args) -> list[tuple[str, str]]:
    """(build, recovery) keys a run with these arguments makes at every ratio."""
    if args.max_steps == 0:
        return []
    kinds = ["lora", *(["distill"] if args.distill else [])]
    return [(build, kind) for build in args.recover_from.split(",") for kind in kinds]


def recovery_variant(build: str, kind: str) -> str:
    """The variant name of recovery `kind` from build `build`, e.g. amp+rec+lora."""
    return f"{BUILDS[build][0]}+{kind}"


def variant_names(args) -> dict[str, str]:
    """Folder prefix → variant name, for every checkpoint a run with these arguments makes."""
    names = {build: BUILDS[build][0] for build in builds(args)}
    return names | {f"{build}-{kind}": recovery_variant(build, kind) for build, kind in recoveries(args)}


def model_folders(args, work: Path, ratios: list[float], dense_source: str) -> dict[str, tuple[str, str | None]]:
    """The dense model and every finished ratio's variants, as `load` arguments."""
    folders: dict[str, tuple[str, str | None]] = {"dense": (dense_source, None)}
    for ratio in ratios:
        rec = work / f"rec-{ratio}"
        if rec.is_dir():  # saved atomically: present means complete
            folders[f"amp@{ratio}"] = (dense_source, str(rec))
        for prefix, variant in variant_names(args).items():
            if (work / f"{prefix}-{ratio}").is_dir():
                folders[f"{variant}@{ratio}"] = (str(work / f"{prefix}-{ratio}"), None)
    return folders


def model_names(args) -> dict[str, str]:
    """Folder prefix → variant name for every pruned model of a run, plain AMP ("amp") included."""
    return {"amp": "amp"} | variant_names(args)


def zero_shot_variants(args) -> list[str]:
    """The variants the zero-shot phase evaluates (beside the dense model): all, or `--zero-shot-models`."""
    names = model_names(args)
    return [names[prefix] for prefix in (args.zero_shot_models.split(",") if args.zero_shot_models else names)]


def zero_shot_phase(args, work: Path, ratios: list[float], dense_source: str) -> None:
    """amp5 for every model as its checkpoints appear (another process may still be making them), until
    `--deadline`; results accumulate in `--zero-shot-out`."""
    path = Path(args.zero_shot_out)
    done = json.loads(path.read_text()) if path.exists() else {"limit": args.limit, "amp5": {}}
    done["command"] = "python benchmarks/reconstruction.py " + " ".join(sys.argv[1:])
    variants = zero_shot_variants(args)
    while not past(args.deadline):
        todo = [(name, source) for name, source in model_folders(args, work, ratios, dense_source).items()
                if name not in done["amp5"] and (name == "dense" or name.split("@")[0] in variants)]
        if not todo:
            expected = {"dense"} | {f"{v}@{r}" for v in variants for r in ratios}
            if expected <= done["amp5"].keys():
                return
            time.sleep(60)
            continue
        name, source = todo[0]
        model, tokenizer = load(*source)
        done["amp5"][name] = zero_shot(model, tokenizer, tasks="amp5", limit=args.limit)["averages"]["amp5"]
        path.write_text(json.dumps(done, indent=1) + "\n")
        print(name, "amp5", done["amp5"][name], flush=True)
    print(f"deadline {args.deadline} UTC reached", flush=True)


def report(args) -> None:
    """Merge the perplexity and zero-shot results, print the tables, draw the plot."""
    results = json.loads(Path(args.out).read_text())
    for extra in filter(None, args.merge.split(",")):  # builds of other ratios run in parallel processes
        more = json.loads(Path(extra).read_text())
        results["models"].update({k: v for k, v in more["models"].items() if k != "dense"})
        results["steps"].update(more["steps"])
    path = Path(args.zero_shot_out)
    if path.exists():
        for name, value in json.loads(path.read_text())["amp5"].items():
            if name in results["models"]:
                results["models"][name]["amp5"] = value
    print(table(results))
    plot(results, Path(args.plot))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.3,0.5,0.2,0.1", help="pruning ratios, in this order")
    parser.add_argument("--calib", default="c4", help="calibration text, `amprune prune --calib` (default: c4)")
    parser.add_argument("--samples", type=int, default=48, help="calibration samples of 512 tokens (default: 48)")
    parser.add_argument("--max-steps", type=int,
                        help="LoRA recovery steps of 512 tokens; 0: no recovery (default: the full --epochs)")
    parser.add_argument("--epochs", type=int, default=2, help="LoRA recovery epochs (default: 2, the paper's)")
    parser.add_argument("--recover-text", default="c4", help="recovery text(s), `recover --calib` (default: c4)")
    parser.add_argument("--one-pass", action="store_true",
                        help="also prune with `--reconstruct --one-pass` (build rec1, variant 'amp+rec one-pass')")
    parser.add_argument("--obs", action="store_true", help="also prune with `--reconstruct --one-pass --scorer obs` "
                        "(build obs1, variant 'obs+rec one-pass')")
    parser.add_argument("--recover-from", default="rec",
                        help="builds to recover from, comma-separated: rec, rec1, obs1 (default: rec)")
    parser.add_argument("--distill", action="store_true",
                        help="also recover with `amprune recover --distill` (variant BUILD+distill)")
    parser.add_argument("--no-dense", action="store_true", help="build: skip the dense model (another build has it)")
    parser.add_argument("--ppl-windows", type=int, default=8, help="perplexity windows per text (default: 8)")
    parser.add_argument("--ppl-seq-len", type=int, default=512, help="perplexity window length (default: 512)")
    parser.add_argument("--limit", type=int, default=50, help="zero-shot documents per task (default: 50)")
    parser.add_argument("--zero-shot-models", default="",
                        help="zero-shot: only these models beside the dense one, comma-separated folder prefixes "
                        "(amp, rec, rec1, obs1, BUILD-lora, ...; default: all)")
    parser.add_argument("--ratio-deadline", help="UTC time (HH:MM) after which no new ratio starts")
    parser.add_argument("--deadline", help="UTC time (HH:MM) after which no zero-shot run starts")
    parser.add_argument("--work", default="/tmp/amprune-reconstruction", help="folder for the checkpoints")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reconstruction.json"))
    parser.add_argument("--zero-shot-out", default=str(ROOT / "benchmarks" / "results" / "reconstruction_amp5.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "reconstruction.png"), help="where the PNG goes")
    parser.add_argument("--merge", default="", help="report: other builds' result files to add, comma-separated")
    parser.add_argument(
        "--phase", choices=("all", "build", "zero-shot", "report"), default="all",
        help="build: checkpoints, times and perplexities; zero-shot: amp5 as checkpoints appear (can run beside "
        "build); report: tables and plot; all: the three in turn",
    )
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    ratios = [float(r) for r in args.ratios.split(",")]
    unknown = set(args.recover_from.split(",")) - set(builds(args))
    if unknown:
        parser.error(f"--recover-from {','.join(sorted(unknown))}: not built in this run (builds: {builds(args)})")
    unknown = set(filter(None, args.zero_shot_models.split(","))) - model_names(args).keys()
    if unknown:
        parser.error(f"--zero-shot-models {','.join(sorted(unknown))}: not made in this run "
                     f"(models: {', '.join(model_names(args))})")
    dense_source = resolve_model(None)
    if args.phase == "zero-shot":
        return zero_shot_phase(args, work, ratios, dense_source)
    if args.phase == "report":
        return report(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "meta": {"command": "python benchmarks/reconstruction.py " + " ".join(sys.argv[1:]), "machine": machine(),
                 "date": time.strftime("%Y-%m-%d"), "settings": vars(args)},
        "models": {}, "steps": {},
    }
    save = lambda: out.write_text(json.dumps(results, indent=1) + "\n")  # noqa: E731

    def measure_ppl(name: str) -> None:
        model, tokenizer = load(*model_folders(args, work, ratios, dense_source)[name])
        results["models"][name] |= perplexities(model, tokenizer, args.ppl_windows, args.ppl_seq_len)
        print(name, results["models"][name], flush=True)
        save()

    if not args.no_dense:
        results["models"]["dense"] = {}
        measure_ppl("dense")
    for ratio in ratios:
        if past(args.ratio_deadline):
            print(f"{args.ratio_deadline} UTC reached: ratio {ratio} and later not run", flush=True)
            break
        steps = results["steps"][str(ratio)] = {}
        for build in builds(args):
            variant, flags = BUILDS[build]
            steps[variant] = run_step(["prune", "--recipe", "paper", "--ratio", str(ratio), "--calib", args.calib,
                                       "--samples", str(args.samples), *flags,
                                       "--out", str(work / f"{build}-{ratio}"), "--overwrite"])
            save()
        bound = [] if args.max_steps is None else ["--max-steps", str(args.max_steps)]
        for build, kind in recoveries(args):
            steps[recovery_variant(build, kind)] = run_step([
                "recover", "--model", str(work / f"{build}-{ratio}"), "--out", str(work / f"{build}-{kind}-{ratio}"),
                *RECOVERIES[kind], "--epochs", str(args.epochs), "--calib", args.recover_text, *bound, "--overwrite"])
            save()
        for variant in ["amp", *variant_names(args).values()]:
            results["models"][f"{variant}@{ratio}"] = {"ratio": ratio, "variant": variant}
            measure_ppl(f"{variant}@{ratio}")

    if args.phase == "all":
        zero_shot_phase(args, work, ratios, dense_source)
        report(args)


if __name__ == "__main__":
    main()
