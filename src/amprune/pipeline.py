"""The end-to-end story of `amprune prune`, one call per step.

validate the whole request (nothing expensive yet) → open the weights lazily → one sequential pass over
the decoder layers (score, choose, slice, re-fit, write; `amprune.engine`) → finish the checkpoint →
reload it with stock transformers and compare the probe's logits. Every check that can fail runs
before a weight is read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil
import torch

from . import distributed
from .calibration import DEFAULT_SEQ_LEN, batches, calibration_set, read_calibration
from .checkpoint import CheckpointWriter, check_output_dir, output_config, saved_model_type, verify_reload
from .compensation import biased_config, biased_linears
from .engine import CORRECTIONS, LayerEngine, Report, Run, Settings
from .errors import AmpruneError
from .models import Dims, Family, get_family
from .models.loading import (
    default_model,
    load_config,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_device,
    resolve_model,
)
from .plan import GQA_MODES, Budget, Plan, UnitParams, check_ratios, make_budget
from .recipes import Recipe, resolve
from .resources import peak_memory, reset_peak_memory
from .scoring import SCORERS, Needs
from .search import candidates, check_heldout, search
from .stats import check_scorers, collect_gradients
from .streams import GIB, PLACES
from .surgery import unit_params
from .versions import package_versions
from .weights import Checkpoint, InMemory, NoSafetensorsError, footprint, local_folder

logger = logging.getLogger(__name__)


@dataclass
class PruneRequest:
    """Everything `amprune prune` is asked to do; the CLI builds one, so can Python callers.

    The fields left None take their recipe's value (`amprune.recipes`): `recipe="paper"` is AMP as published.
    """

    out: str | None  # None: prune in memory only (the model comes back in the result)
    model: str | None = None  # None: the packaged SmolLM2-135M-Instruct
    ratio: float | None = None
    head_ratio: float | None = None
    mlp_ratio: float | None = None
    recipe: str = "default"
    scorer: str | None = None  # a name in amprune.scoring.SCORERS
    correction: str | None = None  # how removed units are made up for: none | bias | refit | refit-one-pass
    allocation: str | None = None  # search | uniform (with --ratio)
    calib: str | None = None
    samples: int | None = None
    round_to: int | None = None  # keep a multiple of this many neurons per layer (1: AMP's exact rule)
    heldout: int | None = None  # held-out calibration samples the allocation search ranks on
    search_samples: int | None = None  # calibration samples each search candidate is pruned on
    max_dropped: int | None = None  # the search drops at most this many whole decoder layers
    toward_dense: float | None = None  # 0–1: how far each re-fitted MLP aims at the dense model's stream
    gqa_mode: str = "query"
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0  # draws calibration samples (and the `random` scorer's scores)
    batch_size: int = 8
    dtype: str | None = None  # None: the checkpoint's own dtype
    device: str | None = None
    hidden_states: str = "auto"  # where calibration hidden states live: auto | ram | disk
    overwrite: bool = False
    verify: bool = True
    keep_model: bool = False  # also return the pruned model in memory when saving (small models)
    progress: bool = True

    def resolved(self) -> Recipe:
        """The recipe with this request's explicit values in place of its own (its search slice never larger
        than the samples asked for)."""
        recipe = resolve(self.recipe, scorer=self.scorer, correction=self.correction, allocation=self.allocation,
                         calib=self.calib, samples=self.samples, round_to=self.round_to, heldout=self.heldout,
                         search_samples=self.search_samples, max_dropped=self.max_dropped,
                         toward_dense=self.toward_dense)
        if self.search_samples is None:
            recipe = replace(recipe, search_samples=min(recipe.search_samples, recipe.samples))
        return recipe

    def check(self) -> Recipe:
        """The checks that need no model: options, ratios, scorer, output folder. Returns the resolved recipe."""
        recipe = self.resolved()
        if recipe.correction not in CORRECTIONS:
            raise AmpruneError(f"unknown --correction '{recipe.correction}'; choose one of: {', '.join(CORRECTIONS)}")
        if self.hidden_states not in PLACES:
            raise AmpruneError(f"unknown --hidden-states '{self.hidden_states}'; choose one of: {', '.join(PLACES)}")
        if self.gqa_mode not in GQA_MODES:
            raise AmpruneError(f"unknown --gqa-mode '{self.gqa_mode}'; choose one of: {', '.join(GQA_MODES)}")
        for flag, value in (("--batch-size", self.batch_size), ("--round-to", recipe.round_to),
                            ("--seq-len", self.seq_len), ("--samples", recipe.samples)):
            if value <= 0:
                raise AmpruneError(f"{flag} must be positive, got {value}")
        for flag, value in (("--heldout", recipe.heldout), ("--max-dropped", recipe.max_dropped)):
            if value < 0:
                raise AmpruneError(f"{flag} must be zero or more, got {value}")
        if recipe.allocation == "uniform":  # the search's options would be ignored: say so
            asked = f"--recipe {self.recipe}" + (f" --allocation {self.allocation}" if self.allocation else "")
            for flag, value in (("--heldout", self.heldout), ("--search-samples", self.search_samples),
                                ("--max-dropped", self.max_dropped)):
                if value is not None:
                    raise AmpruneError(f"{flag} tunes the allocation search, and this run allocates uniformly "
                                       f"({asked}): drop {flag} or use --allocation search")
        if not 0 <= recipe.toward_dense <= 1:
            raise AmpruneError(f"--toward-dense must be between 0 and 1, got {recipe.toward_dense}")
        if recipe.toward_dense and recipe.correction not in ("refit", "refit-one-pass"):
            raise AmpruneError(f"--toward-dense sets the re-fit's target, and --correction {recipe.correction} "
                               "re-fits nothing: use --correction refit-one-pass or refit")
        if recipe.allocation == "search" and not 0 < recipe.search_samples <= recipe.samples:
            raise AmpruneError(f"--search-samples must be between 1 and --samples ({recipe.samples}), "
                               f"got {recipe.search_samples}")
        parse_dtype(self.dtype)
        check_ratios(self.ratio, self.head_ratio, self.mlp_ratio)
        check_scorers([recipe.scorer], recipe.correction == "refit-one-pass")
        if self.out is not None:
            check_output_dir(self.out, self.overwrite)
        return recipe


@dataclass
class PruneResult:
    plan: Plan
    out: Path | None
    model: torch.nn.Module | None = None  # the pruned model, when kept in memory
    tokenizer: object = None
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # peak memory, model and hidden-state sizes (see `run_summary`)


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

    def budget(self, gqa_mode: str, *, ratio: float | None = None, head_ratio: float | None = None,
               mlp_ratio: float | None = None, round_to: int = 1) -> Budget:
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


def open_weights(info: ModelInfo, device: torch.device, dtype: torch.dtype | None, whole: bool):
    """The model's weights as the layer engine reads them: lazily from safetensors, or loaded whole
    (`whole`, or a checkpoint without safetensors). `dtype` None: the checkpoint's own. The config is the
    stored one (`info.config` may carry bias flags the stored weights do not have yet)."""
    if not whole:
        try:
            return Checkpoint(local_folder(info.source), load_config(info.source), device, dtype)
        except NoSafetensorsError as err:
            logger.warning("%s: loading the whole model into memory instead of layer by layer", err)
    return InMemory(load_model(info.source, device, dtype or getattr(info.config, "dtype", None) or torch.float32))


def _check_gradients_fit(info: ModelInfo, device: torch.device) -> None:
    """Taylor needs the whole model with its gradients and a backward pass: refuse before loading if that
    cannot fit (weights, gradients and activations: about three times the float32 weights)."""
    needed = 3 * 4 * info.total_params
    available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if needed > available:
        raise AmpruneError(f"--scorer taylor needs the whole model's gradients in memory (about {needed / GIB:.1f} "
                           f"GiB, {available / GIB:.1f} GiB available); use a forward-only scorer such as amp")


def prune(request: PruneRequest) -> PruneResult:
    """Prune a model as `request` says (its recipe unless overridden); returns its plan."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    reset_peak_memory()

    # 1. Validate everything cheap first: what needs no model (options, ratios, scorer, output folder,
    #    calibration source), then what needs its config (family, plan sizes, GQA mode, saved type) and
    #    its tokenizer (text length). Every rank checks it runs the same request.
    recipe = request.check()
    device = distributed.local_device(resolve_device(request.device))
    distributed.start(device)
    distributed.check_agreement({k: v for k, v in asdict(request).items() if k not in ("device", "progress")})
    searching = recipe.allocation == "search" and request.ratio is not None
    calib_text = read_calibration(recipe.calib, recipe.samples, request.seq_len)
    bias = recipe.correction == "bias"
    info = describe_model(request.model, bias)  # converts a .gguf (once)
    config, family, dims = info.config, info.family, info.dims
    if recipe.toward_dense and family.post_mlp_norm:
        raise AmpruneError(f"--toward-dense: {family.name} normalises each MLP output before adding it to the "
                           "residual stream, so a re-fit cannot move the stream towards the dense model's")
    if searching:
        candidates(info, recipe, request.gqa_mode, request.ratio)  # fails now if no allocation reaches the ratio
    else:
        budget = info.budget(request.gqa_mode, ratio=request.ratio, head_ratio=request.head_ratio,
                             mlp_ratio=request.mlp_ratio, round_to=recipe.round_to)
        saved_model_type(family, config, budget.dims_after(dims))  # fails now, not after the pass, if unsavable
    gradients = SCORERS[recipe.scorer].needs is Needs.GRADIENTS
    if gradients:
        _check_gradients_fit(info, device)
    tokenizer = load_tokenizer(info.source)
    calib = calibration_set(calib_text, tokenizer, recipe.samples, request.seq_len, request.seed,
                            heldout=recipe.heldout if searching else 0)
    if searching:
        check_heldout(calib)

    # 2. Open the weights: lazily (one layer at a time), or whole for Taylor's gradients.
    source = open_weights(info, device, parse_dtype(request.dtype), whole=gradients)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if gradients:
        tick = time.perf_counter()
        todo = list(batches(distributed.my_share(calib.samples), request.batch_size, pad_id))
        collect_gradients(source.model, family, todo, device, request.progress)
        seconds["gradients"] = time.perf_counter() - tick
    settings = Settings(batch_size=request.batch_size, pad_id=pad_id, seed=request.seed,
                        hidden_states=request.hidden_states, save_dtype=source.stored_dtype, gradients=gradients,
                        toward_dense=recipe.toward_dense, progress=request.progress)

    # 3. Where to cut: every stock-valid allocation pruned on a slice, ranked by held-out loss.
    found = None
    if searching:
        tick = time.perf_counter()
        found = search(source, info, calib, recipe, request.gqa_mode, request.ratio, settings)
        budget = found.budget
        seconds["search"] = time.perf_counter() - tick
    saved_as = saved_model_type(family, config, budget.dims_after(dims))

    # 4. One pass over the decoder layers: score, choose, slice (and re-fit), write.
    writer = None
    if request.out is not None and distributed.rank() == 0:
        writer = CheckpointWriter(request.out, request.overwrite,
                                  output_config(config, family, budget.dims_after(dims), saved_as,
                                                budget.layers_dropped), source.stored_dtype, family.layers + ".")
        if writer.num_parameters != budget.params_after:
            raise RuntimeError(f"the pruned config holds {writer.num_parameters} parameters, the plan expects "
                               f"{budget.params_after}")
    tick = time.perf_counter()
    run = Run(recipe.scorer, budget, recipe.correction, writer, biased_linears(config, family) if bias else frozenset())
    settings = replace(settings, workspace=writer.staging if writer else None,
                       keep_layers=request.out is None or request.keep_model)
    probe = calib.samples[0][:16]
    try:
        (result,), report = LayerEngine(source, calib, probe, [run], settings).run()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    seconds["prune"] = time.perf_counter() - tick
    memory = _memory(report, source)  # the engine's peak, before the reload check
    plan = Plan(dims=dims, budget=budget, layers=result.layers, versions=package_versions(), settings={
        "recipe": request.recipe,
        "method": recipe.scorer,
        "correction": recipe.correction,
        "allocation": found.to_dict(dims) if found else "uniform",
        "model": request.model or default_model(),
        "model_type": config.model_type,
        "saved_as": saved_as if saved_as != config.model_type else None,
        "calibration": calib.source,
        "samples": len(calib.samples),
        "heldout_samples": len(calib.heldout),
        "seq_len": calib.seq_len,
        "calibration_tokens": calib.num_tokens,
        "seed": calib.seed,
        "ratio": request.ratio,
        "head_ratio": request.head_ratio,
        "mlp_ratio": request.mlp_ratio,
        "gqa_mode": request.gqa_mode,
        "round_to": recipe.round_to,
        "dtype": str(source.stored_dtype).removeprefix("torch."),
        "compute_dtype": report.compute_dtype,
        "world_size": report.world_size,
        "memory": memory,
        "reconstruction": {"damping": settings.damping, "toward_dense": settings.toward_dense,
                           "relative_calibration_error": result.errors}
        if recipe.correction.startswith("refit") else None,
    })

    # 5. Finish the checkpoint atomically, then check that stock transformers reloads the same model.
    out = None
    if writer is not None:
        tick = time.perf_counter()
        out = writer.finish(tokenizer, plan, info.source)
        if request.verify:  # a model too large for memory: offloaded, within what the pass itself held
            shell_bytes, layer_bytes = footprint(source.model, family, source.dtype)
            diff = verify_reload(out, probe[None], result.probe_logits, source.dtype, device,
                                 budget=shell_bytes + 2 * layer_bytes)
            logger.info("reloaded %s with stock from_pretrained: max logit diff %.2g", out, diff)
        seconds["save"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    model = source.model if settings.keep_layers else None
    return PruneResult(plan, out, model, tokenizer, seconds, memory)


def _memory(report: Report, source) -> dict:
    return {"peak": peak_memory(), "model_bytes": source.stored_bytes, "hidden_bytes": report.hidden_bytes,
            "hidden_place": report.hidden_place}
