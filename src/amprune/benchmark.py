"""`amprune bench`: the speed and memory a model really gains over a baseline, measured side by side.

Workloads (the paper's latency protocol, from Shortened LLaMA / FlexGen):

- *generate*: a 12-token prompt, 128 new tokens with EOS suppressed (min_new_tokens = max_new_tokens),
  greedy, batch 1, KV cache on. Its median time is the latency (new tokens / latency: the generation
  throughput). A clock in the logits processors marks the end of the prompt's forward (the first new
  token's logits), so every run also yields its *decode* time: the remaining new tokens, one cached
  forward each; decode throughput = (new tokens − 1) / decode time.
- *prefill b*: one forward of b prompts of a fixed length (128 tokens) at every batch size, keeping only
  the last token's logits as `generate` does; throughput = b·length / time.

Rounds: in each round every model runs once, in turn, so a noisy machine slows them alike; odd rounds
run the models in reverse order, so no model always runs first. The speedup is the median over rounds of
baseline time / model time (quartiles as spread). The first `warmup` rounds are not timed; the first
round of every workload runs before any other (the *pilot*), so the progress bar knows what each call
costs from then on. A protocol (`PROTOCOLS`) sets how many rounds:

- *paper*: batch sizes 1, 8, 32; 10 warm-up and 20 timed rounds per workload, always.
- *quick* (the default): batch sizes 1, 8; 1 warm-up round, then 5 to 15 timed rounds per workload,
  stopping once every model's speedup median is known to ±5 %: half the width of the boxplot notch,
  1.57·IQR/√n (McGill, Tukey & Larsen 1978, about a 95 % interval of the median), at most 5 % of the
  median. The quartiles of the ratios themselves do not narrow with more rounds (5–10 % on a shared
  CPU), their median's interval does. On the paper run's rounds (docs/bench) this rule stops after 5–11
  rounds at a median within 1.2 % (at most 4.7 %) of the 20-round one.

`torch.inference_mode`; the device is synchronised before and after every timed call. Peak memory:
each model runs every workload once in a fresh process of its own (CUDA: allocator peak; CPU: the
process's peak resident memory, interpreter and libraries included). The ideal speedup is the ratio of
the workload's FLOPs (formula in `amprune.flops`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from .errors import AmpruneError
from .flops import ModelCost, model_cost
from .models import get_family
from .models.loading import load_config, load_model, load_tokenizer, resolve_device_dtype, resolve_model
from .report import has_matplotlib, plot, require_matplotlib
from .textsets import packaged_text
from .versions import package_versions

logger = logging.getLogger(__name__)

BENCH_FORMAT = "amprune-bench/2"  # /2: protocol name, min_runs, tolerance, rounds per workload; renamed lengths
_NOT_PROTOCOL = ("models", "out", "png", "progress")  # request fields that do not change the numbers

# What a protocol sets; a request's explicit values replace these (`BenchRequest.resolved`).
PROTOCOLS: dict[str, dict] = {
    "quick": dict(batch_sizes=[1, 8], warmup=1, runs=15, min_runs=5, tolerance=0.05),
    "paper": dict(batch_sizes=[1, 8, 32], warmup=10, runs=20, min_runs=20, tolerance=0.0),
}
NOTCH = 1.57  # median ± 1.57·IQR/√n: the boxplot notch, about a 95 % interval of the median


@dataclass
class BenchRequest:
    """Everything `amprune bench` is asked to do; the CLI builds one from its flags (same names), so can
    Python callers. None: the protocol's value (`PROTOCOLS`); `resolved()` fills them in."""

    models: list[str]  # the models to measure (folders, .gguf files or hub ids)
    out: str | None = None  # JSON results file; None: return the results only
    png: str | None = None  # bar chart
    baseline: str | None = None  # None: the packaged SmolLM2-135M-Instruct
    protocol: str = "quick"  # "quick": a few minutes, stops early; "paper": 10 warm-up + 20 timed rounds
    gen_prompt: int = 12  # the generation's prompt tokens
    new_tokens: int = 128  # the generation's new tokens; 0: no generation workload
    prefill_len: int = 128  # the prefill's prompt tokens
    batch_sizes: list[int] | None = None  # prefill batch sizes
    warmup: int | None = None  # untimed rounds per workload
    runs: int | None = None  # timed rounds per workload: the most (quick stops earlier)
    min_runs: int | None = None  # the fewest timed rounds before stopping early (default: the protocol's, ≤ runs)
    tolerance: float | None = None  # stop once every speedup's median interval is within ± this; 0: never early
    memory: bool = True  # measure peak memory (one fresh process per model)
    threads: int | None = None  # torch CPU threads; None: torch's default
    dtype: str | None = None
    device: str | None = None
    progress: bool = True

    def resolved(self) -> BenchRequest:
        """This request with every None the protocol sets replaced by the protocol's value."""
        self._check_protocol()
        preset = PROTOCOLS[self.protocol]
        values = {k: v for k, v in preset.items() if k != "min_runs" and getattr(self, k) is None}
        runs = self.runs if self.runs is not None else preset["runs"]
        if self.min_runs is None:  # an explicit --runs below the protocol's minimum lowers it
            values["min_runs"] = min(preset["min_runs"], runs)
        return replace(self, **{k: list(v) if isinstance(v, list) else v for k, v in values.items()})

    def _check_protocol(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise AmpruneError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")

    def check(self) -> None:
        """Every value and path, before anything is loaded: one-line errors naming the flag."""
        self._check_protocol()
        if not self.models:
            raise AmpruneError("give at least one model (--model)")
        if self.batch_sizes is not None and not self.batch_sizes:
            raise AmpruneError("give at least one prefill batch size (--batch-sizes)")
        positive = [("--gen-prompt", self.gen_prompt), ("--prefill-len", self.prefill_len), ("--runs", self.runs),
                    ("--min-runs", self.min_runs), ("--threads", self.threads)]
        positive += [("--batch-sizes", b) for b in self.batch_sizes or []]
        for flag, value in positive:
            if value is not None and value <= 0:
                raise AmpruneError(f"{flag} must be positive, got {value}")
        for flag, value in (("--warmup", self.warmup), ("--new-tokens", self.new_tokens)):
            if value is not None and value < 0:
                raise AmpruneError(f"{flag} must be zero or more, got {value}")
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise AmpruneError(f"--tolerance must be at least 0 and below 1, got {self.tolerance}")
        done = self.resolved()
        if done.min_runs > done.runs:
            raise AmpruneError(f"--min-runs ({done.min_runs}) must not exceed --runs ({done.runs})")
        for path in (self.out, self.png):
            if path is not None and not Path(path).resolve().parent.is_dir():
                raise AmpruneError(f"the folder for {path} does not exist")

    def protocol_record(self) -> dict:
        """The resolved values that shape the numbers, for the result's JSON."""
        done = self.resolved()
        return {f.name: getattr(done, f.name) for f in fields(done) if f.name not in _NOT_PROTOCOL}


@dataclass(frozen=True)
class Workload:
    """One timed setting: a generation or a prefill of `batch` prompts of `prompt_len` tokens."""

    name: str
    batch: int
    prompt_len: int
    new_tokens: int  # 0 for a prefill

    @property
    def tokens(self) -> int:
        """Tokens a run produces (generation) or processes (prefill): the throughput numerator."""
        return self.new_tokens * self.batch if self.new_tokens else self.prompt_len * self.batch

    def flops(self, cost: ModelCost) -> int:
        if self.new_tokens:
            return self.batch * cost.generation_flops(self.prompt_len, self.new_tokens)
        return self.batch * cost.prefill_flops(self.prompt_len)

    def run(self, model, ids: torch.Tensor, pad_id: int) -> float | None:
        """Run once; a generation returns its decode seconds (after the prompt's forward), a prefill None."""
        prompt = ids[: self.batch, : self.prompt_len]
        if not self.new_tokens:
            model(prompt, logits_to_keep=1)
            return None
        clock = _DecodeClock(prompt.device)
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens, do_sample=False, pad_token_id=pad_id, use_cache=True,
            logits_processor=LogitsProcessorList([clock]),
        )
        if out.shape[1] != self.prompt_len + self.new_tokens:  # an early stop would flatter the timing
            made = out.shape[1] - self.prompt_len
            raise RuntimeError(f"generate returned {made} new tokens, not {self.new_tokens}")
        return clock.since_first_step()


