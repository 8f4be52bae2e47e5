"""`amprune eval`, `compare`, `bench`, `recover` and `export`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    MODEL_HELP,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    Deprecated,
    ListAction,
    _fraction,
    _not_negative,
    calibration_group,
    defaults_in_help,
    evaluation_group,
    request,
    runtime_group,
)

EVAL_EXAMPLES = """examples:
  amprune eval --model pruned/ --tasks amp5 --limit 200 --out results.json
  amprune eval --model pruned/ --ppl wiki c4 --ppl-seq-len 128
  amprune eval --tasks all7 --ppl wiki                 # the packaged dense SmolLM2-135M-Instruct
"""


def add_eval(sub) -> None:
    from ..evaluation.run import EvalRequest

    p = sub.add_parser("eval", help="zero-shot accuracy (lm-eval on the packaged data) and perplexity of any model",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", help="results JSON file; the Markdown table is written next to it (.md)")
    evaluation_group(p, "evaluation (default: amp5 unless only --ppl is given)")
    p.add_argument("--batch-size", dest="eval_batch_size", type=POSITIVE_INT, action=Deprecated,
                   new="--eval-batch-size")
    runtime_group(p)
    defaults_in_help(p, EvalRequest)
    p.set_defaults(handler=run_eval)


def run_eval(args) -> None:
    from ..evaluation.run import EvalRequest, evaluate

    args.progress = not args.quiet
    record, table = evaluate(request(EvalRequest, args))
    print(table)
    print(f"time: {record['settings']['seconds']:.1f} s")
    if args.out:
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


COMPARE_EXAMPLES = """examples:
  amprune compare --ratios 0.1,0.3 --scorers amp,random --tasks amp5 --limit 50 --out cmp/
  amprune compare --model my-llama/ --scorers amp wanda_sp flap magnitude taylor random --out cmp/
"""


def add_compare(sub) -> None:
    from ..compare import CompareRequest
    from ..engine import CORRECTIONS
    from ..plan import GQA_MODES
    from ..stats import usable_scorers

    p = sub.add_parser("compare", help="prune with several scorers at several ratios and evaluate every result "
                       "side by side", epilog=COMPARE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for compare.json, compare.md and the plots")
    p.add_argument("--scorers", action=ListAction, help=f"from: {', '.join(usable_scorers())} (taylor needs a "
                   "backward pass and gradient memory)")
    p.add_argument("--ratios", action=ListAction, item=_fraction, help="fractions of all parameters")
    p.add_argument("--gqa-mode", choices=GQA_MODES, help="as for `prune`")
    p.add_argument("--correction", choices=[c for c in CORRECTIONS if c != "bias"],
                   help="every run's correction, as for `prune`")
    p.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep every run's checkpoint under OUT/runs/ (otherwise deleted once evaluated)")
    p.add_argument("--reconstruct", dest="correction", action=Deprecated, nargs=0, const="refit",
                   new="--correction refit")
    calibration_group(p)
    evaluation_group(p)
    p.add_argument("--ppl-source", dest="ppl", action=Deprecated, new="--ppl")
    runtime_group(p)
    defaults_in_help(p, CompareRequest)
    p.set_defaults(handler=run_compare)


def run_compare(args) -> None:
    from ..compare import CompareRequest, run_compare

    args.progress = not args.quiet
    results = run_compare(request(CompareRequest, args))
    failed = sum("error" in run for run in results["runs"])
    print((Path(args.out) / "compare.md").read_text())
    print(f"{len(results['runs']) - failed} of {len(results['runs'])} runs finished; results in {args.out}")


BENCH_EXAMPLES = """examples:
  amprune bench --model pruned/ --out bench.json     # against the packaged SmolLM2-135M; chart: bench.png
  amprune bench --model p20/ p30/ --baseline my-llama/ --out bench.json
  amprune bench --model pruned/ --protocol paper --out bench.json   # the AMP paper's full protocol
