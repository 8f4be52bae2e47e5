"""Dense baseline: the packaged SmolLM2-135M-Instruct on all seven zero-shot tasks and both perplexities.

    nohup nice -n 5 .venv/bin/python benchmarks/dense_baseline.py > /tmp/dense_baseline.log 2>&1 &

Runs one task (or one perplexity) at a time and rewrites benchmarks/results/dense_baseline.{json,md}
after each, so a partial run keeps what finished; HellaSwag, the most expensive, runs last. At the end
the table replaces the body of the evaluation section in docs/RESULTS.md. `--limit N` is for smoke tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from amprune.evaluation import perplexity, zero_shot
from amprune.evaluation.results import eval_record, markdown_table, write_results
from amprune.evaluation.zero_shot import task_averages
from amprune.models.loading import load_model, load_tokenizer, resolve_device_dtype, resolve_model

ROOT = Path(__file__).resolve().parent.parent
TASK_ORDER = ("arc_challenge", "arc_easy", "winogrande", "piqa", "openbookqa", "boolq", "hellaswag")
PPL_RUNS = (("wiki", 2048, 1), ("c4", 2048, 1), ("wiki", 128, 16), ("c4", 128, 16))  # source, seq_len, batch
MODEL_NAME = "packaged SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"
SECTION = "## Dense baseline: zero-shot and perplexity (issue: evaluation)"


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), {gpu}, torch threads {torch.get_num_threads()}"


def update_results_doc(body: str) -> None:
    """Replace the body of our section of docs/RESULTS.md (up to the next `## ` heading)."""
    doc = ROOT / "docs" / "RESULTS.md"
    text = doc.read_text(encoding="utf-8")
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    end = len(text) if end < 0 else end
    doc.write_text(text[:start] + "\n\n" + body.strip() + "\n" + text[end:], encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="first N documents per task and N perplexity windows (smoke test)")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dense_baseline.json"))
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/RESULTS.md")
    args = parser.parse_args()

    command = "python benchmarks/dense_baseline.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    source = resolve_model(None)
    device, dtype = resolve_device_dtype(None, None)
    model, tokenizer = load_model(source, device, dtype), load_tokenizer(source)
    settings = {"command": command.strip(), "machine": machine(), "dtype": str(dtype), "seconds": {}}
    per_task: dict[str, dict] = {}
    ppl: list[dict] = []
    zs = None

    def save() -> dict:
        record = eval_record(MODEL_NAME, zs, ppl, settings)
        write_results(record, args.out)
        return record

    for name in TASK_ORDER[:-1]:
        tick = time.perf_counter()
        result = zero_shot(model, tokenizer, [name], limit=args.limit, batch_size=args.batch_size)
        per_task.update(result["tasks"])
        zs = dict(result, tasks=per_task, averages=task_averages(per_task))
        settings["seconds"][name] = round(time.perf_counter() - tick, 1)
        save()
    for text, seq_len, batch in PPL_RUNS:
        tick = time.perf_counter()
        ppl.append(perplexity(model, tokenizer, text, seq_len, max_windows=args.limit, batch_size=batch))
        settings["seconds"][f"ppl {text} {seq_len}"] = round(time.perf_counter() - tick, 1)
        save()
    tick = time.perf_counter()
    result = zero_shot(model, tokenizer, [TASK_ORDER[-1]], limit=args.limit, batch_size=args.batch_size)
    per_task.update(result["tasks"])
    zs = dict(result, tasks=per_task, averages=task_averages(per_task))
    settings["seconds"][TASK_ORDER[-1]] = round(time.perf_counter() - tick, 1)
    settings["seconds"]["total"] = round(time.perf_counter() - started, 1)
    record = save()
    body = (
        f"Command: `{settings['command']}` · machine: {settings['machine']} · dtype {dtype} · "
        f"wall time {settings['seconds']['total'] / 60:.0f} min · JSON: `benchmarks/results/dense_baseline.json`\n\n"
        + markdown_table(record)
    )
    print(body)
    if not args.no_doc:
        update_results_doc(body)


if __name__ == "__main__":
    main()