class _DecodeClock(LogitsProcessor):
    """Leaves the scores alone; notes when the first new token's logits exist (the prompt's forward done)."""

    def __init__(self, device: torch.device):
        self.device, self.first = device, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            _sync(self.device)
            self.first = time.perf_counter()
        return scores

    def since_first_step(self) -> float:
        _sync(self.device)
        return time.perf_counter() - self.first


def workloads(request: BenchRequest) -> list[Workload]:
    request = request.resolved()
    gen = Workload(f"generate b1 {request.gen_prompt}+{request.new_tokens}", 1, request.gen_prompt, request.new_tokens)
    length = request.prefill_len
    prefills = [Workload(f"prefill b{b} ×{length}", b, length, 0) for b in request.batch_sizes]
    return ([gen] if request.new_tokens else []) + prefills


def _prompt_ids(tokenizer, rows: int, length: int) -> torch.Tensor:
    """`rows` × `length` consecutive tokens of the packaged C4 evaluation text."""
    text = packaged_text("c4", "evaluation")
    ids = tokenizer(text[: 16 * rows * length], add_special_tokens=False)["input_ids"]
    if len(ids) < rows * length:
        raise AmpruneError(f"the packaged text is too short for {rows} prompts of {length} tokens")
    return torch.tensor(ids[: rows * length]).view(rows, length)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, float | None]:
    """Seconds `fn` takes, and what it returns (a generation's decode seconds)."""
    _sync(device)
    start = time.perf_counter()
    inner = fn()
    _sync(device)
    return time.perf_counter() - start, inner


