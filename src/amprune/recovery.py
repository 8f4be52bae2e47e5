"""Recovery: a short LoRA fine-tune of a pruned checkpoint, merged back into plain weights.

The paper's defaults (§3, following LLM-Pruner): rank 8, alpha 16, dropout 0.05, learning rate 3e-4,
AdamW, sequence length 512, 2 epochs, batch size 1, LoRA on every attention and MLP projection. The
paper trains on Alpaca, which is not available offline; amprune trains on the calibration halves of the
packaged texts (by default `mix`: as many windows of each, as `prune`'s default calibration draws them
in equal shares), never on the halves that perplexity is measured on. `max_steps` and
`max_tokens` bound the cost on a CPU. The adapters are merged with `merge_and_unload`, so the result is
again a stock checkpoint with exactly the pruned shapes; the plan file is carried over with the recovery
settings recorded.

**Distillation** (`distill`, beyond the paper): instead of the next-token loss on the text, the pruned
model learns the dense model's next-token distributions on it: the loss is the token mean of
KL(teacher ‖ student) over the whole vocabulary. Every position then carries a full distribution instead
of one observed token, which is what a short recovery on little text lacks; the teacher (by default the
model the plan was pruned from) costs one extra forward pass per step and its weights in memory.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import MIX
from .checkpoint import check_output_dir, save_and_verify
from .errors import AmpruneError
from .models import Family, get_family
from .models.loading import load_config, load_model, load_tokenizer, resolve_device_dtype, resolve_model
from .plan import PLAN_FILE, Plan
from .resources import peak_memory_bytes, reset_peak_memory
from .textsets import PACKAGED_TEXTS, packaged_text, token_windows

logger = logging.getLogger(__name__)


@dataclass
class RecoverRequest:
    """Everything `amprune recover` is asked to do (the paper's LoRA settings by default)."""

    model: str  # a folder written by `amprune prune` (or any supported checkpoint, with a warning)
    out: str | None  # None: recover in memory only
    calib: str = MIX  # packaged text(s), comma-separated, or "mix"; their calibration halves are used
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 3e-4
    seq_len: int = 512
    epochs: int = 2
    batch_size: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    distill: bool = False  # learn the teacher's next-token distributions instead of the text's tokens
    teacher: str | None = None  # with distill; None: the model the plan was pruned from
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    overwrite: bool = False
    verify: bool = True
    progress: bool = True

    def check(self) -> None:
        """The checks that need no model: positive sizes, a dropout in [0, 1), --teacher only to distil."""
        positive = {"--rank": self.rank, "--alpha": self.alpha, "--lr": self.lr, "--seq-len": self.seq_len,
                    "--epochs": self.epochs, "--batch-size": self.batch_size, "--max-steps": self.max_steps,
                    "--max-tokens": self.max_tokens}
        for flag, value in positive.items():
            if value is not None and not value > 0:
                raise AmpruneError(f"{flag} must be positive, got {value}")
        if not 0 <= self.dropout < 1:
            raise AmpruneError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.teacher is not None and not self.distill:
            raise AmpruneError("--teacher is the model to distil from: pass --distill too")
        if self.out is not None:
            check_output_dir(self.out, self.overwrite)


@dataclass
class RecoverResult:
    model: torch.nn.Module
    tokenizer: object
    plan: Plan | None
    out: Path | None
    losses: list[float] = field(default_factory=list)  # training loss of every step
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0


def target_modules(family: Family) -> list[str]:
    """The family's projection names: LoRA goes on every attention and MLP projection."""
    names = (family.q, family.k, family.v, family.qkv, family.o, family.gate, family.up, family.gate_up, family.down)
    return [name for name in names if name]


def training_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """(windows, seq_len) non-overlapping token windows of the calibration halves of packaged texts.

    `text` names one packaged text or several, comma-separated ("c4,wiki"): the windows of each, in turn;
    "mix": as many windows from every packaged text as the shortest has, spread evenly over each text.
    """
    if text == MIX:
        each = [training_windows(tokenizer, name, seq_len) for name in PACKAGED_TEXTS]
        count = min(len(windows) for windows in each)
        return torch.cat([windows[torch.linspace(0, len(windows) - 1, count).round().long()] for windows in each])
    names = text.split(",")
    unknown = [name for name in names if name not in PACKAGED_TEXTS]
    if unknown:
        raise AmpruneError(f"unknown recovery text '{unknown[0]}'; choose from: {MIX}, {', '.join(PACKAGED_TEXTS)} "
                           "(or several, comma-separated)")
    return token_windows(tokenizer, [packaged_text(name, part="calibration") for name in names], seq_len)[0]


def count_steps(windows: int, request: RecoverRequest) -> int:
    """Optimizer steps: `epochs` passes over the windows, bounded by `max_steps` and `max_tokens`."""
    steps = request.epochs * (windows // request.batch_size)
    if request.max_steps is not None:
        steps = min(steps, request.max_steps)
    if request.max_tokens is not None:
        steps = min(steps, request.max_tokens // (request.batch_size * request.seq_len))
    return steps


def teacher_source(request: RecoverRequest, plan: Plan | None, vocab_size: int) -> tuple[str, str]:
    """The teacher for `--distill` (`--teacher`, or the model the plan was pruned from) and its resolved source."""
    name = request.teacher or (plan.settings.get("model") if plan is not None else None)
    if name is None:
        raise AmpruneError(f"{request.model} has no amprune plan naming the dense model: pass --teacher MODEL")
    source = resolve_model(name)
    teacher_vocab = load_config(source).vocab_size
    if teacher_vocab != vocab_size:
        raise AmpruneError(f"teacher {name} has a vocabulary of {teacher_vocab} tokens, the model {vocab_size}: "
                           "distillation needs the same tokenizer")
    return name, source


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Token mean of KL(teacher ‖ student) between next-token distributions, in float32."""
    student = student_logits.float().log_softmax(-1).flatten(0, -2)
    teacher = teacher_logits.float().log_softmax(-1).flatten(0, -2)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def add_lora(model, family: Family, request: RecoverRequest):
    """Wrap `model` with fresh LoRA adapters on the family's projections (peft)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=request.rank, lora_alpha=request.alpha, lora_dropout=request.dropout,
        target_modules=target_modules(family), bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train(model, windows: torch.Tensor, steps: int, request: RecoverRequest, teacher=None) -> list[float]:
    """AdamW on the trainable (LoRA) parameters, learning rate decaying linearly to 0; one loss per step.

    The loss is the next-token loss on the windows, or with a `teacher` the distillation loss.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=request.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(request.seed)
    per_epoch = len(windows) // request.batch_size
    losses: list[float] = []
    model.train()
    bar = tqdm(total=steps, desc="Recovering", unit="step", disable=not request.progress)
    while len(losses) < steps:  # one epoch: a fresh shuffle of the windows
        order = torch.randperm(len(windows), generator=generator)
        for batch in range(min(per_epoch, steps - len(losses))):
            ids = windows[order[batch * request.batch_size : (batch + 1) * request.batch_size]].to(device)
            if teacher is None:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                with torch.no_grad():
                    target = teacher(input_ids=ids).logits
                loss = distillation_loss(model(input_ids=ids).logits, target)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if len(losses) % 10 == 0 or len(losses) == steps:
                logger.info("step %d/%d: loss %.4f", len(losses), steps, losses[-1])
    bar.close()
    model.eval()
    return losses


def recover(request: RecoverRequest) -> RecoverResult:
    """LoRA-fine-tune a (pruned) checkpoint, merge the adapters and save a plain checkpoint."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    reset_peak_memory()

    # 1. Validate before loading weights: settings, model family, plan, output folder, enough text.
    request.check()
    source = resolve_model(request.model)  # converts a .gguf (once)
    family = get_family(load_config(source).model_type)
    plan = None
    if (Path(source) / PLAN_FILE).is_file():
        plan = Plan.load(source)
    else:
        logger.warning("%s has no %s (not written by `amprune prune`): recovering it anyway; the output "
                       "will carry no plan", request.model, PLAN_FILE)
    teacher = teacher_source(request, plan, load_config(source).vocab_size) if request.distill else None
    device, dtype = resolve_device_dtype(request.device, request.dtype)
    tokenizer = load_tokenizer(source)
    windows = training_windows(tokenizer, request.calib, request.seq_len)
    steps = count_steps(len(windows), request)
    if steps == 0:
        raise AmpruneError(
            f"recovery text '{request.calib}' gives {len(windows)} windows of --seq-len {request.seq_len} tokens, "
            f"too few for one step of --batch-size {request.batch_size}"
            + (" within --max-tokens" if request.max_tokens is not None else "")
        )

    # 2. LoRA fine-tuning on the packaged text.
    tick = time.perf_counter()
    torch.manual_seed(request.seed)  # LoRA's A matrices are initialised randomly
    model = add_lora(load_model(source, device, dtype), family, request)
    teacher_model = None if teacher is None else load_model(teacher[1], device, dtype).requires_grad_(False)
    losses = train(model, windows, steps, request, teacher_model)
    del teacher_model
    seconds["recover"] = time.perf_counter() - tick
    if not math.isfinite(losses[-1]):
        raise AmpruneError(f"the training loss became {losses[-1]}: lower --lr or use --dtype float32")

    # 3. Merge the adapters into the weights: a plain model again, the same shapes as before.
    probe = windows[0][:16].unsqueeze(0).to(device)
    with torch.inference_mode():
        before_merge = model(probe).logits
    model = model.merge_and_unload()
    with torch.inference_mode():
        merge_diff = (model(probe).logits - before_merge).abs().max().item()
    logger.info("merged the LoRA adapters: max logit diff to the unmerged model %.2g", merge_diff)
    settings = {
        "loss": "distillation (token mean of KL(teacher ‖ student))" if teacher else "next-token cross-entropy",
        "text": request.calib, "text_part": "calibration", "steps": steps, "tokens": steps * request.batch_size *
        request.seq_len, "losses": [round(loss, 4) for loss in losses], "target_modules": target_modules(family),
        **{k: v for k, v in asdict(request).items() if k not in ("model", "out", "overwrite", "verify", "progress")},
        "teacher": teacher and teacher[0],
        "dtype": str(dtype).removeprefix("torch."),
    }
    if plan is not None:
        plan = replace(plan, settings={**plan.settings, "recovery": settings})

    # 4. Save atomically (plan carried over) and check that stock transformers reloads the same model.
    out = save_and_verify(
        model, tokenizer, plan, family, request.out, request.overwrite, probe if request.verify else None, seconds,
        source,
    )
    seconds["total"] = time.perf_counter() - started
    return RecoverResult(model, tokenizer, plan, out, losses, seconds, peak_memory_bytes())
