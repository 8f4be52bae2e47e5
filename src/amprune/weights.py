"""Opening a checkpoint lazily: its shell in memory, one decoder layer at a time on demand.

A checkpoint is a folder with `model.safetensors` or a sharded `model.safetensors.index.json`. Opening
it reads only the config and the safetensors headers (every shard is checked to be present and whole).
`shell()` builds the model with every parameter on the meta device (no memory), then loads what is not
a decoder layer: the embedding, the final norm, the LM head (and a multimodal model's vision tower).
`load_layer(i)` reads decoder layer *i*'s tensors from its shard, and `release_layer(i)` returns them
to the meta device. Checkpoint tensor names are mapped onto the model's with transformers' own
renaming rules, so legacy layouts load as `from_pretrained` loads them.

`InMemory` serves a model already loaded whole (the path for checkpoints without safetensors, and the
reference the layer engine is tested against): the same calls, no reading.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import AmpruneError
from .models import Family, get_family
from .resources import return_freed_memory

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class NoSafetensorsError(AmpruneError):
    """The folder holds no safetensors weights (only pickled .bin files, say): it can only be loaded whole."""


# safetensors dtype names → torch dtypes (those a float checkpoint holds)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _shard_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name → the safetensors file that holds it; every file must exist and open."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise AmpruneError(f"{index} is not a safetensors index (no weight_map)") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
    elif (folder / SINGLE_FILE).is_file():
        with _opened(folder / SINGLE_FILE) as handle:
            return {name: folder / SINGLE_FILE for name in _tensor_names(handle)}
    else:
        raise NoSafetensorsError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}")
    missing = sorted({path.name for path in files.values() if not path.is_file()})
    if missing:
        raise AmpruneError(f"{folder} misses {len(missing)} shard(s) named in {INDEX_FILE}: {', '.join(missing[:3])}")
    for path in sorted(set(files.values())):  # headers only: a truncated shard fails here, not mid-run
        with _opened(path) as handle:
            absent = [name for name, file in files.items() if file == path and name not in set(_tensor_names(handle))]
        if absent:
            raise AmpruneError(f"{path.name} lacks {absent[0]}, which {INDEX_FILE} places there")
    return files


def _tensor_names(handle) -> list[str]:
    return list(handle.keys())  # a safetensors handle is not iterable


def _opened(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise AmpruneError(f"cannot read {path} (truncated or not safetensors): {' '.join(str(err).split())}") from None


def empty_model(config) -> nn.Module:
    """The model of `config` with every parameter on the meta device; buffers (rotary tables) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _name_map(model: nn.Module, checkpoint_names: list[str]) -> dict[str, str]:
    """Model parameter name → checkpoint tensor name, through transformers' renaming rules for this model."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = dict(model.named_parameters(remove_duplicate=False))
    mapping = {}
    for name in checkpoint_names:
        renamed, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, wanted)
        if converted is not None:
            raise AmpruneError(f"checkpoint tensor {name} needs transformers' weight conversion ({converted}): "
                               "it cannot be read layer by layer")
        if renamed in wanted:
            mapping[renamed] = name
    return mapping


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a layer computes in: its own, except half precision on a CPU without fast kernels for
    it (float16 always; bfloat16 without AVX-512 BF16 or AMX), where float32 is many times faster."""
    if device.type != "cpu" or dtype == torch.float32:
        return dtype
    fast = dtype == torch.bfloat16 and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return dtype if fast else torch.float32


def local_folder(source: str) -> Path:
    """A local folder for `source`: the folder itself, or the hub snapshot of a hub id (config,
    safetensors and tokenizer files only; offline this fails with the hub's own message)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub client raises many types; all mean "not reachable"
        raise AmpruneError(f"cannot fetch {source} from the hub: {' '.join(str(err).split())[:300]}") from None


def footprint(model: nn.Module, family: Family, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of everything but the decoder layers, bytes of the largest decoder layer) in `dtype`, from the
    parameters' shapes (real or meta)."""
    layers = family.decoder_layers(model)
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    total = sum(p.numel() for p in model.parameters())
    return (total - sum(p.numel() for p in layers.parameters())) * dtype.itemsize, layer * dtype.itemsize