"""


def add_bench(sub) -> None:
    from ..benchmark import BenchRequest

    p = sub.add_parser("bench", help="measure the speed and memory of models against a baseline, side by side",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="models", action=ListAction, required=True,
                   help="model(s) to measure: HF folders, .gguf files or hub ids")
    p.add_argument("--baseline", help="reference model (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--png", help="bar chart: speedup per workload (default: --out with .png, with matplotlib)")
    proto = p.add_argument_group("protocol (defaults: --protocol's)")
    proto.add_argument("--protocol", choices=("quick", "paper"), help="quick: stop once the speedups are steady "
                       "(default); paper: the AMP paper's latency protocol in full")
    proto.add_argument("--gen-prompt", type=POSITIVE_INT, help="prompt tokens of the generation")
    proto.add_argument("--new-tokens", type=_not_negative, help="tokens generated, EOS suppressed; 0: no generation")
    proto.add_argument("--prefill-len", type=POSITIVE_INT, help="prompt length of the prefill")
    proto.add_argument("--batch-sizes", action=ListAction, item=POSITIVE_INT, help="prefill batch sizes")
    proto.add_argument("--warmup", type=_not_negative, help="untimed rounds per workload")
    proto.add_argument("--runs", type=POSITIVE_INT, help="timed rounds per workload (at most, with quick)")
    proto.add_argument("--min-runs", type=POSITIVE_INT, help="timed rounds before quick may stop")
    proto.add_argument("--tolerance", type=float, help="quick stops once every speedup's median is known to ± this "
                       "fraction; 0: never early")
    proto.add_argument("--no-memory", dest="memory", action="store_false", default=None,
                       help="skip the peak-memory pass (one process per model)")
    p.add_argument("--prompt-tokens", dest="gen_prompt", type=POSITIVE_INT, action=Deprecated, new="--gen-prompt")
    p.add_argument("--prompt-len", dest="prefill_len", type=POSITIVE_INT, action=Deprecated, new="--prefill-len")
    runtime_group(p, threads=True)
    defaults_in_help(p, BenchRequest)
    p.set_defaults(handler=run_bench)


def run_bench(args) -> None:
    from ..benchmark import BenchRequest, bench
    from ..report import summary

    args.progress = not args.quiet
    result = bench(request(BenchRequest, args))
    print(summary(result))
    print(f"saved: {args.out}" + (f" and {result['png']}" if result.get("png") else ""))


RECOVER_EXAMPLES = """examples:
  amprune recover --model pruned/ --out recovered/                 # the paper's LoRA: rank 8, 2 epochs
  amprune recover --model pruned/ --out recovered/ --max-steps 100  # bounded, for a CPU
  amprune recover --model pruned/ --out recovered/ --distill        # learn the dense model's predictions