def _spread(values: list[float]) -> dict[str, float]:
    p25, median, p75 = np.percentile(values, [25, 50, 75]).tolist()
    return {"median": median, "p25": p25, "p75": p75, "min": min(values), "max": max(values), "runs": values}


def _paired_speedup(base: list[float], model: list[float]) -> dict[str, float]:
    """The spread of round-by-round ratios: round i of the baseline against round i of the model."""
    return _spread([b / m for b, m in zip(base, model, strict=True)])


class _Rounds:
    """One workload's rounds: fns[0], fns[1], … in turn (reversed in odd rounds); the first `warmup` rounds
    are not timed. `times[i]`: the seconds of fn i's timed calls; `inner[i]`: what each returned (a
    generation's decode seconds, or None).

    The garbage collector never runs inside a timed call (as in `timeit`): a collection over a loaded
    model's objects takes milliseconds and would land on one model at random. It runs before *every*
    call instead, so that each call starts alike; collecting once per round made the round's first
    model up to 1.7× slower on short calls (its caches cold after the collection).
    """

    def __init__(self, fns: list, warmup: int):
        self.fns, self.warmup, self.done = fns, warmup, 0  # done: rounds run, warm-up included
        self.times: list[list[float]] = [[] for _ in fns]
        self.inner: list[list] = [[] for _ in fns]

    def run(self, device: torch.device, tick=lambda index, seconds: None) -> None:
        """One round; `tick(index, seconds)` after every call, timed or not, with the seconds it took
        together with the collection before it (on tiny models the collection takes longer than the call)."""
        order = range(len(self.fns)) if self.done % 2 == 0 else reversed(range(len(self.fns)))
        gc.disable()
        try:
            for index in order:
                start = time.perf_counter()
                gc.collect()
                seconds, returned = _timed(self.fns[index], device)
                if self.done >= self.warmup:
                    self.times[index].append(seconds)
                    self.inner[index].append(returned)
                tick(index, time.perf_counter() - start)
        finally:
            gc.enable()
        self.done += 1


def median_interval(ratios: list[float]) -> float:
    """Half the width of the median's ~95 % interval (boxplot notch, 1.57·IQR/√n), relative to the median."""
    p25, median, p75 = np.percentile(ratios, [25, 50, 75]).tolist()
    return NOTCH * (p75 - p25) / (math.sqrt(len(ratios)) * median)


def _worst_interval(times: list[list[float]]) -> float:
    """The widest median interval among the models' speedups (times[0]: the baseline's)."""
    return max(median_interval([b / m for b, m in zip(times[0], t, strict=True)]) for t in times[1:])


def _stop_reason(times: list[list[float]], request: BenchRequest) -> str | None:
    """Why a workload's rounds end now: "tolerance" (every speedup's median known to ± tolerance after at
    least min_runs timed rounds), "runs" (the most timed rounds done), or None: run another round."""
    timed = len(times[0])
    if timed >= request.min_runs and request.tolerance > 0 and _worst_interval(times) <= request.tolerance:
        return "tolerance"
    return "runs" if timed >= request.runs else None


