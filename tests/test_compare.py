"""`amprune compare` on a tiny model with an injected evaluation: outputs, progress and failure isolation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny, tensors

from amprune.cli import main
from amprune.compare import CompareRequest, _duration, run_compare
from amprune.errors import AmpruneError
from amprune.pipeline import PruneRequest, prune


def fake_evaluate(fail_on_calls: tuple[int, ...] = ()):
    """Perplexity = parameter count / 1000, one task whose accuracy is 1 / heads; fails on the calls named."""
    calls = []

    def evaluate(model, tokenizer) -> dict:
        heads = model.config.num_attention_heads
        calls.append((heads, model.config.intermediate_size))
        if len(calls) in fail_on_calls:
            raise RuntimeError("out of memory (injected)")
        return {"perplexity": sum(p.numel() for p in model.parameters()) / 1000, "accuracy": {"toy": 1 / heads}}

    evaluate.calls = calls
    return evaluate


def _request(tmp_path, calib_text, **overrides) -> CompareRequest:
    fields = dict(out=str(tmp_path / "cmp"), model=save_tiny(tmp_path / "tiny", "llama_mha"), scorers=["amp", "random"],
                  ratios=[0.2, 0.5], calib=calib_text, samples=4, seq_len=32, batch_size=2, tasks=None, progress=False)
    fields.update(overrides)
    return CompareRequest(**fields)


def test_compare_writes_json_table_and_plots(tmp_path, calib_text):
    evaluate = fake_evaluate()
    results = run_compare(_request(tmp_path, calib_text), evaluate)
    out = tmp_path / "cmp"
    saved = json.loads((out / "compare.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    assert [(r["scorer"], r["ratio"]) for r in saved["runs"]] == [("amp", 0.2), ("random", 0.2), ("amp", 0.5),
                                                                 ("random", 0.5)]
    # The dense model first, then every run on its own copy: the dense model is never pruned in place.
    assert evaluate.calls[0] == (4, 48) and len(evaluate.calls) == 5
    dense_params = saved["dense"]["params"]
    assert saved["dense"]["perplexity"] == pytest.approx(dense_params / 1000)
    for run in saved["runs"]:
        assert run["perplexity"] == pytest.approx(run["params"] / 1000)  # the evaluated model had the plan's size
        assert run["params"] < dense_params
    # Same ratio, same budget, whatever the scorer.
    assert saved["runs"][0]["params"] == saved["runs"][1]["params"]
    table = (out / "compare.md").read_text().splitlines()
    assert table[0] == "| scorer | ratio | removed | params | perplexity | toy | average |"
    assert table[2].startswith("| dense | 0 | 0.0 % |") and len(table) == 2 + 5
    for name in ("perplexity.png", "accuracy.png", "amp_scores.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_run_keeps_the_others(tmp_path, calib_text):
    # Calls: dense, amp 0.2, random 0.2, amp 0.5, random 0.5; the fourth and the fifth fail.
    results = run_compare(_request(tmp_path, calib_text), fake_evaluate(fail_on_calls=(4, 5)))
    failed = [(r["scorer"], r["ratio"]) for r in results["runs"] if "error" in r]
    assert failed == [("amp", 0.5), ("random", 0.5)]
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r.get("error") for r in saved["runs"]] == [None, None, "RuntimeError: out of memory (injected)",
                                                       "RuntimeError: out of memory (injected)"]
    assert all("perplexity" in r for r in saved["runs"] if "error" not in r)
    assert "failed: RuntimeError: out of memory (injected)" in (tmp_path / "cmp" / "compare.md").read_text()


def test_reversed_is_worse_than_amp_on_the_fake_metric_shape(tmp_path, calib_text):
    """amp and reversed share one calibration pass and drop the same number of units."""
    results = run_compare(_request(tmp_path, calib_text, scorers=["amp", "reversed"], ratios=[0.3]), fake_evaluate())
    amp, rev = results["runs"]
    assert amp["params"] == rev["params"] and amp["achieved_fraction"] == rev["achieved_fraction"]


def test_bad_requests_fail_before_loading(tmp_path, calib_text):
    with pytest.raises(AmpruneError, match=r"^unknown scorer 'nope'"):
        run_compare(_request(tmp_path, calib_text, scorers=["amp", "nope"]), fake_evaluate())
    with pytest.raises(AmpruneError, match=r"^the obs scorer ranks units by the re-fit's own error, on the pruned "
                       r"model's stream: it runs only with --correction refit-one-pass$"):
        run_compare(_request(tmp_path, calib_text, scorers=["amp", "obs"]), fake_evaluate())
    with pytest.raises(AmpruneError, match=r"^--ratio must be in \[0, 1\), got 1.5$"):
        run_compare(_request(tmp_path, calib_text, ratios=[0.2, 1.5]), fake_evaluate())
    assert not (tmp_path / "cmp").exists()


def test_cli_compare_reports_bad_scorer(tmp_path, capsys):
    folder = save_tiny(tmp_path / "tiny", "llama_gqa")
    capsys.readouterr()
    code = main(["compare", "--model", folder, "--scorers", "amp,nope", "--out", str(tmp_path / "cmp")])
    assert code == 2
    assert capsys.readouterr().err == (
        "amprune: error: unknown scorer 'nope'; choose from: amp, reversed, random, magnitude, wanda_sp, flap, taylor\n"
    )


def test_the_dense_model_and_each_run_are_separate_models(tmp_path, calib_text):
    seen = []

    def evaluate(model, tokenizer):
        seen.append(next(model.parameters()).data_ptr())
        return {"perplexity": float(torch.tensor(1.0))}

    run_compare(_request(tmp_path, calib_text, scorers=["magnitude"], ratios=[0.2]), evaluate)
    assert len(set(seen)) == 2


def test_refit_refits_every_run(tmp_path, calib_text):
    """With --correction refit, the evaluated models have the same shapes but re-fitted output projections."""
    weights = {}

    def evaluate(model, tokenizer):
        weights.setdefault(len(weights), model.model.layers[0].self_attn.o_proj.weight.detach().clone())
        return {"perplexity": 1.0}

    for correction in ("none", "refit"):
        weights.clear()
        run_compare(_request(tmp_path, calib_text, scorers=["amp"], ratios=[0.3], correction=correction,
                             out=str(tmp_path / correction)), evaluate)
        if correction == "none":
            plain = weights[1]
    refit = weights[1]
    assert refit.shape == plain.shape and refit.shape[1] < weights[0].shape[1]
    assert not torch.allclose(refit, plain)
    saved = json.loads((tmp_path / "refit" / "compare.json").read_text())
    assert saved["settings"]["correction"] == "refit"
    assert not (tmp_path / "refit" / "runs").exists()  # every run's checkpoint deleted once evaluated


def test_runs_equal_prune_of_the_same_scorer_and_ratio(tmp_path, calib_text):
    """One pass for every run gives each the checkpoint `amprune prune` writes for its scorer and ratio."""
    request = _request(tmp_path, calib_text, scorers=["amp", "wanda_sp"], ratios=[0.2, 0.5], keep_checkpoints=True,
                       correction="refit")
    run_compare(request, fake_evaluate())
    for scorer in ("amp", "wanda_sp"):
        for ratio in (0.2, 0.5):
            alone = prune(PruneRequest(recipe="paper",
                                       out=str(tmp_path / f"{scorer}{ratio}"), model=request.model, ratio=ratio,
                                       scorer=scorer, correction="refit", calib=calib_text, samples=4, seq_len=32,
                                       batch_size=2, progress=False))
            got, want = tensors(tmp_path / "cmp" / "runs" / f"{scorer}@{ratio:g}"), tensors(alone.out)
            assert sorted(got) == sorted(want)
            for name in got:
                assert (got[name] - want[name]).abs().max() <= 1e-5, name


def test_progress_reports_runs_and_time_left(tmp_path, calib_text, caplog):
    caplog.set_level("INFO", logger="amprune.compare")
    run_compare(_request(tmp_path, calib_text), fake_evaluate())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run ")]
    assert lines[0] == "run 1/4: amp at ratio 0.2 (time left unknown yet)"
    assert [line.split(" (")[0] for line in lines[1:]] == ["run 2/4: random at ratio 0.2", "run 3/4: amp at ratio 0.5",
                                                          "run 4/4: random at ratio 0.5"]
    assert all(line.endswith(" left)") and "about " in line for line in lines[1:])
    assert [_duration(s) for s in (45, 300, 4000)] == ["45 s", "5 min", "1 h 07 min"]