"""


def add_recover(sub) -> None:
    from ..recovery import RecoverRequest

    p = sub.add_parser("recover", help="LoRA-fine-tune a pruned checkpoint and save it merged, as a standard "
                       "checkpoint", epilog=RECOVER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by `amprune prune` (or any supported model)")
    p.add_argument("--out", required=True, help="output folder for the recovered checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out")
    lora = p.add_argument_group("LoRA (defaults: the paper's)")
    lora.add_argument("--rank", type=POSITIVE_INT, help="LoRA rank")
    lora.add_argument("--alpha", type=POSITIVE_FLOAT, help="LoRA alpha")
    lora.add_argument("--dropout", type=_fraction, help="LoRA dropout")
    lora.add_argument("--lr", type=POSITIVE_FLOAT, help="AdamW learning rate, decaying linearly")
    lora.add_argument("--epochs", type=POSITIVE_INT, help="passes over the text")
    data = p.add_argument_group("training text and cost bounds")
    data.add_argument("--calib", help="packaged text(s), their calibration halves: mix (equal shares, the "
                      "default) | c4 | wiki | c4,wiki")
    data.add_argument("--seq-len", type=POSITIVE_INT, help="tokens per window")
    data.add_argument("--batch-size", type=POSITIVE_INT, help="windows per step")
    data.add_argument("--max-steps", type=POSITIVE_INT, help="stop after this many steps")
    data.add_argument("--max-tokens", type=POSITIVE_INT, help="stop before training on more than this many tokens")
    data.add_argument("--seed", type=int, help="seed for LoRA init and shuffling")
    data.add_argument("--text", dest="calib", action=Deprecated, new="--calib")
    loss = p.add_argument_group("distillation (beyond the paper)")
    loss.add_argument("--distill", action="store_true", default=None,
                      help="train on KL(teacher ‖ model) of the next-token distributions instead of the text's tokens")
    loss.add_argument("--teacher", help="model to distil from (default: the model the plan was pruned from)")
    run = runtime_group(p)
    run.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                     help="skip reloading the saved checkpoint to compare logits")
    defaults_in_help(p, RecoverRequest)
    p.set_defaults(handler=run_recover)


def run_recover(args) -> None:
    from ..recovery import RecoverRequest, recover

    args.progress = not args.quiet
    result = recover(request(RecoverRequest, args))
    losses = result.losses
    steps = " · ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    kind = "distillation loss" if args.distill else "loss"
    print(f"LoRA recovery: {len(losses)} steps, {kind} {losses[0]:.3f} → {losses[-1]:.3f}")
    print(f"time: {steps}\npeak memory: {result.peak_memory_bytes / 2**30:.2f} GiB")
    print(f"saved: {result.out}  (adapters merged; loads with AutoModelForCausalLM.from_pretrained)")


EXPORT_EXAMPLES = """examples:
  amprune export --model pruned/ --gguf pruned-f16.gguf                  # 16-bit, llama.cpp's converter
  amprune export --model pruned/ --gguf pruned-q4.gguf --quant Q4_K_M   # + llama-quantize
  amprune export --model pruned/ --gguf pruned-q4.gguf --quant Q4_K_M --imatrix mix   # guided by calibration text
"""


def add_export(sub) -> None:
    from ..export import IMATRIX_TYPES, QUANT_TYPES, ExportRequest

    p = sub.add_parser("export", help="convert a (pruned) checkpoint to a GGUF file for llama.cpp, optionally "
                       "quantized", epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (e.g. written by `amprune prune`) or .gguf file; default: the "
                   "packaged SmolLM2-135M-Instruct")
    p.add_argument("--gguf", required=True, help="the GGUF file to write")
    p.add_argument("--quant", help=f"{' | '.join(QUANT_TYPES)} (F32, F16, BF16 and Q8_0 come from the converter, "
                   f"the others from llama-quantize; {', '.join(IMATRIX_TYPES)} need --imatrix)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --gguf file")
    guide = p.add_argument_group("importance matrix (llama-quantize types)")
    guide.add_argument("--imatrix", help="a .gguf/.dat file from llama-imatrix, or calibration text to compute one "
                       "on with llama-imatrix: mix | c4 | wiki | c4,wiki (their calibration halves) | a .txt/.jsonl")
    guide.add_argument("--imatrix-samples", type=POSITIVE_INT, help="windows of 512 tokens to compute it on")
    guide.add_argument("--seed", type=int, help="seed for drawing those windows")
    run = p.add_argument_group("runtime")
    run.add_argument("--threads", type=POSITIVE_INT, help="llama-imatrix and llama-quantize threads (default: all "
                     "cores)")
    defaults_in_help(p, ExportRequest)
    p.set_defaults(handler=run_export)


def run_export(args) -> None:
    from ..export import ExportRequest, export, gguf_summary

    result = export(request(ExportRequest, args))
    meta = gguf_summary(result.path)
    head_dim = meta["key_length"] or meta["embedding_length"] // meta["head_count"]
    print(f"saved: {result.path}  ({result.quant}, {result.bytes / 2**20:.1f} MiB, {result.seconds:.1f} s)")
    if result.imatrix:
        print(f"importance matrix: {result.imatrix}")
    print(f"llama.cpp sees: {meta['architecture']}, {meta['block_count']} layers, {meta['head_count']} heads "
          f"({meta['head_count_kv']} KV) of {head_dim}, feed-forward {meta['feed_forward_length']}, "
          f"{meta['vocab_tokens']} tokens ({meta['tokenizer']})")
