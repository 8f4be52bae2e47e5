"""`amprune compare`: every scorer on the same model, calibration, plan rules, surgery and evaluation.

One calibration pass feeds all activation scorers (Taylor adds a backward pass); then every
(scorer, ratio) pair is planned with the same budget, sliced from a fresh copy of the dense model
(optionally with reconstruction) and evaluated. Results are rewritten after every run, so finished
runs survive a later failure:

    OUT/compare.json   settings, dense and per-run metrics (errors included)
    OUT/compare.md     the Markdown table
    OUT/perplexity.png, OUT/accuracy.png   metric against ratio, one line per scorer
    OUT/amp_scores.png per-layer heatmap of AMP head and neuron scores
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibration import calibration_set, check_scorers, read_calibration, score_units
from .errors import AmpruneError
from .models.loading import load_model, load_tokenizer, resolve_device_dtype
from .pipeline import describe_model
from .plan import Plan, check_ratios, select_units
from .reconstruct import reconstruct
from .surgery import apply_plan
from .versions import package_versions

logger = logging.getLogger(__name__)

# An evaluation: (model, tokenizer) → {"perplexity": float, "accuracy": {task: fraction}}.
Evaluate = Callable[[torch.nn.Module, object], dict]


@dataclass
class CompareRequest:
    """Everything `amprune compare` is asked to do."""

    out: str
    model: str | None = None
    scorers: list[str] = field(default_factory=lambda: ["amp", "wanda_sp", "flap", "magnitude", "random"])
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    gqa_mode: str = "query"
    calib: str = "c4"
    samples: int = 64
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    tasks: str | None = "amp5"  # None: perplexity only
    limit: int | None = None  # first `limit` documents of every task
    ppl_source: str = "wiki"
    ppl_seq_len: int = 512
    ppl_windows: int | None = None
    reconstruct: bool = False  # every run re-fits o_proj/down_proj during surgery (amprune.reconstruct)
    dtype: str | None = None
    device: str | None = None
    progress: bool = True


def default_evaluate(request: CompareRequest) -> Evaluate:
    """Perplexity and zero-shot accuracy (headline metric per task) through `amprune.evaluation`."""
    from .evaluation import perplexity, zero_shot

    def evaluate(model: torch.nn.Module, tokenizer) -> dict:
        ppl = perplexity(model, tokenizer, request.ppl_source, request.ppl_seq_len, request.ppl_windows,
                         progress=False)
        metrics = {"perplexity": ppl["ppl"]}
        if request.tasks:
            tasks = zero_shot(model, tokenizer, request.tasks, request.limit, request.batch_size)["tasks"]
            metrics["accuracy"] = {name: task["headline"] for name, task in tasks.items()}
        return metrics

    return evaluate


def _with_average(metrics: dict) -> dict:
    accuracy = metrics.get("accuracy")
    if accuracy:
        metrics["average"] = sum(accuracy.values()) / len(accuracy)
    return metrics


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def run_compare(request: CompareRequest, evaluate: Evaluate | None = None) -> dict:
    """Run every (scorer, ratio) pair and write OUT/compare.{json,md} and the plots; returns the results."""
    # Fail before the expensive part: scorers, ratios, tasks and the output folder.
    check_scorers(request.scorers)
    if not request.scorers or not request.ratios:
        raise AmpruneError("give at least one scorer (--scorers) and one ratio (--ratios)")
    if request.tasks:
        from .evaluation import resolve_tasks

        resolve_tasks(request.tasks)
    if request.limit is not None and request.limit <= 0:
        raise AmpruneError(f"--limit must be positive, got {request.limit}")
    for ratio in request.ratios:
        check_ratios(ratio, None, None)
    calib_text = read_calibration(request.calib, request.samples, request.seq_len)
    info = describe_model(request.model)  # converts a .gguf (once)
    budgets = {ratio: info.budget(request.gqa_mode, ratio) for ratio in request.ratios}
    out = Path(request.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AmpruneError(f"cannot create the output folder {out}: {err.strerror}") from None
    evaluate = evaluate or default_evaluate(request)
    device, dtype = resolve_device_dtype(request.device, request.dtype)
    tokenizer = load_tokenizer(info.source)
    calib = calibration_set(calib_text, tokenizer, request.samples, request.seq_len, request.seed)

    model = load_model(info.source, device, dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tick = time.perf_counter()
    scores, _ = score_units(request.scorers, model, info.family, info.dims, calib, request.batch_size, pad_id,
                         request.seed, request.progress)
    results = {
        "settings": {**asdict(request), "model_type": info.config.model_type, "device": str(device),
                     "dtype": str(dtype).removeprefix("torch."), "calibration_tokens": calib.num_tokens},
        "dims": asdict(info.dims),
        "scoring_seconds": time.perf_counter() - tick,
        "versions": package_versions(),
        "dense": None,
        "runs": [],
    }
    if "amp" in scores:
        plot_amp_heatmap(*scores["amp"], out / "amp_scores.png")

    logger.info("evaluating the dense model")
    tick = time.perf_counter()
    results["dense"] = {"params": info.total_params, **_with_average(evaluate(model, tokenizer)),
                        "seconds": time.perf_counter() - tick}
    write_outputs(results, out)

    def pruned_copy(plan: Plan) -> torch.nn.Module:
        pruned = copy.deepcopy(model)
        if request.reconstruct:
            reconstruct(pruned, info.family, plan, calib, request.batch_size, pad_id, progress=False)
        else:
            apply_plan(pruned, info.family, plan)
        return pruned

    # Ratio by ratio, all scorers each time: if the time runs out, what finished is comparable.
    pairs = [(scorer, ratio) for ratio in request.ratios for scorer in request.scorers]
    started = time.perf_counter()
    bar = tqdm(pairs, desc="compare", unit="run", disable=not request.progress)
    for index, (scorer, ratio) in enumerate(bar):
        done = time.perf_counter() - started
        left = f"about {_duration(done / index * (len(pairs) - index))} left" if index else "time left unknown yet"
        bar.set_description(f"{scorer} @ {ratio:g}")
        logger.info("run %d/%d: %s at ratio %g (%s)", index + 1, len(pairs), scorer, ratio, left)
        run = _one_run(pruned_copy, tokenizer, info, budgets[ratio], scorer, ratio, scores[scorer], evaluate)
        results["runs"].append(run)
        write_outputs(results, out)
    return results


def _one_run(pruned_copy, tokenizer, info, budget, scorer: str, ratio: float, scores, evaluate: Evaluate) -> dict:
    """Plan, prune a copy of the dense model and evaluate it; a failure becomes an `error` entry."""
    row = {"scorer": scorer, "ratio": ratio, "achieved_fraction": budget.achieved_fraction,
           "params": budget.params_after}
    tick = time.perf_counter()
    pruned = None
    try:
        plan = Plan(dims=info.dims, budget=budget, layers=select_units(*scores, info.dims, budget))
        pruned = pruned_copy(plan)
        row.update(_with_average(evaluate(pruned, tokenizer)))
    except Exception as err:  # one failed run must not lose the others
        logger.error("run %s at ratio %g failed: %s", scorer, ratio, err, exc_info=logger.isEnabledFor(logging.DEBUG))
        row["error"] = f"{type(err).__name__}: {err}"
    finally:
        del pruned
    row["seconds"] = time.perf_counter() - tick
    return row


def write_outputs(results: dict, out: Path) -> None:
    """compare.json (atomically), compare.md and the metric plots (accuracy only with zero-shot tasks)."""
    staging = out / ".compare.json.tmp"
    staging.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(staging, out / "compare.json")
    (out / "compare.md").write_text(markdown_table(results) + "\n")
    plot_metric(results, "perplexity", "perplexity (log scale)", out / "perplexity.png", log=True)
    if any("average" in row for row in [results["dense"] or {}, *results["runs"]]):
        plot_metric(results, "average", "average zero-shot accuracy", out / "accuracy.png")


def _cell(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def markdown_table(results: dict) -> str:
    """One row per run (dense first): ratio, parameters, perplexity, accuracy per task and average."""
    dense = results["dense"]
    rows = [{"scorer": "dense", "ratio": 0.0, "achieved_fraction": 0.0, **dense}] if dense else []
    rows += sorted(results["runs"], key=lambda r: r["ratio"])  # stable: scorers in the order asked
    tasks = sorted({task for row in rows for task in row.get("accuracy", {})})
    header = ["scorer", "ratio", "removed", "params", "perplexity", *tasks] + (["average"] if tasks else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["scorer"], f"{row['ratio']:g}", f"{100 * row['achieved_fraction']:.1f} %", f"{row['params']:,}"]
        if "error" in row:
            cells += [f"failed: {row['error']}"] + [""] * (len(header) - 5)
        else:
            accuracy = row.get("accuracy", {})
            cells += [_cell(row.get("perplexity"))] + [_cell(accuracy.get(t), True) for t in tasks]
            cells += [_cell(row.get("average"), True)] if tasks else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metric(results: dict, key: str, label: str, path: Path, log: bool = False) -> None:
    """`key` against the achieved pruning fraction, one line per scorer, the dense model at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = (results["dense"] or {}).get(key)
    fig, ax = plt.subplots(figsize=(6, 4))
    for scorer in dict.fromkeys(r["scorer"] for r in results["runs"]):
        points = sorted((r["achieved_fraction"], r[key]) for r in results["runs"]
                        if r["scorer"] == scorer and r.get(key) is not None and math.isfinite(r[key]))
        if dense is not None:
            points.insert(0, (0.0, dense))
        if points:
            ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=scorer)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_amp_heatmap(head_scores: torch.Tensor, neuron_scores: torch.Tensor, path: Path) -> None:
    """log10 of AMP head scores (L × H) and neuron scores (L × I), one row per decoder layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 3]})
    for ax, scores, title in ((left, head_scores, "heads"), (right, neuron_scores, "MLP neurons")):
        image = ax.imshow(scores.double().clamp(min=1e-12).log10().numpy(), aspect="auto", cmap="viridis",
                          interpolation="nearest")
        ax.set_title(f"AMP {title} (log10 score)")
        ax.set_xlabel("head" if title == "heads" else "neuron")
        ax.set_ylabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
