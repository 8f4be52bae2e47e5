"""The end-to-end story of `amprune prune`, one call per step.

load config → validate the request → calibrate (one hooked pass) → score → plan → surgery → verify
→ save a standard Hugging Face checkpoint. Every check that can fail runs before the model is loaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .calibration import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    AmpStats,
    calibration_set,
    check_scorers,
    read_calibration,
    score_units,
)
from .checkpoint import check_output_dir, save_and_verify, saved_model_type
from .compensation import add_zero_biases, biased_config, compensate
from .errors import AmpruneError
from .models import Dims, Family, get_family
from .models.loading import (
    default_model,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device_dtype,
    resolve_model,
)
from .plan import Budget, Plan, UnitParams, check_ratios, make_budget, select_units
from .reconstruct import LayerChooser, reconstruct
from .resources import peak_memory_bytes, reset_peak_memory
from .scoring import SCORERS
from .surgery import apply_plan, unit_params
from .versions import package_versions

logger = logging.getLogger(__name__)


@dataclass
class PruneRequest:
    """Everything `amprune prune` is asked to do; the CLI builds one, so can Python callers."""

    out: str | None  # None: prune in memory only
    model: str | None = None  # None: the packaged SmolLM2-135M-Instruct
    ratio: float | None = None
    head_ratio: float | None = None
    mlp_ratio: float | None = None
    gqa_mode: str = "query"
    round_to: int = 1  # keep a multiple of this many neurons per layer (1: AMP's exact rule)
    calib: str = "c4"
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0  # draws calibration samples (and the `random` scorer's scores)
    batch_size: int = 8
    dtype: str | None = None
    device: str | None = None
    overwrite: bool = False
    verify: bool = True
    progress: bool = True
    scorer: str = "amp"  # a name in amprune.scoring.SCORERS
    bias_compensation: bool = False  # FLAP's mean compensation in o_proj/down_proj biases (compensation.py)
    reconstruct: bool = False  # re-fit o_proj/down_proj by least squares during surgery (reconstruct.py)
    one_pass: bool = False  # with reconstruct: score every layer in the reconstruction pass (reconstruct.LayerChooser)


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: object
    plan: Plan
    out: Path | None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0


def _count_params(config) -> tuple[int, object]:
    """Total parameters of a model built from `config`, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters()), skeleton


@dataclass
class ModelInfo:
    """A model's family, sizes and parameter count, known from its config before any weight loads."""

    source: str
    config: object
    family: Family
    dims: Dims
    total_params: int
    units: UnitParams

    def budget(
        self,
        gqa_mode: str,
        ratio: float | None = None,
        head_ratio: float | None = None,
        mlp_ratio: float | None = None,
        round_to: int = 1,
    ) -> Budget:
        """The validated per-layer removal counts for a request (see `amprune.plan.make_budget`)."""
        budget = make_budget(
            self.dims, self.units, self.total_params, gqa_mode, ratio, head_ratio, mlp_ratio,
            accepted_heads=self.family.accepted_head_counts(self.config), round_to=round_to,
        )
        self.family.check_head_pruning(self.config, budget.heads_removed)
        for note in budget.notes:
            logger.warning(note)
        return budget


def describe_model(model: str | None, bias_compensation: bool = False) -> ModelInfo:
    """Resolve `model` (None: the packaged default) and read its config: fails on unsupported families.

    With `bias_compensation` the config is the one with the standard bias flags on (it fails where no
    flag gives o_proj/down_proj a bias); sizes and parameter counts then include those biases.
    """
    source = resolve_model(model)
    config = load_config(source)
    family = get_family(config.model_type)
    if bias_compensation:
        config = biased_config(config, family)
    dims = Dims.from_config(family.sizes_config(config))
    total_params, skeleton = _count_params(config)
    units = unit_params(family, family.decoder_layers(skeleton)[0], dims)
    return ModelInfo(source, config, family, dims, total_params, units)