class _Progress:
    """A tqdm bar counting seconds of work: n = seconds measured; total = n + an estimate of the rest.

    The estimate, from the pilot round on: every workload's rounds still to come (up to the most; none
    once it stopped) × the median seconds of its calls so far per model, plus the memory pass (per model:
    one call of every workload, its load time, and a process start-up that the first process measures).
    """

    def __init__(self, names: list[str], models: int, request: BenchRequest, loads: list[float | None]):
        self.names, self.request = names, request
        self.calls: list[list[list[float]]] = [[[] for _ in range(models)] for _ in names]
        self.rounds_left = [request.warmup + request.runs] * len(names)
        self.loads = loads  # per model: its load seconds if the memory pass will run it, else None
        self.startup = 5.0  # seconds to start a fresh process (interpreter, torch), until one is measured
        self.bar = tqdm(total=None, desc="bench", disable=not request.progress,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def call(self, work: int, index: int, seconds: float) -> None:
        self.calls[work][index].append(seconds)
        self._advance(seconds)

    def round_starts(self, work: int, rounds: _Rounds) -> None:
        if rounds.done < self.request.warmup:
            what = "warm-up"
        else:
            most = "" if self.request.min_runs == self.request.runs else "≤"
            what = f"timed round {len(rounds.times[0]) + 1}/{most}{self.request.runs}"
        self.bar.set_postfix_str(f"{self.names[work]}, {what}")

    def round_done(self, work: int, rounds: _Rounds) -> None:
        self.rounds_left[work] = self.request.warmup + self.request.runs - rounds.done
        self._estimate()

    def stopped(self, work: int) -> None:
        self.rounds_left[work] = 0
        self._estimate()

    def memory_done(self, index: int, seconds: float) -> None:
        calls = sum(statistics.median(work[index]) for work in self.calls)
        self.startup = max(0.0, seconds - calls - self.loads[index])  # for the next process's estimate
        self.loads[index] = None
        self._advance(seconds)
        self._estimate()

    def _advance(self, seconds: float) -> None:
        if self.bar.total is not None:  # a call longer than its estimate must not run past the end
            self.bar.total = max(self.bar.total, self.bar.n + seconds)
        self.bar.update(seconds)

    def _memory_estimate(self, index: int) -> float:
        return sum(statistics.median(work[index]) for work in self.calls) + self.loads[index] + self.startup

    def estimate(self) -> float | None:
        """Seconds of work left; None before every workload and model has run once."""
        if not all(seconds for work in self.calls for seconds in work):
            return None
        left = sum(rounds * sum(statistics.median(s) for s in work)
                   for rounds, work in zip(self.rounds_left, self.calls, strict=True))
        return left + sum(self._memory_estimate(i) for i, load in enumerate(self.loads) if load is not None)

    def _estimate(self) -> None:
        left = self.estimate()
        if left is not None:
            self.bar.total = self.bar.n + left
            self.bar.refresh()


def _measure(works: list[Workload], models: list, prompts: torch.Tensor, pad_id: int, request: BenchRequest,
             device: torch.device, progress: _Progress) -> list[tuple[_Rounds, str]]:
    """Every workload's rounds and why they ended. The pilot first: one round of every workload."""
    rounds = [_Rounds([partial(work.run, model, prompts, pad_id) for model in models], request.warmup)
              for work in works]
    def one_round(index: int, workload: _Rounds) -> None:
        progress.round_starts(index, workload)
        workload.run(device, partial(progress.call, index))
        progress.round_done(index, workload)

    for index, workload in enumerate(rounds):  # the pilot
        one_round(index, workload)
    ended = []
    for index, workload in enumerate(rounds):
        while (reason := _stop_reason(workload.times, request)) is None:
            one_round(index, workload)
        progress.stopped(index)
        ended.append((workload, reason))
    return ended


def _reset_rss_peak() -> bool:
    """Reset this process's peak resident memory (Linux ≥ 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


def _peak_memory(source: str, request: BenchRequest, ids: torch.Tensor, pad_id: int) -> int | None:
    """Peak memory of running every workload once; meant to run in a fresh process of its own."""
    from transformers.utils import logging as hf_logging

    if not request.progress:
        hf_logging.disable_progress_bar()
    if request.threads:
        torch.set_num_threads(request.threads)
    device, dtype = resolve_device_dtype(request.device, request.dtype)
    model, ids = load_model(source, device, dtype), ids.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif not _reset_rss_peak():
        return None
    with torch.inference_mode():
        for work in workloads(request):
            work.run(model, ids, pad_id)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_peak()


def _peak_memories(sources: list[str], request: BenchRequest, ids: torch.Tensor, pad_id: int,
                   progress: _Progress) -> list:
    # One fresh process per model: a process's memory high-water mark cannot tell two models apart.
    peaks = {}
    for source in dict.fromkeys(sources):
        progress.bar.set_postfix_str(f"peak memory of {source}")
        start = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            peaks[source] = pool.submit(_peak_memory, source, request, ids, pad_id).result()
        progress.memory_done(sources.index(source), time.perf_counter() - start)
    return [peaks[source] for source in sources]


@contextmanager
def _torch_threads(threads: int | None):
    """Use `threads` CPU threads inside the block, then restore the previous count."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def bench(request: BenchRequest) -> dict:
    """Measure `request.models` against the baseline, side by side; write JSON/PNG if asked."""
    request.check()
    request = request.resolved()
    if request.png:
        require_matplotlib()
    elif request.out and has_matplotlib():  # the chart goes next to the JSON unless asked elsewhere
        request = replace(request, png=str(Path(request.out).with_suffix(".png")))
    elif request.out:
        logger.warning("no bar chart: matplotlib is not installed (pip install 'amprune[plot]')")
    models = [resolve_model(m) for m in request.models]  # first: the default baseline may need converting
    sources = [resolve_model(request.baseline), *models]
    families = [get_family(load_config(source).model_type) for source in sources]  # fail before loading
    device, dtype = resolve_device_dtype(request.device, request.dtype)
    tokenizer = load_tokenizer(sources[0])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    ids = _prompt_ids(tokenizer, max(request.batch_sizes), max(request.prefill_len, request.gen_prompt))
    prompts = ids.to(device)

    with _torch_threads(request.threads):
        models, loads = [], []
        for source in sources:
            start = time.perf_counter()
            models.append(load_model(source, device, dtype))
            loads.append(time.perf_counter() - start)
        for source, model in zip(sources, models, strict=True):
            if model.get_input_embeddings().num_embeddings <= int(ids.max()):
                raise AmpruneError(f"{source} does not share the baseline's vocabulary")
        costs = [model_cost(model, family) for model, family in zip(models, families, strict=True)]
        works = workloads(request)
        first = [request.memory and sources.index(s) == i for i, s in enumerate(sources)]  # the memory pass's
        progress = _Progress([w.name for w in works], len(models), request,
                             [load if run else None for load, run in zip(loads, first, strict=True)])
        with progress:
            with torch.inference_mode():
                ended = _measure(works, models, prompts, pad_id, request, device, progress)
            results = [
                _workload_result(work, rounds.times, costs, rounds.inner if work.new_tokens else None)
                | {"rounds": {"warmup": request.warmup, "timed": len(rounds.times[0]), "stop": reason,
                              "median_interval": _worst_interval(rounds.times)}}
                for work, (rounds, reason) in zip(works, ended, strict=True)
            ]
            environment = _environment(device, dtype)
            peaks = _peak_memories(sources, request, ids, pad_id, progress) if request.memory else [None] * len(sources)

    names = [request.baseline or "packaged SmolLM2-135M-Instruct", *request.models]
    result = {
        "format": BENCH_FORMAT,
        "protocol": request.protocol_record(),
        "environment": environment,
        "models": [
            {"role": "model" if i else "baseline", "source": names[i], "loaded_from": sources[i],
             "cost": asdict(costs[i]), "peak_memory_bytes": peaks[i]}
            for i in range(len(sources))
        ],
        "workloads": results,
    }
    if request.png:
        result["png"] = request.png
    if request.out:
        Path(request.out).write_text(json.dumps(result, indent=2) + "\n")
    if request.png:
        plot(result, request.png)
    return result


def _workload_result(
    work: Workload, times: list[list[float]], costs: list[ModelCost], decode: list[list[float]] | None = None
) -> dict:
    """Per model: time, throughput and FLOPs; for the models, paired speedups and the ideal one.

    `decode` (generations): every run's decode seconds per model, which add decode throughput and speedup.
    """
    base_times, base_flops = times[0], work.flops(costs[0])
    per_model = []
    for index, (seconds, cost) in enumerate(zip(times, costs, strict=True)):
        stats = _spread(seconds)
        entry = {"seconds": stats, "tokens_per_s": work.tokens / stats["median"], "flops": work.flops(cost)}
        if work.new_tokens:
            entry["weight_bytes_per_s"] = cost.weight_bytes * work.new_tokens / stats["median"]
        if decode is not None:
            steps = _spread(decode[index])
            entry["decode"] = {"seconds": steps, "tokens_per_s": work.batch * (work.new_tokens - 1) / steps["median"]}
            if index:
                entry["decode"]["speedup"] = _paired_speedup(decode[0], decode[index])
        if index:
            speedup = _paired_speedup(base_times, seconds)
            ideal = base_flops / entry["flops"]
            entry.update(
                speedup=speedup,
                speedup_of_fastest=min(base_times) / min(seconds),  # the least disturbed run of each
                ideal_speedup=ideal,
                fraction_of_ideal=speedup["median"] / ideal,
            )
        per_model.append(entry)
    return {**asdict(work), "tokens": work.tokens, "results": per_model}


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _environment(device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({_cpu_name()})",
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }
