"""Cost of AMP's scoring pass against a plain forward pass over the same calibration tokens.

Three passes over identical batches of the packaged SmolLM2-135M-Instruct:
  plain     model(input_ids)            full forward with the LM head (what a user runs anyway)
  decoder   model.base_model(input_ids) the same without the LM head (the stricter reference)
  scoring   amprune's scoring pass      the layer engine's dense stream: every layer in turn, with the
                                        hooks that compute both AMP statistics (a budget that removes
                                        nothing, so the model stays whole for the next round)

Time: the passes run alternately (in reverse order every other round), `--repeats` rounds, in one
process; medians are compared. Both wall time and process CPU time are recorded: on a shared machine CPU
time is the steadier measure of the work a pass does.
Memory: each pass runs once more in a fresh subprocess. After loading, the process's peak-RSS mark is
reset (Linux `/proc/self/clear_refs`), so the reported peak is that of the pass alone (weights included);
the peak above the RSS at the reset is the pass's own working memory.

Usage: python benchmarks/scoring_cost.py [--samples 48 --seq-len 512 --batch-size 8 --repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
from host import machine

from amprune.calibration import batches, calibration_set
from amprune.engine import LayerEngine, Run, Settings
from amprune.models import Dims, get_family
from amprune.models.loading import load_model, load_tokenizer, resolve_model
from amprune.plan import make_budget
from amprune.surgery import unit_params
from amprune.weights import InMemory

PASSES = ("plain", "decoder", "scoring")


def setup(args):
    source = resolve_model(None)
    tokenizer = load_tokenizer(source)
    model = load_model(source, torch.device("cpu"), torch.float32)
    calib = calibration_set("c4", tokenizer, args.samples, args.seq_len, seed=0)
    return model, calib


def run_pass(name: str, model, calib, batch_size: int) -> None:
    if name == "scoring":
        family = get_family(model.config.model_type)
        dims = Dims.from_config(model.config)
        units = unit_params(family, family.decoder_layers(model)[0], dims)
        nothing = make_budget(dims, units, 1, "query", head_ratio=0.0, mlp_ratio=0.0)
        settings = Settings(batch_size=batch_size, keep_layers=True, progress=False)
        LayerEngine(InMemory(model), calib, calib.samples[0][:16], [Run("amp", nothing)], settings).run()
        return
    forward = model if name == "plain" else model.base_model
    with torch.inference_mode():
        for ids, mask in batches(calib.samples, batch_size, pad_id=0):
            forward(input_ids=ids, attention_mask=mask, use_cache=False)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1])


def memory_child(args) -> None:
    """Runs in a subprocess: one pass; prints the RSS before it and the peak RSS during it (bytes) as JSON."""
    model, calib = setup(args)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    loaded = _status_kib("VmRSS") * 1024
    run_pass(args.child, model, calib, args.batch_size)
    print(json.dumps({"loaded": loaded, "peak": _status_kib("VmHWM") * 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--child", choices=PASSES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return memory_child(args)

    model, calib = setup(args)
    run_pass("decoder", model, calib, args.batch_size)  # warm-up
    seconds = {name: [] for name in PASSES}
    cpu_seconds = {name: [] for name in PASSES}
    for repeat in range(args.repeats):
        for name in PASSES if repeat % 2 == 0 else reversed(PASSES):  # no pass always first
            start, start_cpu = time.perf_counter(), time.process_time()
            run_pass(name, model, calib, args.batch_size)
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - start_cpu)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu_seconds.items()}

    memory = {}
    for name in PASSES:
        cmd = [sys.executable, __file__, "--child", name, "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--batch-size", str(args.batch_size)]
        printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(printed.splitlines()[-1])

    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{machine()}, {torch.get_num_threads()} torch threads",
        "model": "SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized to float32)",
        "calibration": f"c4 calibration half, {calib.num_tokens} tokens = {len(calib.samples)} × {args.seq_len}",
        "seconds": seconds,
        "median_seconds": median,
        "cpu_seconds": cpu_seconds,
        "median_cpu_seconds": median_cpu,
        "time_ratio_vs_plain": median["scoring"] / median["plain"],
        "time_ratio_vs_decoder": median["scoring"] / median["decoder"],
        "cpu_time_ratio_vs_plain": median_cpu["scoring"] / median_cpu["plain"],
        "cpu_time_ratio_vs_decoder": median_cpu["scoring"] / median_cpu["decoder"],
        "memory": memory,
        "peak_ratio_vs_plain": memory["scoring"]["peak"] / memory["plain"]["peak"],
        "peak_ratio_vs_decoder": memory["scoring"]["peak"] / memory["decoder"]["peak"],
        "activation_peak_ratio_vs_decoder": (memory["scoring"]["peak"] - memory["scoring"]["loaded"])
        / (memory["decoder"]["peak"] - memory["decoder"]["loaded"]),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
