"""Export a checkpoint to a GGUF file that llama.cpp serves, with llama.cpp's own tools.

The story: check the request (quantization type, output path, tools) → find the model folder → check
that llama.cpp's converter knows its architecture → `convert_hf_to_gguf.py` writes a 16-bit (or Q8_0)
GGUF → `llama-quantize` turns it into the requested type → rename into place. Everything is written to
a temporary folder next to the output first, so a failure leaves nothing half-written.

A pruned checkpoint needs nothing special: its config carries explicit `head_dim`, `num_attention_heads`,
`num_key_value_heads` and `intermediate_size`, which the converter writes as the GGUF's key/value length,
head counts and feed-forward length; a LLaMA saved as `MistralForCausalLM` (head counts LlamaConfig
refuses) converts as llama.cpp's `llama` architecture, which is the same computation.

Where the tools live: `$AMPRUNE_LLAMACPP`, else the source tree's `.llamacpp/` (`make setup` extracts
the converter there, `make llamacpp` builds the binaries into its `bin/`); binaries are also looked up
on PATH.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, CalibrationText, calibration_set, read_calibration
from .errors import AmpruneError

logger = logging.getLogger(__name__)

# Written by convert_hf_to_gguf.py itself (its --outtype).
CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")
# Made by llama-quantize from the converter's 16-bit file (with an importance matrix where one is given).
QUANTIZE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                  "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS")
# The low-bit types llama-quantize refuses to make without an importance matrix.
IMATRIX_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S")
QUANT_TYPES = CONVERTER_TYPES + QUANTIZE_TYPES + IMATRIX_TYPES
IMATRIX_FILES = (".gguf", ".dat")  # what llama-imatrix writes; any other --imatrix is calibration text
INSTALL_HINT = ("run `make llamacpp` in the amprune source tree, or set AMPRUNE_LLAMACPP to a folder with "
                "llama.cpp/ and bin/")


@dataclass(frozen=True)
class ExportRequest:
    """What `amprune export` is asked to do."""

    gguf: str  # the output file
    model: str | None = None  # a model folder or .gguf file; None: the packaged SmolLM2-135M-Instruct
    quant: str = "F16"  # one of QUANT_TYPES (case-insensitive)
    overwrite: bool = False
    threads: int | None = None  # llama-imatrix/llama-quantize threads (default: their own choice, all cores)
    # An importance matrix for llama-quantize: a file llama-imatrix wrote (.gguf/.dat), or calibration text to
    # compute one on (mix, c4, wiki, c4,wiki or a .txt/.jsonl: the calibration halves, as `prune --calib`).
    imatrix: str | None = None
    imatrix_samples: int = DEFAULT_SAMPLES  # windows of 512 tokens the importance matrix is computed on
    seed: int = 0  # draws those windows


@dataclass(frozen=True)
class ExportResult:
    path: Path
    quant: str
    bytes: int
    seconds: float
    fallback_tensors: int  # tensors llama-quantize stored in another type because their rows do not fit its blocks
    imatrix: str | None = None  # what the importance matrix came from, in words


def llamacpp_dir() -> Path:
    """$AMPRUNE_LLAMACPP, else `.llamacpp/` in the source tree this package runs from."""
    return Path(os.environ.get("AMPRUNE_LLAMACPP") or Path(__file__).resolve().parents[2] / ".llamacpp")


def converter_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (its gguf-py sits beside it and is the one it imports)."""
    script = llamacpp_dir() / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise AmpruneError(f"llama.cpp's converter is not installed (no {script}): {INSTALL_HINT}")
    if importlib.util.find_spec("sentencepiece") is None:
        raise AmpruneError("llama.cpp's converter needs the sentencepiece package: pip install 'amprune[export]' "
                           "(`make setup` installs it)")
    return script


def llamacpp_tool(name: str) -> Path:
    """A built llama.cpp binary (llama-quantize, llama-bench, …): `bin/` of llamacpp_dir(), else PATH."""
    built = llamacpp_dir() / "bin" / name
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which(name)
    if found:
        return Path(found)
    raise AmpruneError(f"llama.cpp's {name} is not built (not in {built.parent} nor on PATH): {INSTALL_HINT}")


def quant_type(name: str) -> str:
    """The canonical (upper-case) name of a supported quantization type."""
    canonical = name.upper()
    if canonical not in QUANT_TYPES:
        raise AmpruneError(f"unknown quantization type '{name}'; choose one of: {', '.join(QUANT_TYPES)}")
    return canonical


