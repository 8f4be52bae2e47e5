"""Writing the pruned model as a plain Hugging Face checkpoint, layer by layer, atomically.

`CheckpointWriter` lays the output out before the first layer is pruned: the pruned config's model,
built on the meta device, gives every tensor's name, shape and dtype; `huggingface_hub` splits them
into shards as `save_pretrained` does (`model.safetensors`, or `model-0000k-of-0000N.safetensors` plus
`model.safetensors.index.json` past the shard size). Each shard's header is written first and each
tensor's bytes as soon as its layer is pruned, so no shard is ever held in memory. Everything goes to a
temporary folder next to `--out`, which becomes `--out` by one rename once the config, tokenizer and
plan are in: an interrupted run leaves `--out` as it was.

The folder loads with stock `AutoModelForCausalLM.from_pretrained` and nothing of ours. When the
family's own config would refuse the pruned head count (transformers ≥ 5.24 `LlamaConfig` wants
`hidden_size % num_attention_heads == 0`), the config is written as the family's exactly equivalent
stock architecture instead (LLaMA → Mistral, same weights and names).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from .errors import AmpruneError
from .models.base import Dims, Family
from .plan import Plan
from .surgery import update_config
from .weights import SAFETENSORS_DTYPES

logger = logging.getLogger(__name__)

SHARD_SIZE = "50GB"  # transformers' save_pretrained default
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


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


def output_config(config, family: Family, dims_after: Dims, model_type: str, layers_dropped: tuple[int, ...] = ()):
    """The pruned model's config: the sizes after surgery (explicit head_dim), without the dropped layers,
    as `model_type`."""
    config = copy.deepcopy(config)
    update_config(family.sizes_config(config), dims_after, layers_dropped)
    if model_type == config.model_type:
        return config
    from transformers import AutoConfig

    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "attention_bias", "mlp_bias", "pretraining_tp"):
        fields.pop(key, None)
    converted = AutoConfig.for_model(model_type, **fields)
    if hasattr(converted, "sliding_window"):
        converted.sliding_window = None  # full attention, like the source family
    return converted


class _SafetensorsFile:
    """One safetensors file written front to back: the header first (every tensor's dtype, shape and byte
    range, known in advance), then each tensor's bytes in header order as they arrive."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        for name, dtype, shape in entries:
            size = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        self.path, self.entries, self.written = path, entries, 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed in finish/abort)
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self.entries[self.written]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                               f"expected {expected} {tuple(shape)} {dtype}")
        self.file.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().data)
        self.written += 1

    @property
    def complete(self) -> bool:
        return self.written == len(self.entries)


