"""`amprune export`: GGUF metadata of pruned layouts, llama.cpp's logits against PyTorch's, bad input.

The tiny models use the packaged SmolLM2 tokenizer: llama.cpp's converter only accepts tokenizers whose
pre-tokenizer it recognises, and this one it does ("smollm"). Tests that run llama.cpp's binaries skip
where `make llamacpp` has not built them; the converter itself comes with `make setup`.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from gguf import GGUFReader, LlamaFileType
from helpers import random_model, tiny_config

from amprune.calibration import read_calibration
from amprune.cli import main
from amprune.errors import AmpruneError
from amprune.export import ExportRequest, compute_imatrix, export, llamacpp_tool
from amprune.models.loading import load_tokenizer, resolve_model

SMOLLM2_VOCAB = 49152
# Checkpoint layouts `amprune prune` writes (explicit head_dim everywhere):
LAYOUTS = {
    # LLaMA with GQA after query-mode pruning: 4 of 6 heads, 2 KV heads, 4·8 = 32 ≠ hidden 48, odd MLP width
    "llama_gqa_pruned": ("llama", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       intermediate_size=29)),
    # LLaMA after group-mode pruning: 2 of 4 heads, each its own KV group
    "llama_mha_pruned": ("llama", dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                       intermediate_size=37)),
    # LLaMA pruned to 3 of 4 heads: LlamaConfig refuses 64 % 3, so amprune saves it as Mistral (full attention)
    "llama_saved_as_mistral": ("mistral", dict(hidden_size=64, num_attention_heads=3, num_key_value_heads=3,
                                               head_dim=16, intermediate_size=37, sliding_window=None)),
}
PROMPT = "The quick brown fox jumps over the lazy dog, 42 times."


def _built(name: str):
    try:
        return llamacpp_tool(name)
    except AmpruneError:
        return None


def needs_tool(name: str):
    return pytest.mark.skipif(_built(name) is None,
                              reason=f"llama.cpp's {name} is not built (`make llamacpp` builds it into .llamacpp/bin)")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(resolve_model(None))


def save_layout(folder, layout: str, tokenizer, seed: int = 0):
    """A tiny random model of `layout` with the SmolLM2 tokenizer, saved as a stock checkpoint."""
    case, sizes = LAYOUTS[layout]
    base = "mistral" if case == "mistral" else "llama_mha"
    config = tiny_config(base, vocab_size=SMOLLM2_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, **sizes)
    model = random_model(config, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, str(folder)


def metadata(path) -> dict:
    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("tokenizer.ggml.") or name in ("tokenizer.ggml.model", "tokenizer.ggml.pre")}
    fields["tokens"] = reader.get_field("tokenizer.ggml.tokens").contents()
    fields["tensor_shapes"] = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    return fields


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gguf_metadata_matches_the_checkpoint(layout, tmp_path, smollm2_tokenizer):
    _, folder = save_layout(tmp_path / "ckpt", layout, smollm2_tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == LAYOUTS[layout][0]
    result = export(ExportRequest(gguf=str(tmp_path / "m.gguf"), model=folder))
    assert result.quant == "F16" and result.path.stat().st_size == result.bytes
    meta = metadata(tmp_path / "m.gguf")
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    assert meta["general.architecture"] == "llama"  # Mistral-saved too: the same computation in llama.cpp
    assert meta["general.file_type"] == LlamaFileType.MOSTLY_F16
    assert (meta["llama.block_count"], meta["llama.embedding_length"]) == (2, config["hidden_size"])
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (heads, kv)
    assert (meta["llama.attention.key_length"], meta["llama.attention.value_length"]) == (d, d)
    assert meta["llama.rope.dimension_count"] == d
    assert meta["llama.feed_forward_length"] == config["intermediate_size"]
    # GGUF shapes list the input dimension first
    shapes = meta["tensor_shapes"]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    for i in range(2):
        assert shapes[f"blk.{i}.attn_q.weight"] == (hidden, heads * d)
        assert shapes[f"blk.{i}.attn_k.weight"] == shapes[f"blk.{i}.attn_v.weight"] == (hidden, kv * d)
        assert shapes[f"blk.{i}.attn_output.weight"] == (heads * d, hidden)
        assert shapes[f"blk.{i}.ffn_gate.weight"] == shapes[f"blk.{i}.ffn_up.weight"] == (hidden, inter)
        assert shapes[f"blk.{i}.ffn_down.weight"] == (inter, hidden)
    # the tokenizer came along, token for token
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokens"]) == SMOLLM2_VOCAB
    ids = smollm2_tokenizer(PROMPT)["input_ids"]
    assert [meta["tokens"][i] for i in ids] == smollm2_tokenizer.convert_ids_to_tokens(ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]  # no temporary file left next to it


def test_pruned_by_amprune_then_exported(tmp_path, calib_text, smollm2_tokenizer, capsys):
    """The real pipeline: 4 heads → 3 (so saved as Mistral), then export: the GGUF says what the config says."""
    config = tiny_config("llama_mha", vocab_size=SMOLLM2_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    random_model(config).save_pretrained(tmp_path / "dense")
    smollm2_tokenizer.save_pretrained(tmp_path / "dense")
    pruned = tmp_path / "pruned"
    assert main(["--quiet", "prune", "--recipe", "paper", "--model", str(tmp_path / "dense"), "--head-ratio", "0.25",
                 "--mlp-ratio", "0.25",
                 "--calib", calib_text, "--samples", "4", "--seq-len", "32", "--out", str(pruned)]) == 0
    config = json.loads((pruned / "config.json").read_text())
    assert (config["model_type"], config["num_attention_heads"], config["head_dim"]) == ("mistral", 3, 16)
    export(ExportRequest(gguf=str(tmp_path / "m.gguf"), model=str(pruned)))
    meta = metadata(tmp_path / "m.gguf")
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (3, 3)
    assert (meta["llama.attention.key_length"], meta["llama.attention.value_length"]) == (16, 16)
    assert meta["llama.feed_forward_length"] == config["intermediate_size"] == 36
    assert meta["llama.block_count"] == config["num_hidden_layers"] == 2


def _llamacpp_last_logits(gguf_path, out_dir, prompt: str, flags: list[str]) -> tuple[list[int], np.ndarray]:
    """Tokens and last-token logits as llama.cpp computes them (llama-debug, its conversion checker)."""
    subprocess.run([str(_built("llama-debug")), "-m", str(gguf_path), "-p", prompt, "--save-logits",
                    "--logits-output-dir", str(out_dir), "-t", "1", "-c", "128", *flags],
                   check=True, capture_output=True, text=True)
    stem = f"llamacpp-{gguf_path.stem}"
    tokens = np.fromfile(out_dir / f"{stem}-tokens.bin", dtype=np.int32).tolist()
    return tokens, np.fromfile(out_dir / f"{stem}.bin", dtype=np.float32)


# F32 weights with float32 attention (no flash attention, which rounds Q to f16 on a CPU; an f32 KV cache):
# the same arithmetic as PyTorch's, measured 1.2e-6 of the largest logit. F16 weights with llama.cpp's
# defaults (flash attention, f16 KV cache), what users run: measured 2.4e-3.
EXACT = ["--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32"]


@needs_tool("llama-debug")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("quant", "flags", "tolerance"), [("F32", EXACT, 1e-5), ("F16", [], 1e-2)],
                         ids=["F32-exact", "F16-defaults"])
def test_llamacpp_computes_the_pytorch_logits(layout, quant, flags, tolerance, tmp_path, smollm2_tokenizer):
    model, folder = save_layout(tmp_path / "ckpt", layout, smollm2_tokenizer, seed=3)
    gguf_path = tmp_path / f"{layout}-{quant}.gguf"
    export(ExportRequest(gguf=str(gguf_path), model=folder, quant=quant))
    tokens, logits = _llamacpp_last_logits(gguf_path, tmp_path / "logits", PROMPT, flags)
    assert tokens == smollm2_tokenizer(PROMPT)["input_ids"]  # the same tokenizer on both sides
    assert len(tokens) > 10
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0, -1].numpy()
    assert logits.shape == expected.shape == (SMOLLM2_VOCAB,)
    error, scale = np.abs(logits - expected).max(), np.abs(expected).max()
    assert error <= tolerance * scale, f"llama.cpp's logits differ by {error:.3g} (largest logit {scale:.3g})"
    assert np.argmax(logits) == np.argmax(expected)


@needs_tool("llama-quantize")
def test_quantized_export_through_llama_quantize(tmp_path, smollm2_tokenizer):
    _, folder = save_layout(tmp_path / "ckpt", "llama_saved_as_mistral", smollm2_tokenizer)
    f16 = export(ExportRequest(gguf=str(tmp_path / "f16.gguf"), model=folder))
    q4 = export(ExportRequest(gguf=str(tmp_path / "q4.gguf"), model=folder, quant="q4_k_m", threads=1))
    assert q4.quant == "Q4_K_M" and q4.bytes < f16.bytes
    meta = metadata(tmp_path / "q4.gguf")
    assert meta["general.file_type"] == LlamaFileType.MOSTLY_Q4_K_M
    assert (meta["llama.attention.head_count"], meta["llama.attention.key_length"]) == (3, 16)
    # rows of 64 or 37 values fit no 256-value K-quant block: llama-quantize falls back, and says so
    assert q4.fallback_tensors > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "f16.gguf", "q4.gguf"]


def tensors(path) -> dict:
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in GGUFReader(path).tensors}


@needs_tool("llama-imatrix")
@needs_tool("llama-quantize")
def test_importance_matrix_from_calibration_text_or_a_file(tmp_path, smollm2_tokenizer, capsys, monkeypatch):
    # widths of 256 fit Q4_K_M's blocks: every layer tensor is a K-quant, which the importance matrix steers
    config = tiny_config("llama_mha", vocab_size=SMOLLM2_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                         intermediate_size=512)
    random_model(config, 0).save_pretrained(tmp_path / "ckpt")
    smollm2_tokenizer.save_pretrained(tmp_path / "ckpt")
    folder, guided = str(tmp_path / "ckpt"), tmp_path / "guided.gguf"
    plain = export(ExportRequest(gguf=str(tmp_path / "plain.gguf"), model=folder, quant="Q4_K_M", threads=1))
    assert plain.fallback_tensors == 0 and plain.imatrix is None
    capsys.readouterr()
    assert main(["--quiet", "export", "--model", folder, "--gguf", str(guided), "--quant", "Q4_K_M", "--imatrix", "mix",
                 "--imatrix-samples", "4", "--threads", "1"]) == 0
    assert "importance matrix: computed on 4 × 512 tokens of mix\n" in capsys.readouterr().out
    meta = metadata(guided)
    assert (meta["quantize.imatrix.dataset"], meta["quantize.imatrix.chunks_count"]) == ("calibration-mix.txt", 4)
    assert meta["quantize.imatrix.file"] == "imatrix.gguf"  # relative: no temporary path in the metadata
    ours, theirs = tensors(guided), tensors(tmp_path / "plain.gguf")
    steered = [name for name, (kind, data) in ours.items() if not np.array_equal(data, theirs[name][1])]
    assert {name.split(".")[-2] for name in steered} == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                         "ffn_up", "ffn_down"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "guided.gguf", "plain.gguf"]
    # the same matrix computed apart and given as a file quantizes to the same tensors
    export(ExportRequest(gguf=str(tmp_path / "f16.gguf"), model=folder))
    request = ExportRequest(gguf="unused.gguf", imatrix="mix", imatrix_samples=4, threads=1)
    matrix, _ = compute_imatrix(tmp_path / "f16.gguf", tmp_path / "ckpt", read_calibration("mix", 4, 512), request)
    monkeypatch.chdir(tmp_path)  # a relative path names a file in the working folder, wherever the tools run
    from_file = export(ExportRequest(gguf=str(tmp_path / "from-file.gguf"), model=folder, quant="Q4_K_M", threads=1,
                                     imatrix=str(matrix)))
    assert from_file.imatrix == f"read from {tmp_path / matrix}"
    again = tensors(tmp_path / "from-file.gguf")
    assert all(np.array_equal(again[name][1], data) for name, (_, data) in ours.items())
    # a type llama-quantize makes only with an importance matrix
    export(ExportRequest(gguf=str(tmp_path / "iq2.gguf"), model=folder, quant="IQ2_XS", threads=1,
                         imatrix=str(tmp_path / matrix)))
    assert metadata(tmp_path / "iq2.gguf")["general.file_type"] == LlamaFileType.MOSTLY_IQ2_XS


def test_cli_export_prints_what_llamacpp_sees(tmp_path, smollm2_tokenizer, capsys):
    _, folder = save_layout(tmp_path / "ckpt", "llama_saved_as_mistral", smollm2_tokenizer)
    out = tmp_path / "m.gguf"
    assert main(["--quiet", "export", "--model", folder, "--gguf", str(out), "--quant", "Q8_0"]) == 0
    shown = capsys.readouterr().out
    assert f"saved: {out}  (Q8_0, " in shown
    assert "llama.cpp sees: llama, 2 layers, 3 heads (3 KV) of 16, feed-forward 37, 49152 tokens (gpt2)" in shown
    assert metadata(out)["general.file_type"] == LlamaFileType.MOSTLY_Q8_0


def _cli_error(args, capsys) -> str:
    assert main(["--quiet", "export", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("amprune: error: ")
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, smollm2_tokenizer, capsys):
    _, folder = save_layout(tmp_path / "ckpt", "llama_mha_pruned", smollm2_tokenizer)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "m.gguf"
    err = _cli_error(["--model", folder, "--gguf", str(out), "--quant", "Q9_9"], capsys)
    assert "unknown quantization type 'Q9_9'; choose one of: F32, F16, BF16, Q8_0, Q4_0" in err
    assert not out.exists()
    out.write_text("an older export")
    err = _cli_error(["--model", folder, "--gguf", str(out)], capsys)
    assert f"{out} exists; pass --overwrite to replace it" in err
    assert out.read_text() == "an older export"
    err = _cli_error(["--model", folder, "--gguf", str(out), "--overwrite", "--imatrix", "mix"], capsys)
    assert "--imatrix guides llama-quantize, and F16 comes from the converter: use it with Q4_0, " in err
    err = _cli_error(["--model", folder, "--gguf", str(out), "--quant", "Q4_K_M", "--overwrite", "--imatrix",
                      str(tmp_path / "none.dat")], capsys)
    assert f"importance matrix {tmp_path / 'none.dat'} not found (a .gguf or .dat file from llama-imatrix)" in err
    err = _cli_error(["--model", folder, "--gguf", str(out), "--quant", "iq2_xs", "--overwrite"], capsys)
    assert "IQ2_XS needs an importance matrix: add --imatrix mix (or another calibration text, or a file from " in err
    err = _cli_error(["--model", folder, "--gguf", str(out), "--quant", "Q4_K_M", "--overwrite", "--imatrix", "c5"],
                     capsys)
    assert "calibration source 'c5' is neither a packaged text (c4, wiki) nor a readable .txt/.jsonl file" in err
    assert out.read_text() == "an older export"
    assert "must name a .gguf file" in _cli_error(["--model", folder, "--gguf", str(tmp_path / "m.bin")], capsys)
    assert "is not a folder" in _cli_error(["--model", folder, "--gguf", str(tmp_path / "no" / "m.gguf")], capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architectures": ["FrobnicatorForCausalLM"],
                                                     "model_type": "frobnicator"}))
    err = _cli_error(["--model", str(foreign), "--gguf", str(tmp_path / "f.gguf")], capsys)
    assert "llama.cpp's converter does not know the architecture FrobnicatorForCausalLM (model_type frobnicator)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "foreign", "m.gguf"]
    assert export(ExportRequest(gguf=str(out), model=folder, overwrite=True)).bytes > 1000
    assert metadata(out)["llama.attention.head_count"] == 2


def test_a_failing_conversion_leaves_nothing_behind(tmp_path, smollm2_tokenizer):
    _, folder = save_layout(tmp_path / "ckpt", "llama_gqa_pruned", smollm2_tokenizer)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.unlink()
    with pytest.raises(AmpruneError, match=r"holds no weights \(\*\.safetensors or pytorch_model\*\.bin\)$"):
        export(ExportRequest(gguf=str(tmp_path / "m.gguf"), model=folder))
    weights.write_bytes(b"not a safetensors file")  # the converter itself fails on this one
    out = tmp_path / "m.gguf"
    out.write_text("an older export")
    with pytest.raises(AmpruneError, match=r"^llama\.cpp's converter failed: "):
        export(ExportRequest(gguf=str(out), model=folder, overwrite=True))
    assert out.read_text() == "an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]


def test_missing_tools_say_how_to_install_them(tmp_path, monkeypatch, smollm2_tokenizer):
    _, folder = save_layout(tmp_path / "ckpt", "llama_mha_pruned", smollm2_tokenizer)
    empty = tmp_path / "no-llamacpp"
    empty.mkdir()
    monkeypatch.setenv("AMPRUNE_LLAMACPP", str(empty))
    with pytest.raises(AmpruneError, match=r"^llama.cpp's converter is not installed \(no .*convert_hf_to_gguf.py\): "
                       r"run `make llamacpp` in the amprune source tree, or set AMPRUNE_LLAMACPP"):
        export(ExportRequest(gguf=str(tmp_path / "m.gguf"), model=folder))
    (empty / "llama.cpp").mkdir()
    (empty / "llama.cpp" / "convert_hf_to_gguf.py").write_text("raise SystemExit('never run')\n")
    monkeypatch.setenv("PATH", str(empty))  # no llama-quantize on PATH either
    with pytest.raises(AmpruneError, match=r"^llama.cpp's llama-quantize is not built .*: run `make llamacpp`"):
        export(ExportRequest(gguf=str(tmp_path / "m.gguf"), model=folder, quant="Q4_K_M"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "no-llamacpp"]