def prune(request: PruneRequest) -> PruneResult:
    """Prune a model as `request` says (AMP unless another scorer is named); returns the model and its plan."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    reset_peak_memory()

    # 1. Validate everything cheap first: what needs no model (ratios, scorer, output folder, calibration
    #    source), then what needs its config (family, plan sizes, GQA mode) and its tokenizer (text length).
    if request.bias_compensation and request.reconstruct:
        raise AmpruneError("--bias-compensation and --reconstruct both correct o_proj/down_proj for what was removed; "
                           "use one")
    if request.one_pass and not request.reconstruct:
        raise AmpruneError("--one-pass scores the layers during reconstruction: pass --reconstruct too")
    check_ratios(request.ratio, request.head_ratio, request.mlp_ratio)
    check_scorers([request.scorer], request.one_pass)
    if request.out is not None:
        check_output_dir(request.out, request.overwrite)
    device, dtype = resolve_device_dtype(request.device, request.dtype)
    calib_text = read_calibration(request.calib, request.samples, request.seq_len)
    target = describe_model(request.model, request.bias_compensation)  # converts a .gguf (once)
    source, config, family, dims = target.source, target.config, target.family, target.dims
    budget = target.budget(
        request.gqa_mode, request.ratio, request.head_ratio, request.mlp_ratio, request.round_to
    )
    tokenizer = load_tokenizer(source)
    calib = calibration_set(calib_text, tokenizer, request.samples, request.seq_len, request.seed)

    # 2. Load and calibrate: one forward pass collects head and neuron statistics (one pass: during step 4).
    tick = time.perf_counter()
    model = load_model(source, device, dtype)
    if request.bias_compensation:
        add_zero_biases(model, family, config)
    seconds["load"] = time.perf_counter() - tick
    tick = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chooser = None
    if request.one_pass:  # scored in the reconstruction pass, layer by layer: no calibration pass here
        needs = SCORERS[request.scorer].needs
        stats = AmpStats(dims, device=device, moments=needs == "moments") if needs in ("amp", "moments") else None
        if stats is not None:
            stats.num_samples = len(calib.samples)
        chooser = LayerChooser(request.scorer, dims, budget, stats, torch.Generator().manual_seed(request.seed))
        layers = []
    else:
        scores, stats = score_units([request.scorer], model, family, dims, calib, request.batch_size, pad_id,
                                    request.seed, request.progress, moments=request.bias_compensation)
        layers = select_units(*scores[request.scorer], dims, budget)
        seconds["calibrate"] = time.perf_counter() - tick

    # 3. Plan: the lowest-scoring units of every layer, as many as the budget says (one pass: chosen in step 4).
    plan = Plan(
        dims=dims,
        budget=budget,
        layers=layers,
        settings={
            "method": request.scorer,
            "model": request.model or default_model(),
            "model_type": config.model_type,
            "calibration": calib.source,
            "samples": len(calib.samples),
            "seq_len": calib.seq_len,
            "calibration_tokens": calib.num_tokens,
            "seed": calib.seed,
            "ratio": request.ratio,
            "head_ratio": request.head_ratio,
            "mlp_ratio": request.mlp_ratio,
            "gqa_mode": request.gqa_mode,
            "round_to": request.round_to,
            "bias_compensation": request.bias_compensation,
            "dtype": str(dtype).removeprefix("torch."),
        },
        versions=package_versions(),
    )
    if request.out is not None:
        saved_model_type(family, config, plan.dims_after)  # fails now, not after surgery, if unsavable

    # 4. Surgery, then a forward and a short cached generation to prove the model is consistent.
    tick = time.perf_counter()
    if request.reconstruct:  # --reconstruct: surgery layer by layer, re-fitting o_proj/down_proj on the way
        plan.settings["reconstruction"] = reconstruct(model, family, plan, calib, request.batch_size, pad_id,
                                                      progress=request.progress, chooser=chooser)
    else:
        if request.bias_compensation:  # needs the dropped columns: before they are sliced away
            compensate(model, family, plan, stats.o_moments, stats.down_moments)
        apply_plan(model, family, plan)
    probe = calib.samples[0][:16].unsqueeze(0).to(device)
    with torch.inference_mode():
        model(probe)
        model.generate(probe, max_new_tokens=2, do_sample=False, pad_token_id=pad_id)
    seconds["reconstruct" if request.reconstruct else "surgery"] = time.perf_counter() - tick
    pruned_params = sum(p.numel() for p in model.parameters())
    if pruned_params != budget.params_after:
        raise RuntimeError(f"surgery left {pruned_params} parameters, the plan expected {budget.params_after}")

    # 5. Save atomically and check that stock transformers reloads the same model.
    out = save_and_verify(
        model, tokenizer, plan, family, request.out, request.overwrite, probe if request.verify else None, seconds
    )
    seconds["total"] = time.perf_counter() - started
    logger.debug("plan settings: %s", asdict(budget))
    return PruneResult(model, tokenizer, plan, out, seconds, peak_memory_bytes())