def check_output(path: str | Path, overwrite: bool) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".gguf":
        raise AmpruneError(f"--gguf must name a .gguf file, got {path}")
    if out.is_dir():
        raise AmpruneError(f"--gguf {path} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise AmpruneError(f"{path} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise AmpruneError(f"cannot write {path}: {out.parent} is not a folder")
    return out


def model_folder(model: str | None) -> Path:
    """A local Hugging Face folder for `model` (a .gguf input is dequantized into the cache first)."""
    from .models.loading import resolve_model

    folder = Path(resolve_model(model))
    if not (folder / "config.json").is_file():
        raise AmpruneError(f"export needs a local model folder or .gguf file, not a hub id: {model}")
    return folder


def converter_architectures(script: Path) -> set[str] | None:
    """The architectures the converter converts, read from its registry without importing it (None: unreadable)."""
    try:
        tree = ast.parse((script.parent / "conversion" / "__init__.py").read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TEXT_MODEL_MAP":
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def check_architecture(folder: Path, script: Path) -> str:
    """The checkpoint's architecture, refused up front when the converter does not know it or there are no
    weights (the converter would write a GGUF without tensors)."""
    config = json.loads((folder / "config.json").read_text())
    text_config = config.get("text_config") or {}
    archs = text_config.get("architectures") or config.get("architectures") or []
    if not archs:
        raise AmpruneError(f"{folder}/config.json names no architecture: llama.cpp's converter needs one")
    known = converter_architectures(script)
    if known is not None and archs[0] not in known:
        raise AmpruneError(f"llama.cpp's converter does not know the architecture {archs[0]} "
                           f"(model_type {config.get('model_type')}); it cannot be exported to GGUF")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise AmpruneError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    return archs[0]


def _run(command: list, what: str, env: dict | None = None, cwd: Path | None = None) -> str:
    """Run a llama.cpp tool; its output goes to the debug log, a failure becomes one line."""
    logger.debug("running %s", " ".join(map(str, command)))
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, cwd=cwd)
    output = proc.stdout + proc.stderr
    logger.debug("%s output:\n%s", what, output)
    if proc.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        last = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        raise AmpruneError(f"{what} failed: {last[:300]}")
    return output


def convert(folder: Path, out: Path, outtype: str, script: Path) -> None:
    """convert_hf_to_gguf.py: `folder` → `out` (outtype: f32, f16, bf16, q8_0 or auto)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, not an older pip one
    env["HF_HUB_OFFLINE"] = "1"  # the converter reads the folder's tokenizer; never the hub
    _run([sys.executable, script, folder, "--outfile", out, "--outtype", outtype], "llama.cpp's converter", env)


def imatrix_source(request: ExportRequest, quant: str) -> Path | CalibrationText | None:
    """The importance matrix file, or the calibration text to compute one on; checked before any work."""
    if request.imatrix is None:
        if quant in IMATRIX_TYPES:
            raise AmpruneError(f"{quant} needs an importance matrix: add --imatrix mix (or another calibration text, "
                               "or a file from llama-imatrix)")
        return None
    if quant in CONVERTER_TYPES:
        raise AmpruneError(f"--imatrix guides llama-quantize, and {quant} comes from the converter: use it with "
                           f"{', '.join(QUANTIZE_TYPES + IMATRIX_TYPES)}")
    if Path(request.imatrix).suffix.lower() in IMATRIX_FILES:
        if not Path(request.imatrix).is_file():
            raise AmpruneError(f"importance matrix {request.imatrix} not found (a .gguf or .dat file from "
                               "llama-imatrix)")
        return Path(request.imatrix).resolve()  # llama-quantize runs in the staging folder
    return read_calibration(request.imatrix, request.imatrix_samples, DEFAULT_SEQ_LEN)


def compute_imatrix(gguf: Path, folder: Path, text: CalibrationText, request: ExportRequest) -> tuple[Path, str]:
    """llama-imatrix on `gguf` over calibration windows drawn as `prune` draws them (the model's tokenizer,
    the seed), written out as text for llama.cpp to tokenize again. Runs in `gguf`'s folder with relative
    names, which llama.cpp records in the GGUF's metadata. Returns the matrix and what it was computed on."""
    from .models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    calib = calibration_set(text, tokenizer, request.imatrix_samples, DEFAULT_SEQ_LEN, request.seed)
    text_file = "calibration-" + re.sub(r"[^\w.,-]+", "_", Path(text.source).name).removesuffix(".txt") + ".txt"
    (gguf.parent / text_file).write_text("\n\n".join(tokenizer.decode(s) for s in calib.samples), encoding="utf-8")
    threads = ["-t", request.threads] if request.threads else []
    output = _run([llamacpp_tool("llama-imatrix"), "-m", gguf, "-f", text_file, "-o", "imatrix.gguf",
                   "-c", DEFAULT_SEQ_LEN, "--no-ppl", *threads], "llama-imatrix", cwd=gguf.parent)
    chunks = re.search(r"computing over (\d+) chunks", output)
    return Path("imatrix.gguf"), f"computed on {chunks.group(1) if chunks else '?'} × {DEFAULT_SEQ_LEN} tokens of " \
                                 f"{text.source}"


def quantize(source: Path, out: Path, quant: str, threads: int | None = None, imatrix: Path | None = None) -> int:
    """llama-quantize `source` → `out` (a relative `imatrix` is in `source`'s folder); returns how many tensors
    fell back to another type."""
    guide = ["--imatrix", imatrix] if imatrix else []
    command = [llamacpp_tool("llama-quantize"), *guide, source, out, quant] + ([threads] if threads else [])
    output = _run(command, "llama-quantize", cwd=source.parent)
    fallback = re.search(r"(\d+) of \d+ tensor\(s\) required fallback quantization", output)
    return int(fallback.group(1)) if fallback else 0


def export(request: ExportRequest) -> ExportResult:
    """Convert (and quantize) a checkpoint into `request.gguf`; see the module docstring."""
    quant = quant_type(request.quant)
    out = check_output(request.gguf, request.overwrite)
    guide = imatrix_source(request, quant)
    script = converter_script()
    if quant not in CONVERTER_TYPES:  # missing tools are reported before any work
        llamacpp_tool("llama-quantize")
    if isinstance(guide, CalibrationText):
        llamacpp_tool("llama-imatrix")
    folder = model_folder(request.model)
    arch = check_architecture(folder, script)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fallback, imatrix = 0, None
        if quant in CONVERTER_TYPES:
            convert(folder, staging / out.name, quant.lower(), script)
        else:  # the highest-fidelity 16-bit type (bf16 weights stay bf16), then quantized
            logger.info("converting %s (%s) to a 16-bit GGUF", folder, arch)
            convert(folder, staging / "model-16bit.gguf", "auto", script)
            if isinstance(guide, CalibrationText):
                logger.info("computing the importance matrix on %s", guide.source)
                guide, imatrix = compute_imatrix(staging / "model-16bit.gguf", folder, guide, request)
            elif guide is not None:
                imatrix = f"read from {guide}"
            logger.info("quantizing to %s", quant)
            fallback = quantize(staging / "model-16bit.gguf", staging / out.name, quant, request.threads, guide)
        os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if fallback:
        logger.warning(
            "%d tensors did not fit %s's blocks (rows must be a multiple of 256 for K-quants, 32 otherwise) and were "
            "stored in another type, F16 where not even 32 fits: prune with --round-to 32 or 256 for smaller files",
            fallback, quant,
        )
    return ExportResult(out, quant, out.stat().st_size, time.perf_counter() - start, fallback, imatrix)


def gguf_summary(path: str | Path) -> dict:
    """The metadata that says what llama.cpp will build: architecture, sizes per layer, vocabulary, file type."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)

    def field(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    file_type = field("general.file_type")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return {
        "architecture": arch,
        "file_type": LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        if file_type is not None else None,
        "block_count": field(f"{arch}.block_count"),
        "embedding_length": field(f"{arch}.embedding_length"),
        "head_count": field(f"{arch}.attention.head_count"),
        "head_count_kv": field(f"{arch}.attention.head_count_kv"),
        "key_length": field(f"{arch}.attention.key_length"),
        "value_length": field(f"{arch}.attention.value_length"),
        "feed_forward_length": field(f"{arch}.feed_forward_length"),
        "vocab_tokens": len(tokens.data) if tokens is not None else None,
        "tokenizer": field("tokenizer.ggml.model"),
    }
