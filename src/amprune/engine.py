"""The layer engine: every prune variant is one sequential pass over the decoder layers.

For each decoder layer *i*: load its weights → run it on the hidden states of every calibration sample
(hooks collect what the scorers and the re-fit need; ranks all-reduce it) → choose the units → slice
(and re-fit) → hidden states out for layer *i+1* → write layer *i*'s pruned tensors → free it. Memory
is one layer (two while it is sliced) plus the hidden states, whatever the size of the model.

One pass can produce several pruned models (`compare`'s scorers × ratios). A `Run` says how one of
them ranks its units (scorer), how many it removes (budget) and how it makes up for them (correction):

- `none`: AMP as published: units chosen on the dense model's stream, then sliced.
- `bias`: the same, plus FLAP's bias compensation from the dense stream's input means.
- `refit`: units chosen on the dense stream, o_proj/down_proj re-fitted on the run's own pruned stream
  (two streams, one pass).
- `refit-one-pass`: units chosen and re-fitted on the pruned stream alone: no dense stream at all.

The dense stream exists only if some run chooses on it; a re-fitting run carries its own stream. The
probe (the first tokens of the first sample) runs through every run's pruned layers, and its final
logits are what the saved checkpoint must reproduce. Each layer is rounded to the dtype it is saved in
before anything runs through it, so the engine computes exactly the model it writes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .calibration import CalibrationSet, batches
from .checkpoint import CheckpointWriter
from .compensation import add_zero_biases, compensate_layer
from .models import Dims
from .plan import Budget, LayerPlan, select_units
from .reconstruct import DEFAULT_DAMPING, LayerChooser, fixed_units, refit_layer
from .scoring import SCORERS, Needs
from .stats import LayerStats, layer_scores, recording
from .streams import HiddenStates, choose_place, stream_bytes
from .surgery import drop_layers, prune_layer, update_config
from .weights import footprint

logger = logging.getLogger(__name__)

CORRECTIONS = ("none", "bias", "refit", "refit-one-pass")


@dataclass
class Run:
    """One pruned model the pass produces (see the module docstring)."""

    scorer: str
    budget: Budget
    correction: str = "none"
    writer: CheckpointWriter | None = None  # None: nothing written (in memory, or a candidate)
    add_biases: frozenset[str] = frozenset()  # `bias`: the layer's linears the stock flags give a bias
    given: list[LayerPlan] | None = None  # every layer's units, chosen already (a saved plan): no scoring

    @property
    def own_stream(self) -> bool:
        return self.correction in ("refit", "refit-one-pass")


@dataclass
class RunResult:
    """What a pass found for one run: every layer's plan, re-fit errors and the probe's final logits."""

    layers: list[LayerPlan] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # per layer, re-fitting corrections only
    probe_logits: torch.Tensor | None = None  # (B, t, V) the pruned model's logits for the probe
    probe_nll: float | None = None  # instead (`Settings.probe_loss`): its mean next-token NLL on the probe
    error: str | None = None  # why the run stopped (`Settings.isolate_failures`)


@dataclass
class Settings:
    """How the pass runs (not what it prunes)."""

    batch_size: int = 8
    pad_id: int = 0
    seed: int = 0  # the `random` scorer's generator
    damping: float = DEFAULT_DAMPING
    toward_dense: float = 0.0  # re-fits aim this far at the dense model's stream (`reconstruct.toward_dense`)
    hidden_states: str = "auto"  # auto | ram | disk (see amprune.streams)
    workspace: Path | None = None  # where spilled hidden states go (the output's temporary folder)
    save_dtype: torch.dtype | None = None  # round every pruned layer to this dtype (None: the compute dtype)
    keep_layers: bool = False  # leave the pruned layers in the source's model (one run only)
    gradients: bool = False  # the source model's `.grad` holds Taylor gradients
    isolate_failures: bool = False  # a failing run stops alone (its error recorded) instead of the pass
    probe_loss: bool = False  # report each run's NLL on the probe (held-out samples) instead of its logits
    observe: Callable | None = None  # called as observe(layer, input, output, mask) per dense-stream batch
    progress: bool = True


@dataclass
class Report:
    """Where the hidden states lived and how big they were, for the summary and the plan."""

    hidden_bytes: int
    hidden_place: str
    compute_dtype: str
    world_size: int


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call arguments and passes the hidden states on."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((hidden, args[1:], kwargs))
        return hidden


class _Constant(nn.Module):
    """Stands in for a decoder layer: returns the given hidden states whatever it is called with."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return self.hidden