class Checkpoint:
    """A safetensors checkpoint opened lazily (see the module docstring).

    `dtype` (None: the stored one) is what the pruned model is saved in; layers compute in
    `compute_dtype(dtype)` on `device`.
    """

    reloads = True  # every pass reads the layers afresh: a pass may prune them in place

    def __init__(self, folder: str | Path, config, device: torch.device, dtype: torch.dtype | None = None):
        self.folder = Path(folder)
        self.config = config
        self.family: Family = get_family(config.model_type)
        self.files = _shard_files(self.folder)
        self.model = empty_model(config)
        self.names = _name_map(self.model, list(self.files))
        self.prefix = self.family.layers + "."
        tied = {id(p) for p in self.model.parameters()}  # named_parameters() skips tied duplicates
        missing = [n for n, p in self.model.named_parameters(remove_duplicate=False)
                   if n not in self.names and not (self._is_tied(n) and id(p) in tied)]
        if missing:
            raise AmpruneError(f"the checkpoint in {self.folder} lacks {len(missing)} of the model's tensors, "
                               f"e.g. {missing[0]}")
        self.stored_dtype = dtype or self._first_layer_dtype()
        self.device, self.dtype = device, compute_dtype(self.stored_dtype, device)

    def _is_tied(self, name: str) -> bool:
        return bool(getattr(self.config.get_text_config(), "tie_word_embeddings", False)) and name.endswith(
            "lm_head.weight")

    @property
    def stored_bytes(self) -> int:
        """Bytes of every tensor the checkpoint stores (headers read only)."""
        total = 0
        for path in sorted(set(self.files.values())):
            with _opened(path) as handle:
                for name in _tensor_names(handle):
                    piece = handle.get_slice(name)
                    total += SAFETENSORS_DTYPES[piece.get_dtype()].itemsize * torch.Size(piece.get_shape()).numel()
        return total

    def _first_layer_dtype(self) -> torch.dtype:
        """The dtype the first decoder layer's first weight is stored in."""
        name = self.names[next(n for n in self.names if n.startswith(self.prefix + "0."))]
        with _opened(self.files[name]) as handle:
            return SAFETENSORS_DTYPES[handle.get_slice(name).get_dtype()]

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Model tensor names → tensors read from their shards (each file opened once), in `self.dtype`."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[self.names[name]], []).append(name)
        tensors = {}
        for path, group in by_file.items():
            with _opened(path) as handle:  # closed right after: mapped pages do not linger in memory
                for name in group:
                    tensors[name] = handle.get_tensor(self.names[name]).to(self.device, self.dtype)
        return tensors

    def shell(self) -> nn.Module:
        """The model with everything but the decoder layers loaded; the layers stay on the meta device."""
        names = [n for n in self.names if not n.startswith(self.prefix)]
        self.model.load_state_dict(self._read(names), strict=False, assign=True)
        self.model.tie_weights()
        for buffer_owner in self.model.modules():  # rotary tables and other buffers follow the device
            for key, buffer in list(buffer_owner._buffers.items()):
                if buffer is not None and buffer.device != self.device:
                    buffer_owner._buffers[key] = buffer.to(self.device)
        return self.model.eval()

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer `index` with its weights read from disk, on the device, in the compute dtype."""
        layer = self.family.decoder_layers(self.model)[index]
        start = f"{self.prefix}{index}."
        tensors = self._read([n for n in self.names if n.startswith(start)])
        layer.load_state_dict({n.removeprefix(start): t for n, t in tensors.items()}, strict=True, assign=True)
        return layer.eval()

    def release_layer(self, index: int) -> None:
        """Return layer `index`'s tensors to the meta device (frees them, and hands their pages back)."""
        self.family.decoder_layers(self.model)[index].to("meta")
        return_freed_memory()


class InMemory:
    """A model loaded whole, served through the same calls as `Checkpoint` (nothing is read or freed)."""

    reloads = False  # a pass that prunes in place changes the model for every later pass

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.config = model.config
        self.family: Family = get_family(model.config.model_type)
        self.device = next(model.parameters()).device
        self.dtype = self.stored_dtype = next(model.parameters()).dtype

    @property
    def stored_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def shell(self) -> nn.Module:
        return self.model

    def load_layer(self, index: int) -> nn.Module:
        return self.family.decoder_layers(self.model)[index]

    def release_layer(self, index: int) -> None:
        pass

