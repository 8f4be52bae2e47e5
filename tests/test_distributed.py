"""Data-parallel calibration: two gloo ranks (torchrun, two CPU processes) write what one process writes;
ranks that disagree on the request stop before any work, each with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import assert_same_checkpoint, save_tiny

from amprune.pipeline import PruneRequest, prune

COMMON = ["--samples", "4", "--seq-len", "32", "--batch-size", "1", "--ratio", "0.3"]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("correction, scorer", [("refit", "amp"), ("refit-one-pass", "wanda_sp")])
def test_two_ranks_write_what_one_process_writes(correction, scorer, tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    flags = ["--model", folder, "--calib", calib_text, "--correction", correction, "--scorer", scorer, *COMMON]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", _free_port()]
    done = subprocess.run([*torchrun, "-m", "amprune", "--quiet", "prune", "--recipe", "paper",
                           *flags, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    one = prune(PruneRequest(recipe="paper",
                             out=str(tmp_path / "one"), model=folder, ratio=0.3, correction=correction, scorer=scorer,
                             calib=calib_text, samples=4, seq_len=32, batch_size=1, progress=False))
    assert_same_checkpoint(tmp_path / "two", one.out)
    assert json.loads((tmp_path / "two" / "amprune_plan.json").read_text())["settings"]["world_size"] == 2


def test_ranks_that_disagree_stop_before_any_work_with_one_line(tmp_path, calib_text):
    folder = save_tiny(tmp_path / "dense", "llama_gqa")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    ranks = []
    for rank, seed in ((0, "0"), (1, "1")):
        command = [sys.executable, "-m", "amprune", "prune", "--recipe", "paper",
                   "--model", folder, "--calib", calib_text, *COMMON,
                   "--seed", seed, "--out", str(tmp_path / "out")]
        ranks.append(subprocess.Popen(command, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in ranks:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines == ["amprune: error: ranks disagree on the request: rank 1 has seed=1 (rank 0: 0)"], stderr
    assert not (tmp_path / "out").exists()