@contextmanager
def _stand_ins(model: nn.Module, layers: nn.ModuleList, make) -> None:
    originals = list(layers)
    try:
        for index in range(len(originals)):
            layers[index] = make(index)
        yield
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer


def capture(shell: nn.Module, layers: nn.ModuleList, todo: list) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Run the model with recorders in place of its decoder layers (only the embedding computes).

    Returns the first layer's hidden states per batch and every layer's call arguments per batch,
    calls[layer][batch] = (args, kwargs) (masks differ per layer type in some families).
    """
    calls: list[list] = [[] for _ in layers]
    device = shell.get_input_embeddings().weight.device
    with _stand_ins(shell, layers, lambda index: _Recorder(calls[index])), torch.inference_mode():
        for ids, mask in todo:
            shell.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    first = [hidden for hidden, _, _ in calls[0]]
    return first, [[(args, kwargs) for _, args, kwargs in layer_calls] for layer_calls in calls]


@torch.inference_mode()
def final_logits(shell: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for `ids` given the last decoder layer's output `hidden` (the model's own final
    norm, LM head and soft-capping)."""
    device = shell.get_input_embeddings().weight.device
    with _stand_ins(shell, layers, lambda index: _Constant(hidden)):
        return shell(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def probe_nll(shell: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, hidden: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of the probe rows (one at a time: logits are vocabulary-wide),
    summed over the ranks' probes."""
    total = torch.zeros(2, dtype=torch.float64)
    for row in range(len(ids)):
        logits = final_logits(shell, layers, ids[row : row + 1], hidden[row : row + 1])[0, :-1]
        total[0] += torch.nn.functional.cross_entropy(logits, ids[row, 1:].cpu(), reduction="sum").double()
        total[1] += len(logits)
    distributed.sum_(total)
    return (total[0] / total[1]).item()


def _forward(layer: nn.Module, index: int, stream: HiddenStates, calls: list, masks: list, out: HiddenStates,
             stats: LayerStats | None, observe: Callable | None, device: torch.device) -> None:
    """Run `layer` on every batch of `stream` into `out`; `stats` (if any) hears each batch's mask,
    `observe` (if any) sees each batch's input and output."""
    for batch, (args, kwargs) in enumerate(calls):
        if stats is not None:
            stats.mask = masks[batch]
        x = stream[batch].to(device, non_blocking=True)
        output = layer(x, *args, **kwargs)
        output = output[0] if isinstance(output, tuple) else output
        if observe is not None:
            observe(index, x, output, masks[batch])
        out[batch] = output


class _Stream:
    """A stream's two buffers: the current layer's input and its output, swapped after every layer."""

    def __init__(self, first: list[torch.Tensor], dtype: torch.dtype, files: tuple[Path, Path] | None, pin: bool):
        shapes = [tuple(x.shape) for x in first]
        self.input = HiddenStates(shapes, dtype, files and files[0], pin)
        self.output = HiddenStates(shapes, dtype, files and files[1], pin)
        for batch, x in enumerate(first):
            self.input[batch] = x

    def swap(self) -> None:
        self.input, self.output = self.output, self.input

    def close(self) -> None:
        self.input.close()
        self.output.close()


@dataclass
class _RunState:
    run: Run
    result: RunResult
    stream: _Stream | None
    probe: torch.Tensor  # (B, t, D): the probe's hidden states after this run's pruned layers
    chooser: LayerChooser | None


class LayerEngine:
    """One sequential pass over a model's decoder layers producing every run (see the module docstring).

    Args:
        source: `weights.Checkpoint` (lazy) or `weights.InMemory`.
        calib: the calibration samples (all of them: each rank takes its share).
        probe: (t,) or (B, t) token ids the pruned model's final logits (or, `Settings.probe_loss`, its mean
            NLL: each rank then carries its share of the rows) are computed on.
    """

    def __init__(self, source, calib: CalibrationSet, probe: torch.Tensor, runs: list[Run], settings: Settings):
        if settings.keep_layers and len(runs) != 1:
            raise ValueError("keep_layers prunes the source model in place: one run only")
        self.source, self.runs, self.settings = source, runs, settings
        self.family = source.family
        self.dims = Dims.from_config(self.family.sizes_config(source.config))
        probe = probe if probe.dim() == 2 else probe[None]
        self.calib, self.probe_ids = calib, distributed.my_share(probe) if settings.probe_loss else probe
        for run in runs:
            kept = self.dims.num_layers - len(run.budget.layers_dropped)
            if run.given is not None and (run.correction == "refit-one-pass" or len(run.given) != kept):
                raise ValueError("a given plan needs a LayerPlan per kept layer and cannot be chosen on the pruned "
                                 "stream")
        scored = [run for run in runs if run.correction != "refit-one-pass" and run.given is None]
        self.dense_scorers = sorted({run.scorer for run in scored})
        self.dense_needed = settings.observe is not None or any(
            run.correction != "refit-one-pass" and (run.given is None or run.correction == "bias") for run in runs
        ) or (settings.toward_dense > 0 and any(run.own_stream for run in runs))

    def _stats(self, device: torch.device) -> LayerStats | None:
        """The dense stream's statistics: what its scorers (and bias compensation) read."""
        needs = {SCORERS[name].needs for name in self.dense_scorers}
        moments = Needs.MOMENTS in needs or any(run.correction == "bias" for run in self.runs)
        amp = Needs.AMP in needs
        return LayerStats(self.dims, device, amp=amp, moments=moments) if amp or moments else None

    def run(self) -> tuple[list[RunResult], Report]:
        settings, family, dims = self.settings, self.family, self.dims
        shell = self.source.shell()
        layers = family.decoder_layers(shell)
        device = shell.get_input_embeddings().weight.device
        todo = list(batches(distributed.my_share(self.calib.samples), settings.batch_size, settings.pad_id))
        masks = [mask for _, mask in todo]
        first, calls = capture(shell, layers, todo)
        probe_first, probe_calls = capture(shell, layers, [(self.probe_ids, torch.ones_like(self.probe_ids))])
        dtype = first[0].dtype
        count = 2 * (self.dense_needed + sum(run.own_stream for run in self.runs))
        size = stream_bytes([tuple(x.shape) for x in first], dtype)
        workspace = settings.workspace or Path.cwd()
        output = sum(run.writer.bytes for run in self.runs if run.writer is not None)
        layer_bytes = footprint(shell, family, self.source.dtype)[1]
        place = choose_place(settings.hidden_states, count * size, reserve=2 * layer_bytes, folder=workspace,
                             disk_needed=output)
        spill = iter(range(count))

        def new_stream() -> _Stream:
            files = None
            if place == "disk":
                files = tuple(workspace / f".hidden-{next(spill)}-rank{distributed.rank()}.bin" for _ in range(2))
            return _Stream(first, dtype, files, pin=device.type == "cuda" and place == "ram")

        dense = new_stream() if self.dense_needed else None
        states = [_RunState(run, RunResult(), new_stream() if run.own_stream else None, probe_first[0],
                            self._chooser(run)) for run in self.runs]
        first.clear()  # the streams hold their own copies
        generator = torch.Generator().manual_seed(settings.seed)
        for state in states:
            if state.run.writer is not None:
                state.run.writer.write_shell(shell)
        bar = tqdm(range(dims.num_layers), desc="Pruning", unit="layer",
                   disable=not settings.progress or distributed.rank() != 0)
        try:
            for index in bar:
                layer = self.source.load_layer(index)
                stats, scores = None, {}
                if dense is not None:  # the dense model's stream: what the paper's scores read
                    stats = self._stats(device)
                    hooks = recording(family, layer, stats) if stats is not None else nullcontext()
                    with hooks, torch.inference_mode():
                        _forward(layer, index, dense.input, calls[index], masks, dense.output, stats,
                                 settings.observe, device)
                    if stats is not None:
                        stats.all_reduce()
                    scores = layer_scores(self.dense_scorers, family, layer, index, dims, stats, generator,
                                          settings.gradients)
                for state in [state for state in states if state.result.error is None]:
                    if index in state.run.budget.layers_dropped:
                        continue  # the run's streams pass this layer by unchanged; nothing is written
                    in_place = len(states) == 1 and (settings.keep_layers or self.source.reloads)
                    work = layer if in_place else copy.deepcopy(layer)
                    try:
                        self._prune(state, work, index, calls[index], masks, scores, stats, dense)
                        self._finish_layer(state, work, index, probe_calls[index])
                    except Exception as err:
                        if not settings.isolate_failures:
                            raise
                        self._fail(state, index, err)
                    if work is not layer and not settings.keep_layers:
                        work.to("meta")
                if dense is not None:
                    dense.swap()
                if not settings.keep_layers:
                    self.source.release_layer(index)
        finally:
            for stream in [dense] + [state.stream for state in states]:
                if stream is not None:
                    stream.close()
        for state in [state for state in states if state.result.error is None]:
            if settings.probe_loss:
                state.result.probe_nll = probe_nll(shell, layers, self.probe_ids, state.probe)
            else:
                state.result.probe_logits = final_logits(shell, layers, self.probe_ids, state.probe)
        if settings.keep_layers:
            budget = self.runs[0].budget
            drop_layers(shell, family, budget.layers_dropped)
            update_config(family.sizes_config(shell.config), budget.dims_after(dims), budget.layers_dropped)
        report = Report(count * size, place, str(dtype).removeprefix("torch."), distributed.world_size())
        return [state.result for state in states], report

    @staticmethod
    def _fail(state: _RunState, index: int, err: Exception) -> None:
        logger.error("run %s stopped at decoder layer %d: %s", state.run.scorer, index, err)
        state.result.error = f"{type(err).__name__}: {err}"
        if state.run.writer is not None:
            state.run.writer.abort()
        if state.stream is not None:
            state.stream.close()

    def _chooser(self, run: Run) -> LayerChooser | None:
        if run.correction != "refit-one-pass":
            return None
        generator = torch.Generator().manual_seed(self.settings.seed)
        return LayerChooser(run.scorer, self.dims, run.budget, generator, self.settings.damping)

    def _prune(self, state: _RunState, layer: nn.Module, index: int, calls: list, masks: list, scores: dict,
               stats: LayerStats | None, dense: _Stream | None) -> None:
        """Choose this run's units of `layer`, correct and slice it (in place)."""
        run, family, dims = state.run, self.family, self.dims
        stream = self._batches(state.stream, calls, masks) if run.own_stream else None
        toward = None
        if self.settings.toward_dense > 0 and run.own_stream:  # the dense model's outputs of this layer (above)
            toward = (self.settings.toward_dense, [dense.output[b] for b in range(len(calls))])
        if run.correction == "refit-one-pass":
            chooser = state.chooser
            choose = chooser.for_layer(family, layer, index)
            keep, hidden, errors = refit_layer(family, layer, index, dims, stream, choose, self.settings.damping,
                                               chooser.new_stats(layer_device(layer)), toward)
        else:
            if run.given is not None:
                keep = run.given[len(state.result.layers)]
            else:
                heads, neurons = scores[run.scorer]
                keep = select_units(heads[None], neurons[None], dims, run.budget)[0]
            if run.correction == "bias":
                add_zero_biases(layer, run.add_biases)
                compensate_layer(layer, family, dims, keep, stats)
            if run.correction == "refit":
                keep, hidden, errors = refit_layer(family, layer, index, dims, stream, fixed_units(keep, dims.head_dim),
                                                   self.settings.damping, toward=toward)
            else:
                prune_layer(family, layer, dims, keep)
        if run.own_stream:
            for batch, x in enumerate(hidden):
                state.stream.output[batch] = x
            state.stream.swap()
            state.result.errors.append({"layer": index, **errors})
        state.result.layers.append(keep)

    @staticmethod
    def _batches(stream: _Stream, calls: list, masks: list) -> list[tuple]:
        return [(stream.input[b], args, kwargs, masks[b]) for b, (args, kwargs) in enumerate(calls)]

    @torch.inference_mode()
    def _finish_layer(self, state: _RunState, layer: nn.Module, index: int, probe_call: tuple) -> None:
        """Round the pruned layer to its saved dtype, run the probe through it and write it."""
        save_dtype = self.settings.save_dtype
        compute_dtype = next(layer.parameters()).dtype
        if save_dtype is not None and save_dtype != compute_dtype:
            layer.to(save_dtype).to(compute_dtype)
        args, kwargs = probe_call[0]
        output = layer(state.probe, *args, **kwargs)
        state.probe = output[0] if isinstance(output, tuple) else output
        if state.run.writer is not None:
            state.run.writer.write_layer(len(state.result.layers) - 1, layer)  # its index among the kept layers


def layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device

