"""`amprune prune` / `inspect` / `list` end to end on tiny models, and every bad input as one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import char_tokenizer, save_tiny, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from amprune.cli import main
from amprune.models import supported_model_types

CALIB = ["--samples", "4", "--seq-len", "32"]


@pytest.fixture
def tiny_folder(tmp_path):
    return save_tiny(tmp_path / "dense", "llama_gqa")


def prune(args, capsys):
    code = main(["--quiet", "prune", "--recipe", "paper", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_inspect_and_reload(tiny_folder, calib_text, tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    code, out, err = prune(["--model", tiny_folder, "--ratio", "0.3", "--calib", calib_text, *CALIB,
                            "--out", str(out_dir)], capsys)
    assert code == 0, err
    plan = json.loads((out_dir / "amprune_plan.json").read_text())
    assert plan["budget"]["target_fraction"] == 0.3
    assert plan["settings"]["calibration"] == calib_text and plan["settings"]["samples"] == 4
    assert len(plan["layers"]) == 2 and len(plan["layers"][0]["head_scores"]) == 6
    assert "parameters" in out and "attention heads / layer" in out and "peak memory" in out
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert sum(p.numel() for p in model.parameters()) == plan["budget"]["params_after"]
    assert main(["inspect", str(out_dir)]) == 0
    shown = capsys.readouterr().out
    assert f"{plan['budget']['params_after']:,}" in shown and "--gqa-mode query" in shown


def test_summary_suggests_round_to_for_widths_off_a_multiple_of_8(tiny_folder, calib_text, tmp_path, capsys):
    for name, extra in (("exact", []), ("r8", ["--round-to", "8"])):
        out_dir = tmp_path / name
        code, out, err = prune(["--model", tiny_folder, "--ratio", "0.3", "--calib", calib_text, *CALIB, *extra,
                                "--out", str(out_dir)], capsys)
        assert code == 0, err
        kept = json.loads((out_dir / "amprune_plan.json").read_text())["dims_after"]["intermediate_size"]
        assert (kept, "--round-to 8 keeps a multiple of 8" in out) == ((20, True) if name == "exact" else (16, False))


def test_same_command_twice_gives_the_same_plan(tiny_folder, calib_text, tmp_path, capsys):
    plans = []
    for name in ("a", "b"):
        args = ["--model", tiny_folder, "--head-ratio", "0.34", "--mlp-ratio", "0.5", "--gqa-mode", "group",
                "--calib", calib_text, *CALIB, "--seed", "7", "--out", str(tmp_path / name)]
        assert prune(args, capsys)[0] == 0
        plans.append(json.loads((tmp_path / name / "amprune_plan.json").read_text()))
    assert plans[0]["layers"] == plans[1]["layers"]
    assert len(plans[0]["layers"][0]["kv_heads_kept"]) == 1


def test_list_shows_every_family(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in supported_model_types())


@pytest.fixture
def gpt2_folder(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=128, n_positions=64))
    model.save_pretrained(tmp_path / "gpt2")
    char_tokenizer().save_pretrained(tmp_path / "gpt2")
    return str(tmp_path / "gpt2")


@pytest.fixture
def mqa_folder(tmp_path):
    return save_tiny(tmp_path / "mqa", "mistral", num_key_value_heads=1)


@pytest.fixture
def nan_folder(tmp_path):
    folder = save_tiny(tmp_path / "nan", "mistral")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def junk_weights_folder(tmp_path):
    folder = save_tiny(tmp_path / "junk", "llama_gqa")
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\x10\x00 not a safetensors file")
    return folder


@pytest.fixture
def unknown_type_folder(tmp_path):  # a model_type transformers itself does not know
    folder = save_tiny(tmp_path / "foollama", "llama_gqa")
    config = json.loads((tmp_path / "foollama" / "config.json").read_text())
    (tmp_path / "foollama" / "config.json").write_text(json.dumps({**config, "model_type": "foollama"}))
    return folder


@pytest.fixture
def sharded_folder(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("llama_gqa").save_pretrained(folder, max_shard_size="20KB")
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def missing_shard_folder(sharded_folder):
    sorted(sharded_folder.glob("model-*.safetensors"))[1].unlink()
    return str(sharded_folder)


@pytest.fixture
def truncated_shard_folder(sharded_folder):
    shard = sorted(sharded_folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return str(sharded_folder)


@pytest.fixture
def no_disk(monkeypatch):
    """A disk with 10 KiB free wherever the output goes."""
    usage = type("Usage", (), {"free": 10 * 2**10})()
    monkeypatch.setattr("amprune.streams.shutil.disk_usage", lambda path: usage)


@pytest.fixture
def bad_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF? no: a file that only has the right suffix")
    return str(path)


BAD = [
    ("gpt2", ["--ratio", "0.3"], "unsupported model_type 'gpt2'. Supported: "),
    ("dense", ["--ratio", "1.5"], "argument --ratio: must be in [0, 1), got 1.5"),
    ("dense", ["--head-ratio", "0.95"], "would remove every attention head of every layer"),
    ("dense", ["--mlp-ratio", "0.999"], "would remove every MLP neuron of every layer"),
    ("mqa", ["--ratio", "0.3", "--gqa-mode", "group"],
     "--gqa-mode group cannot prune heads of a model with a single KV head"),
    ("dense", ["--head-ratio", "0.1", "--gqa-mode", "group"], "--gqa-mode group cannot express --head-ratio 0.1"),
    ("missing", ["--ratio", "0.3"], "model not found: "),
    ("foollama", ["--ratio", "0.3"], "unsupported model_type 'foollama'. Did you mean 'llama'? Supported: "),
    ("junk", ["--ratio", "0.3"], "model.safetensors (truncated or not safetensors): Error while deserializing header"),
    ("missing_shard", ["--ratio", "0.3"],
     "misses 1 shard(s) named in model.safetensors.index.json: model-00002-of-"),
    ("truncated_shard", ["--ratio", "0.3"],
     "(truncated or not safetensors): Error while deserializing header: incomplete metadata, file not fully covered"),
    ("no_disk", ["--ratio", "0.3"], "the output needs 95.4 KiB of disk in "),
    ("no_disk", ["--ratio", "0.3", "--hidden-states", "disk"], "the output and the hidden states need 143.4 KiB of"),
    ("dense", ["--ratio", "0.3", "--device", "cuda"], "--device cuda was requested but no CUDA device is available"),
    ("gguf", ["--ratio", "0.3"], "cannot read the GGUF file "),
    ("dense", ["--ratio", "0.3", "--calib", "missing.jsonl"], "calibration source 'missing.jsonl' is neither"),
    ("dense", ["--ratio", "0.3", "--samples", "500"], "has 4219 tokens (131 windows of --seq-len 32), too few for 500 "
                                                      "samples; lower --samples or use a longer source"),
    ("dense", ["--ratio", "0.3", "--recipe", "default", "--heldout", "2"],
     "the allocation search needs at least 2048 held-out calibration tokens to rank its candidates, got 64; raise "
     "--heldout (or --seq-len), or use --allocation uniform"),
    ("dense", ["--ratio", "0.3", "--recipe", "default", "--samples", "8", "--search-samples", "9"],
     "--search-samples must be between 1 and --samples (8), got 9"),
    ("dense", ["--ratio", "0.3", "--recipe", "paper", "--heldout", "4"],
     "--heldout tunes the allocation search, and this run allocates uniformly (--recipe paper): drop --heldout or use "
     "--allocation search"),
    ("dense", ["--ratio", "0.3", "--recipe", "default", "--allocation", "uniform", "--max-dropped", "1"],
     "--max-dropped tunes the allocation search, and this run allocates uniformly (--recipe default --allocation "
     "uniform): drop --max-dropped or use --allocation search"),
    ("dense", ["--ratio", "0.97", "--recipe", "default"], "no stock-valid plan removes 97.0% of the parameters"),
    ("nan", ["--ratio", "0.3"], "non-finite activations in decoder layer 0"),
    ("full", ["--ratio", "0.3"], "is not empty; pass --overwrite to replace it"),
    ("dense", ["--ratio", "0.3", "--batch-size", "0"], "argument --batch-size: must be positive, got 0"),
]


@pytest.mark.parametrize("model, args, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(model, args, message, request, tmp_path, calib_text, capsys, monkeypatch):
    folders = {"dense": "tiny_folder", "gpt2": "gpt2_folder", "mqa": "mqa_folder", "nan": "nan_folder",
               "junk": "junk_weights_folder", "foollama": "unknown_type_folder", "gguf": "bad_gguf",
               "missing_shard": "missing_shard_folder", "truncated_shard": "truncated_shard_folder"}
    if model in ("junk", "missing_shard", "truncated_shard", "no_disk"):
        # found on opening the weights lazily (headers only) or laying out the output: before any layer is read
        monkeypatch.setattr("amprune.weights.Checkpoint.load_layer", _must_not_load)
    elif model != "nan":  # only NaN weights need a layer to run: the rest fails before the weights are opened
        monkeypatch.setattr("amprune.pipeline.open_weights", _must_not_load)
    if model == "no_disk":
        request.getfixturevalue("no_disk")
        model = "dense"
    model_arg = request.getfixturevalue(folders[model]) if model in folders else str(tmp_path / "nowhere")
    out_dir = tmp_path / "out"
    if model == "full":
        model_arg = request.getfixturevalue("tiny_folder")
        out_dir.mkdir()
        (out_dir / "something").write_text("x")
    argv = ["--model", model_arg, "--calib", calib_text, *CALIB, "--out", str(out_dir), *args]
    capsys.readouterr()  # drop what building the fixtures printed
    code, _, err = prune(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amprune: error: ") and message in lines[0], err
    if model != "full":
        assert not out_dir.exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left half-written


def _must_not_load(*args, **kwargs):
    raise AssertionError("the weights were read before the bad input was refused")


def test_cheap_checks_come_before_converting_a_gguf(bad_gguf, tmp_path, calib_text, capsys, monkeypatch):
    monkeypatch.setattr("amprune.models.loading.convert_gguf", _must_not_load)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [
        (["--ratio", "1.5"], "argument --ratio: must be in [0, 1), got 1.5"),
        (["--ratio", "0.3", "--out", str(full)], "is not empty; pass --overwrite"),
        (["--ratio", "0.3", "--calib", str(tmp_path / "missing.txt")], "calibration source"),
        (["--ratio", "0.3", "--head-ratio", "0.2"], "give either --ratio or --head-ratio/--mlp-ratio"),
    ]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
        code, _, err = prune(["--model", bad_gguf, *CALIB, *out, *args], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    # compare and recover check their own settings before converting too
    for argv, message in (
        (["compare", "--ratios", "0.2,1.5", "--out", str(tmp_path / "cmp")],
         "argument --ratios: must be in [0, 1), got 1.5"),
        (["compare", "--calib", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "cmp")], "calibration source"),
        (["recover", "--out", str(full)], "is not empty; pass --overwrite"),
    ):
        assert main(["--quiet", argv[0], "--model", bad_gguf, *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


INVALID = [  # (argv, the one line): unknown choices, malformed lists, negative counts, ranges, conflicts
    (["prune", "--out", "o", "--gqa-mode", "nope"], "argument --gqa-mode: invalid choice: 'nope' (choose from 'query', "
     "'group')"),
    (["prune", "--out", "o", "--recipe", "best"], "argument --recipe: invalid choice: 'best' (choose from 'default', "
     "'paper')"),
    (["prune", "--out", "o", "--correction", "refit2"], "argument --correction: invalid choice: 'refit2'"),
    (["prune", "--out", "o", "--samples", "-1"], "argument --samples: must be positive, got -1"),
    (["prune", "--out", "o", "--heldout", "-2"], "argument --heldout: must be zero or more, got -2"),
    (["prune", "--out", "o", "--max-dropped", "-1"], "argument --max-dropped: must be zero or more, got -1"),
    (["prune", "--out", "o", "--search-samples", "0"], "argument --search-samples: must be positive, got 0"),
    (["prune", "--out", "o", "--ratio", "2"], "argument --ratio: must be in [0, 1), got 2"),
    (["prune", "--out", "o", "--ratio", "0.3", "--head-ratio", "0.2"], "give either --ratio or "
     "--head-ratio/--mlp-ratio, not both"),
    (["prune", "--out", "o", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8' (choose from 'float32', "
     "'bfloat16', 'float16')"),
    (["prune", "--out", "o", "--ratio", "0.3", "--reconstruct", "--correction", "refit"], "--reconstruct cannot be "
     "combined that way; use --correction {none,bias,refit,refit-one-pass}"),
    (["eval", "--limit", "-3"], "argument --limit: must be positive, got -3"),
    (["eval", "--tasks", "amp5,nope"], "unknown task 'nope'"),
    (["eval", "--ppl-windows", "x"], "argument --ppl-windows: not an int: x"),
    (["compare", "--out", "c", "--ratios", "0.1,x"], "argument --ratios: not a number: x"),
    (["compare", "--out", "c", "--scorers", "amp,nope"], "unknown scorer 'nope'; choose from: amp, reversed"),
    (["compare", "--out", "c", "--ppl", "wiki", "c4"], "compare measures perplexity on one text (--ppl), got 2"),
    (["bench", "--model", "m", "--out", "b.json", "--batch-sizes", "1,0"], "argument --batch-sizes: must be "
     "positive, got 0"),
    (["bench", "--model", "m", "--out", "b.json", "--protocol", "fast"], "argument --protocol: invalid choice: 'fast' "
     "(choose from 'quick', 'paper')"),
    (["recover", "--model", "m", "--out", "r", "--lr", "-1"], "argument --lr: must be positive, got -1"),
    (["recover", "--model", "m", "--out", "r", "--dropout", "1.5"], "argument --dropout: must be in [0, 1), got 1.5"),
    (["export", "--gguf", "x.gguf", "--threads", "0"], "argument --threads: must be positive, got 0"),
    (["inspect"], "give the pruned checkpoint: amprune inspect FOLDER"),
    (["--log-level", "foo", "list"], "argument --log-level: invalid choice: 'FOO' (choose from 'DEBUG', 'INFO', "
     "'WARNING', 'ERROR')"),
    (["list", "--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
]


@pytest.mark.parametrize("argv, message", INVALID, ids=[" ".join(argv) for argv, _ in INVALID])
def test_every_invalid_value_is_one_line_exit_2_before_any_model(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target in ("amprune.models.loading.load_model", "amprune.models.loading.resolve_model"):
        monkeypatch.setattr(target, _must_not_load)
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amprune: error: ") and message in lines[0], err
    assert "Traceback" not in err and out == ""


def test_global_options_go_anywhere_on_the_line(capsys):
    assert main(["list", "--quiet"]) == 0 and main(["--quiet", "list"]) == 0
    assert main(["list", "--log-level", "debug"]) == 0
    out = capsys.readouterr().out
    for section in ("families", "scorers", "recipes", "evaluation tasks", "packaged models", "packaged texts"):
        assert section in out
