"""Saving a pruned model as a plain Hugging Face checkpoint plus `amprune_plan.json`, atomically.

The folder loads with stock `AutoModelForCausalLM.from_pretrained` and nothing of ours. When the
family's own config would refuse the pruned head count (transformers ≥ 5.24 `LlamaConfig` wants
`hidden_size % num_attention_heads == 0`), the checkpoint is written as the family's exactly
equivalent stock architecture instead (LLaMA → Mistral, same weights and names).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .errors import AmpruneError
from .models.base import Dims, Family
from .plan import Plan

logger = logging.getLogger(__name__)


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless `overwrite`; refuse a file. Cheap: run it first."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise AmpruneError(f"--out {out} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise AmpruneError(f"--out {out} is not empty; pass --overwrite to replace it")
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise AmpruneError(f"cannot write --out {out}: {parent} is not a writable folder")


def saved_model_type(family: Family, config, dims_after: Dims) -> str:
    """The `model_type` the checkpoint is written as; raises if no stock config can hold the sizes."""
    if not family.heads_must_divide_hidden or dims_after.hidden_size % dims_after.num_heads == 0:
        return config.model_type
    accepted = family.accepted_head_counts(config)
    if accepted is None:
        return family.equivalent_model_type
    raise AmpruneError(
        f"a stock '{config.model_type}' config refuses {dims_after.num_heads} attention heads with hidden size "
        f"{dims_after.hidden_size}; keep one of {sorted(accepted)} heads"
    )


def _as_model_type(model, model_type: str):
    """The same weights in the stock architecture `model_type` (used when the own config would refuse)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == model.config.model_type:
        return model
    fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "attention_bias", "mlp_bias", "pretraining_tp"):
        fields.pop(key, None)
    config = AutoConfig.for_model(model_type, **fields)
    if hasattr(config, "sliding_window"):
        config.sliding_window = None  # full attention, like the source family
    with torch.device("meta"):
        converted = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    converted.load_state_dict(model.state_dict(), assign=True, strict=True)
    converted.tie_weights()
    # Non-persistent buffers (the rotary inv_freq) are not in the state dict: same config, same values.
    source_buffers = dict(model.named_buffers())
    for name, buffer in list(converted.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            converted.get_submodule(owner).register_buffer(attr, source_buffers[name].clone(), persistent=False)
    return converted.eval()


def save_checkpoint(
    model, tokenizer, plan: Plan | None, family: Family, out: str | Path, overwrite: bool = False
) -> Path:
    """Write model, tokenizer and plan into `out` through a temporary folder and one rename.

    An interrupted run leaves `out` as it was: the new checkpoint appears whole or not at all.
    `plan=None` (a model that came without an amprune plan) saves the model as it is, with no plan file.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    model_type = model.config.model_type if plan is None else saved_model_type(family, model.config, plan.dims_after)
    to_save = _as_model_type(model, model_type)
    if model_type != model.config.model_type:
        logger.info("saving as '%s' (identical forward): the stock '%s' config refuses %d heads", model_type,
                    model.config.model_type, plan.dims_after.num_heads)
        plan.settings["saved_as"] = model_type
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        to_save.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if plan is not None:
            plan.save(staging)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def save_and_verify(
    model,
    tokenizer,
    plan: Plan | None,
    family: Family,
    out: str | Path | None,
    overwrite: bool,
    probe: torch.Tensor | None,
    seconds: dict[str, float],
) -> Path | None:
    """Unless `out` is None: `save_checkpoint`, then (unless `probe` is None) `verify_reload` on `probe`,
    logging the difference; the time both take goes to seconds["save"]."""
    if out is None:
        return None
    tick = time.perf_counter()
    saved = save_checkpoint(model, tokenizer, plan, family, out, overwrite)
    if probe is not None:
        diff = verify_reload(model, saved, probe)
        logger.info("reloaded %s with stock from_pretrained: max logit diff %.2g", saved, diff)
    seconds["save"] = time.perf_counter() - tick
    return saved


@torch.inference_mode()
def verify_reload(model, out: str | Path, probe: torch.Tensor, atol: float = 1e-4) -> float:
    """Reload `out` with stock transformers and return the max |logit difference| on `probe`.

    Raises if the reloaded model disagrees with the in-memory one by more than `atol` (scaled for
    half-precision dtypes).
    """
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=model.dtype).to(model.device).eval()
    probe = probe.to(model.device)
    diff = (reloaded(probe).logits.float() - model(probe).logits.float()).abs().max().item()
    tolerance = atol if model.dtype == torch.float32 else 5e-2
    if not diff <= tolerance:
        raise AmpruneError(f"the saved checkpoint does not reproduce the pruned model (max logit diff {diff:.3g})")
    return diff
