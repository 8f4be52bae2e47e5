"""`amprune eval` and `amprune prune --eval` end to end on tiny saved models; results files; bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from amprune.cli import main
from amprune.evaluation import perplexity
from amprune.evaluation.results import comparison_table
from amprune.models.loading import load_tokenizer

TEXT = "A small text for perplexity, long enough for a few windows of sixteen characters each. " * 2


def run(argv, capsys):
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def test_eval_writes_json_and_markdown(tmp_path, text_file, capsys):
    folder = save_tiny(tmp_path / "model", "llama_gqa")
    out = tmp_path / "results.json"
    args = ["--tasks", "arc_easy,winogrande", "--limit", "2", "--ppl", text_file, "--ppl-seq-len", "16",
            "--ppl-windows", "3", "--out", str(out)]
    code, stdout, err = run(["eval", "--model", folder, *args], capsys)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["model"] == folder and record["versions"]["lm_eval"] == "0.4.13"
    assert {"amprune", "torch", "transformers", "lm_eval"} <= set(record["versions"])
    tasks = record["zero_shot"]["tasks"]
    assert list(tasks) == ["arc_easy", "winogrande"] and record["zero_shot"]["limit"] == 2
    assert [(t["n"], t["size"]) for t in tasks.values()] == [(2, 2376), (2, 1267)]
    (ppl,) = record["perplexity"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    direct = perplexity(model, load_tokenizer(folder), text_file, 16, max_windows=3, progress=False)
    assert (ppl["windows"], ppl["tokens"], ppl["seq_len"]) == (direct["windows"], direct["tokens"], 16) == (3, 45, 16)
    assert ppl["ppl"] == pytest.approx(direct["ppl"], rel=1e-5)
    note = "--limit 2: first 2 documents of each task"
    assert note in stdout and note in out.with_suffix(".md").read_text()


def test_prune_eval_prints_dense_vs_pruned(tmp_path, text_file, calib_text, capsys):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    out = tmp_path / "pruned"
    code, stdout, err = run(["prune", "--recipe", "paper",
                             "--model", folder, "--ratio", "0.3", "--calib", calib_text, "--samples", "4",
                             "--seq-len", "32", "--out", str(out), "--eval", "piqa,wiki", "--eval-limit", "3"], capsys)
    assert code == 0, err
    both = json.loads((out / "amprune_eval.json").read_text())
    assert both["dense"]["model"] == folder and both["pruned"]["model"] == str(out)
    for record in both.values():
        assert record["zero_shot"]["tasks"]["piqa"]["n"] == 3 and record["zero_shot"]["limit"] == 3
        # windows of 2048 tokens, or the model's maximum context when that is shorter (256 here)
        assert (record["perplexity"][0]["windows"], record["perplexity"][0]["seq_len"]) == (3, 256)
    table = comparison_table(both["dense"], both["pruned"])
    assert table in stdout
    dense, pruned = both["dense"]["perplexity"][0]["ppl"], both["pruned"]["perplexity"][0]["ppl"]
    assert f"{dense:.3f} | {pruned:.3f} | {pruned - dense:+.3f}" in table


def test_prune_limits_need_tasks_or_texts(tmp_path, calib_text, capsys, caplog):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    for extra in (["--limit", "3"], ["--eval-limit", "3"]):  # the latter: the deprecated name of both limits
        code, _, err = run(["prune", "--recipe", "paper", "--model", folder, "--ratio", "0.3", "--out",
                            str(tmp_path / "p"), *extra], capsys)
        assert code == 2 and err.endswith("amprune: error: --limit and --ppl-windows go with --tasks or --ppl\n")
    assert "--eval-limit is deprecated: use --limit and --ppl-windows" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "arc_easy,squad"], "unknown task 'squad'; available: arc_challenge, arc_easy, winogrande, piqa, "
         "hellaswag, boolq, openbookqa; aliases: amp5 = arc_challenge+arc_easy+winogrande+piqa+hellaswag; "
         "all7 = arc_challenge+arc_easy+winogrande+piqa+hellaswag+boolq+openbookqa"),
        (["--limit", "0"], "argument --limit: must be positive, got 0"),
        (["--ppl", "missing.txt"], "perplexity text not found: missing.txt (use c4 or wiki, or a .txt file)"),
        (["--eval-batch-size", "0"], "argument --eval-batch-size: must be positive, got 0"),
        (["--ppl", "wiki", "--ppl-seq-len", "1"], "--ppl-seq-len must be at least 2 tokens, got 1"),
    ],
)
def test_eval_bad_request_fails_before_loading(args, message, capsys):
    code, _, err = run(["eval", "--model", "does-not-exist/", *args], capsys)
    assert code == 2 and err == f"amprune: error: {message}\n"


def test_eval_model_without_tokenizer(tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    tiny_model("llama_gqa").save_pretrained(folder)
    code, _, err = run(["eval", "--model", str(folder), "--tasks", "piqa", "--limit", "1"], capsys)
    assert code == 2 and err.startswith(f"amprune: error: cannot load a tokenizer from {folder}: ")
    assert err.count("\n") == 1