class CheckpointWriter:
    """The output folder of one pruned model, filled as its layers are pruned (see the module docstring).

    Args:
        out: the final folder. `config`: the pruned model's config (`output_config`). `dtype`: what the
            weights are saved as. `layer_prefix`: the decoder layers' parameter prefix ("model.layers.").
        workspace: where the temporary folder goes (default: next to `out`).
    """

    def __init__(self, out: str | Path, overwrite: bool, config, dtype: torch.dtype, layer_prefix: str):
        from accelerate import init_empty_weights
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers import AutoModelForCausalLM

        self.out, self.config, self.dtype, self.prefix = Path(out), config, dtype, layer_prefix
        check_output_dir(self.out, overwrite)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
        skeleton.tie_weights()
        # named_parameters() lists a tied weight once (the LM head shares the embedding): it is stored once
        params = {name: p for name, p in skeleton.named_parameters()}
        self.num_parameters = sum(p.numel() for p in params.values())
        meta = {name: torch.empty(p.shape, dtype=dtype, device="meta") for name, p in params.items()}
        # Shell tensors first, then the layers in order: the order they become available in.
        order = sorted(meta, key=lambda name: (name.startswith(self.prefix), _layer_of(name, self.prefix)))
        split = split_torch_state_dict_into_shards({n: meta[n] for n in order}, max_shard_size=SHARD_SIZE)
        self.split = split
        self.bytes = split.metadata["total_size"]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.files = {
            filename: _SafetensorsFile(self.staging / filename, [(n, dtype, tuple(meta[n].shape)) for n in names])
            for filename, names in split.filename_to_tensors.items()
        }
        self._pending = {name for names in split.filename_to_tensors.values() for name in names}

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        self.files[self.split.tensor_to_filename[name]].write(name, tensor.to(self.dtype))
        self._pending.discard(name)

    def write_shell(self, model: nn.Module) -> None:
        """Every tensor outside the decoder layers (embedding, final norm, LM head, …)."""
        tensors = dict(model.named_parameters())
        for name in self.split.tensor_to_filename:
            if not name.startswith(self.prefix):
                self._write(name, tensors[name])

    def write_layer(self, index: int, layer: nn.Module) -> None:
        """Decoder layer `index` of the output (its tensors' shapes must be the pruned config's)."""
        for name, tensor in layer.state_dict().items():
            full = f"{self.prefix}{index}.{name}"
            if full in self.split.tensor_to_filename:
                self._write(full, tensor)

    def finish(self, tokenizer, plan: Plan | None, source: str | None = None) -> Path:
        """Close the shards, add the index, config, generation config, tokenizer and plan; rename into place."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tensors were never written, e.g. {sorted(self._pending)[0]}")
        for file in self.files.values():
            file.file.close()
        if self.split.is_sharded:
            index = {"metadata": {"total_parameters": self.num_parameters, **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.staging / "model.safetensors.index.json").write_text(text)
        _save_config(self.config, self.staging)
        _copy_generation_config(source, self.staging)
        tokenizer.save_pretrained(self.staging)
        if plan is not None:
            plan.save(self.staging)
        if self.out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, trash / self.out.name)
            os.replace(self.staging, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.staging, self.out)
        return self.out

    def abort(self) -> None:
        """Delete the temporary folder; `out` stays as it was."""
        for file in self.files.values():
            file.file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _layer_of(name: str, prefix: str) -> int:
    return int(name.removeprefix(prefix).split(".")[0]) if name.startswith(prefix) else -1


def _save_config(config, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the class stock loading will build: recorded in `architectures`
        config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    config.save_pretrained(folder)


def _copy_generation_config(source: str | None, folder: Path) -> None:
    if source is None or not (Path(source) / "generation_config.json").is_file():
        return
    shutil.copy(Path(source) / "generation_config.json", folder / "generation_config.json")


def save_model(model: nn.Module, tokenizer, plan: Plan | None, family: Family, out: str | Path, overwrite: bool,
               source: str | None = None) -> Path:
    """Save a model held whole in memory (after recovery, say) through the same writer."""
    dims_after = plan.dims_after if plan is not None else None
    model_type = model.config.model_type if plan is None else saved_model_type(family, model.config, dims_after)
    config = copy.deepcopy(model.config) if model_type == model.config.model_type else output_config(
        model.config, family, dims_after, model_type)  # the model's own config already has its sizes
    writer = CheckpointWriter(out, overwrite, config, next(model.parameters()).dtype, family.layers + ".")
    try:
        writer.write_shell(model)
        for index, layer in enumerate(family.decoder_layers(model)):
            writer.write_layer(index, layer)
        return writer.finish(tokenizer, plan, source)
    except BaseException:
        writer.abort()
        raise


def save_and_verify(model: nn.Module, tokenizer, plan: Plan | None, family: Family, out: str | Path | None,
                    overwrite: bool, probe: torch.Tensor | None, seconds: dict[str, float],
                    source: str | None = None) -> Path | None:
    """Unless `out` is None: `save_model`, then (unless `probe` is None) `verify_reload` against the
    model's own logits on `probe`; the time both take goes to seconds["save"]."""
    if out is None:
        return None
    tick = time.perf_counter()
    saved = save_model(model, tokenizer, plan, family, out, overwrite, source)
    if probe is not None:
        with torch.inference_mode():
            expected = model(probe).logits
        dtype = next(model.parameters()).dtype
        diff = verify_reload(saved, probe, expected, dtype, probe.device)
        logger.info("reloaded %s with stock from_pretrained: max logit diff %.2g", saved, diff)
    seconds["save"] = time.perf_counter() - tick
    return saved


def fits_in_memory(nbytes: int) -> bool:
    """Whether a model of `nbytes` can be loaded whole with room to spare (half the RAM still available)."""
    return nbytes < psutil.virtual_memory().available / 2


@torch.inference_mode()
def verify_reload(out: str | Path, probe: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                  device: torch.device, atol: float = 1e-4, budget: int | None = None) -> float:
    """Reload `out` with stock transformers and return the max |logit difference| to `expected` on `probe`.

    A model too large for the memory left is loaded with accelerate's device map: `budget` bytes (default:
    half the RAM available) in memory, the rest offloaded to disk and read as the forward reaches it.
    Raises if the reloaded model disagrees by more than `atol` (5e-2 in half precision).
    """
    from transformers import AutoModelForCausalLM

    nbytes = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    offload = None
    if fits_in_memory(nbytes):
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).to(device)
    else:
        offload = Path(tempfile.mkdtemp(prefix=".offload-", dir=Path(out).parent))
        budget = {"cpu": budget or int(psutil.virtual_memory().available / 2)}
        if device.type == "cuda":
            budget[device.index or 0] = int(torch.cuda.mem_get_info(device)[0] * 0.8)
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype, device_map="auto", max_memory=budget,
                                                        offload_folder=str(offload))
    try:
        logits = reloaded.eval()(probe.to(device)).logits
    finally:
        if offload is not None:
            shutil.rmtree(offload, ignore_errors=True)
    diff = (logits.float().cpu() - expected.float().cpu()).abs().max().item()
    tolerance = atol if dtype == torch.float32 else 5e-2
    if not diff <= tolerance:
        raise AmpruneError(f"the saved checkpoint does not reproduce the pruned model (max logit diff {diff:.3g})")
    return diff
