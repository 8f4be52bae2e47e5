"""`amprune compare`: every scorer on the same model, calibration, plan rules, surgery and evaluation.

One pass of the layer engine (`amprune.engine`) prunes every (scorer, ratio) pair at once: each layer is
read once, run once on the dense stream (all activation scorers share its statistics; Taylor adds its
whole-model backward pass first), then every run chooses, corrects and slices its own copy and writes
it into its own checkpoint under OUT/runs/. The runs are then evaluated one after the other (each
checkpoint deleted once evaluated, unless `keep_checkpoints`). Results are rewritten after every
evaluation, so finished runs survive a later failure:

    OUT/compare.json   settings, dense and per-run metrics (errors included)
    OUT/compare.md     the Markdown table
    OUT/perplexity.png, OUT/accuracy.png   metric against ratio, one line per scorer
    OUT/amp_scores.png per-layer heatmap of AMP head and neuron scores
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, batches, calibration_set, read_calibration
from .checkpoint import CheckpointWriter, output_config, saved_model_type
from .engine import CORRECTIONS, LayerEngine, Run, Settings
from .errors import AmpruneError
from .models.loading import load_model, load_tokenizer, parse_dtype, resolve_device
from .pipeline import describe_model, open_weights
from .plan import check_ratios
from .scoring import SCORERS, Needs
from .stats import check_scorers, collect_gradients
from .versions import package_versions

logger = logging.getLogger(__name__)

# An evaluation: (model, tokenizer) → {"perplexity": float, "accuracy": {task: fraction}}.
Evaluate = Callable[[torch.nn.Module, object], dict]

DEFAULT_SCORERS = ["amp", "wanda_sp", "flap", "magnitude", "random"]
DEFAULT_RATIOS = [0.1, 0.2, 0.3, 0.5]


@dataclass
class CompareRequest:
    """Everything `amprune compare` is asked to do."""

    out: str
    model: str | None = None
    scorers: list[str] = field(default_factory=lambda: list(DEFAULT_SCORERS))
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    gqa_mode: str = "query"
    correction: str = "none"  # every run's correction, as for `prune` (bias compensation excepted)
    calib: str = "c4"
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    batch_size: int = 8  # calibration samples per forward pass
    tasks: str | list[str] | None = "amp5"  # None, "none" or []: perplexity only
    limit: int | None = None  # first `limit` documents of every task
    eval_batch_size: int = 8
    ppl: str | list[str] = "wiki"  # one text
    ppl_seq_len: int = 512
    ppl_windows: int | None = None
    keep_checkpoints: bool = False  # keep every run's checkpoint under OUT/runs/
    dtype: str | None = None
    device: str | None = None
    progress: bool = True

    def check(self) -> None:
        """The checks that need no model (and the lists normalised: tasks comma-joined, one perplexity text)."""
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else list(self.tasks or [])
        self.tasks = ",".join(t for t in tasks if t and t != "none") or None
        texts = self.ppl.split(",") if isinstance(self.ppl, str) else list(self.ppl)
        if len(texts) != 1:
            raise AmpruneError(f"compare measures perplexity on one text (--ppl), got {len(texts)}: {','.join(texts)}")
        self.ppl = texts[0]
        if not self.scorers or not self.ratios:
            raise AmpruneError("give at least one scorer (--scorers) and one ratio (--ratios)")
        check_scorers(self.scorers, self.correction == "refit-one-pass")
        if self.correction not in CORRECTIONS or self.correction == "bias":
            choices = ", ".join(c for c in CORRECTIONS if c != "bias")
            raise AmpruneError(f"compare --correction must be one of: {choices} (got '{self.correction}')")
        if self.tasks:
            from .evaluation import resolve_tasks

            resolve_tasks(self.tasks)
        for flag, value in (("--limit", self.limit), ("--batch-size", self.batch_size),
                            ("--eval-batch-size", self.eval_batch_size)):
            if value is not None and value <= 0:
                raise AmpruneError(f"{flag} must be positive, got {value}")
        for ratio in self.ratios:
            check_ratios(ratio, None, None)
        parse_dtype(self.dtype)


def default_evaluate(request: CompareRequest) -> Evaluate:
    """Perplexity and zero-shot accuracy (headline metric per task) through `amprune.evaluation`."""
    from .evaluation import perplexity, zero_shot

    def evaluate(model: torch.nn.Module, tokenizer) -> dict:
        ppl = perplexity(model, tokenizer, request.ppl, request.ppl_seq_len, request.ppl_windows, progress=False)
        metrics = {"perplexity": ppl["ppl"]}
        if request.tasks:
            tasks = zero_shot(model, tokenizer, request.tasks, request.limit, request.eval_batch_size)["tasks"]
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
    """Prune every (scorer, ratio) pair in one pass, evaluate each and write OUT/compare.{json,md} and plots."""
    # Fail before the expensive part: scorers, ratios, tasks and the output folder.
    request.check()
    calib_text = read_calibration(request.calib, request.samples, request.seq_len)
    info = describe_model(request.model)  # converts a .gguf (once)
    budgets = {ratio: info.budget(request.gqa_mode, ratio=ratio) for ratio in request.ratios}
    out = Path(request.out)
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AmpruneError(f"cannot create the output folder {out}: {err.strerror}") from None
    evaluate = evaluate or default_evaluate(request)
    device = resolve_device(request.device)
    tokenizer = load_tokenizer(info.source)
    calib = calibration_set(calib_text, tokenizer, request.samples, request.seq_len, request.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # One pass of the layer engine prunes every run; each writes its own checkpoint.
    tick = time.perf_counter()
    gradients = any(SCORERS[name].needs is Needs.GRADIENTS for name in request.scorers)
    source = open_weights(info, device, parse_dtype(request.dtype), whole=gradients)
    if gradients:
        todo = list(batches(calib.samples, request.batch_size, pad_id))
        collect_gradients(source.model, info.family, todo, device, request.progress)
    pairs = [(scorer, ratio) for ratio in request.ratios for scorer in request.scorers]
    runs = []
    for scorer, ratio in pairs:
        dims_after = budgets[ratio].dims_after(info.dims)
        config = output_config(info.config, info.family, dims_after, saved_model_type(info.family, info.config,
                                                                                        dims_after))
        writer = CheckpointWriter(out / "runs" / f"{scorer}@{ratio:g}", True, config, source.stored_dtype,
                                  info.family.layers + ".")
        runs.append(Run(scorer, budgets[ratio], request.correction, writer))
    settings = Settings(batch_size=request.batch_size, pad_id=pad_id, seed=request.seed, workspace=out / "runs",
                        save_dtype=source.stored_dtype, gradients=gradients, progress=request.progress,
                        isolate_failures=True)
    run_results, _ = LayerEngine(source, calib, calib.samples[0][:16], runs, settings).run()
    del source
    results = {
        "settings": {**asdict(request), "model_type": info.config.model_type, "device": str(device),
                     "calibration_tokens": calib.num_tokens},
        "dims": asdict(info.dims),
        "scoring_seconds": time.perf_counter() - tick,
        "versions": package_versions(),
        "dense": None,
        "runs": [],
    }
    amp = next((r for (scorer, _), r in zip(pairs, run_results, strict=True) if scorer == "amp" and r.error is None),
               None)
    if amp is not None:
        plot_amp_heatmap(torch.tensor([layer.head_scores for layer in amp.layers]),
                         torch.tensor([layer.neuron_scores for layer in amp.layers]), out / "amp_scores.png")

    logger.info("evaluating the dense model")
    tick = time.perf_counter()
    dense = load_model(info.source, device, parse_dtype(request.dtype) or runs[0].writer.dtype)
    results["dense"] = {"params": info.total_params, **_with_average(evaluate(dense, tokenizer)),
                        "seconds": time.perf_counter() - tick}
    del dense
    write_outputs(results, out)

    # Ratio by ratio, all scorers each time: if the time runs out, what finished is comparable.
    started = time.perf_counter()
    bar = tqdm(list(zip(pairs, runs, run_results, strict=True)), desc="compare", unit="run",
               disable=not request.progress)
    for index, ((scorer, ratio), run, result) in enumerate(bar):
        done = time.perf_counter() - started
        left = f"about {_duration(done / index * (len(pairs) - index))} left" if index else "time left unknown yet"
        bar.set_description(f"{scorer} @ {ratio:g}")
        logger.info("run %d/%d: %s at ratio %g (%s)", index + 1, len(pairs), scorer, ratio, left)
        row = _evaluate_run(run, result, tokenizer, info.source, device, evaluate)
        results["runs"].append({"scorer": scorer, "ratio": ratio, **row})
        if not request.keep_checkpoints:
            shutil.rmtree(run.writer.out, ignore_errors=True)
        write_outputs(results, out)
    if not request.keep_checkpoints:
        shutil.rmtree(out / "runs", ignore_errors=True)
    return results


def _evaluate_run(run: Run, result, tokenizer, source: str, device: torch.device, evaluate: Evaluate) -> dict:
    """Finish the run's checkpoint, load it with stock transformers and evaluate it; a failure (of the
    pass or of the evaluation) becomes an `error` entry."""
    row = {"achieved_fraction": run.budget.achieved_fraction, "params": run.budget.params_after}
    tick = time.perf_counter()
    model = None
    try:
        if result.error is not None:
            raise RuntimeError(result.error)
        folder = run.writer.finish(tokenizer, None, source)
        model = load_model(str(folder), device, run.writer.dtype)
        row.update(_with_average(evaluate(model, tokenizer)))
    except Exception as err:  # one failed run must not lose the others
        logger.error("run %s at ratio %g failed: %s", run.scorer, run.budget.target_fraction, err,
                     exc_info=logger.isEnabledFor(logging.DEBUG))
        row["error"] = f"{type(err).__name__}: {err}"
    finally:
        del model
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
