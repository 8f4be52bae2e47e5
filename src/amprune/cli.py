"""The `amprune` command line: thin argparse wiring around the library; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import distributed
from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from .engine import CORRECTIONS
from .errors import AmpruneError
from .models import FAMILIES
from .plan import GQA_MODES
from .recipes import ALLOCATIONS, RECIPES
from .scoring import SCORERS
from .stats import usable_scorers
from .streams import PLACES

logger = logging.getLogger("amprune")

MODEL_HELP = (
    "HF folder, .gguf file, hub id, or gemma3-270m (the packaged Gemma-3-270M); "
    "default: the packaged SmolLM2-135M-Instruct"
)
PRUNE_EXAMPLES = """examples:
  amprune prune --ratio 0.3 --out pruned/                       # packaged SmolLM2-135M, 30 % of parameters
  amprune prune --model my-llama/ --ratio 0.2 --gqa-mode group --out pruned/
  amprune prune --model model.gguf --head-ratio 0.25 --mlp-ratio 0.3 --calib prompts.jsonl --out pruned/
"""


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None


def _add_calibration(p, recipe: bool = False) -> None:
    calib = p.add_argument_group("calibration")
    default = "the recipe's" if recipe else "c4"
    calib.add_argument("--calib", default=None if recipe else "c4",
                       help="mix (equal shares of each) | c4 | wiki | c4,wiki (pooled) — the packaged texts' "
                       f"calibration halves — or a .txt / .jsonl file (default: {default})")
    calib.add_argument("--samples", type=int, default=None if recipe else DEFAULT_SAMPLES,
                       help=f"number of calibration samples (default: {'the recipe' if recipe else DEFAULT_SAMPLES})")
    calib.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                       help=f"tokens per sample (default: {DEFAULT_SEQ_LEN})")
    calib.add_argument("--seed", type=int, default=0, help="seed for drawing samples (default: 0)")
    calib.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default: 8)")


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model with AMP and save a standard checkpoint",
        epilog=PRUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--recipe", choices=RECIPES, default="default",
                   help="default: the best recipe measured; paper: AMP exactly as published (uniform p, AMP scores on "
                   "the dense model, no re-fit); any option below overrides its recipe's value (default: default)")
    p.add_argument(
        "--correction", choices=CORRECTIONS,
        help="how removed units are made up for: none (AMP as published); bias (FLAP's mean compensation in "
        "o_proj/down_proj biases, LLaMA only); refit (least-squares re-fit of o_proj/down_proj on the pruned "
        "stream); refit-one-pass (the same, with the units also chosen on the pruned stream) (default: the recipe's)",
    )
    _add_deprecated_corrections(p)
    budget = p.add_argument_group("how much to prune")
    budget.add_argument("--ratio", type=_fraction, help="fraction of all parameters to remove, in [0, 1) (AMP's c)")
    budget.add_argument("--head-ratio", type=_fraction,
                        help="fraction of attention heads per layer (instead of --ratio)")
    budget.add_argument("--mlp-ratio", type=_fraction, help="fraction of MLP neurons per layer (instead of --ratio)")
    budget.add_argument(
        "--gqa-mode", choices=GQA_MODES, default="query",
        help="query: drop the same number of query heads in every KV group (default); "
        "group: drop whole KV groups (smaller KV cache)",
    )
    budget.add_argument(
        "--round-to", type=int,
        help="keep a multiple of N neurons per layer (1: AMP's exact rule; 8 runs at full matmul speed) "
        "(default: the recipe's)",
    )
    budget.add_argument(
        "--allocation", choices=ALLOCATIONS,
        help="with --ratio: search (the heads/neurons/layers split with the lowest held-out loss) or uniform (the "
        "paper's single fraction) (default: the recipe's)",
    )
    budget.add_argument("--heldout", type=int, help="held-out calibration samples the search ranks on "
                        "(default: the recipe's)")
    budget.add_argument(
        "--scorer", choices=SCORERS,
        help="how units are ranked: amp, a baseline (see `amprune compare`) or, with --correction "
        "refit-one-pass, obs (the units the least-squares re-fit makes up for best) (default: the recipe's)",
    )
    _add_calibration(p, recipe=True)
    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: the checkpoint's own)")
    run.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    run.add_argument("--no-verify", action="store_true", help="skip reloading the saved checkpoint to compare logits")
    run.add_argument("--hidden-states", choices=PLACES, default="auto",
                     help="where the calibration hidden states live between layers: ram, disk (a file in the "
                     "output's temporary folder) or auto (disk only when RAM is short) (default: auto)")
    ev = p.add_argument_group("evaluation: dense vs pruned, side by side")
    ev.add_argument(
        "--eval", metavar="SPEC",
        help="after pruning, evaluate the dense and the pruned model: comma-separated zero-shot tasks or aliases "
        "(amp5, all7) and perplexity texts (wiki, c4; windows of 2048 tokens or the model's maximum), e.g. amp5,wiki",
    )
    ev.add_argument("--eval-limit", type=int, help="first N documents of each task and at most N perplexity windows")
    p.set_defaults(handler=_run_prune)


def _run_prune(args) -> None:
    from .pipeline import PruneRequest, prune
    from .report import run_summary

    if args.batch_size <= 0:
        raise AmpruneError(f"--batch-size must be positive, got {args.batch_size}")
    evaluation = _prune_eval_request(args)
    result = prune(
        PruneRequest(
            out=args.out, model=args.model, ratio=args.ratio, head_ratio=args.head_ratio, mlp_ratio=args.mlp_ratio,
            gqa_mode=args.gqa_mode, round_to=args.round_to, calib=args.calib, samples=args.samples,
            seq_len=args.seq_len, seed=args.seed,
            batch_size=args.batch_size, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
            verify=not args.no_verify, progress=not args.quiet, correction=_correction(args), scorer=args.scorer,
            hidden_states=args.hidden_states, keep_model=evaluation is not None, recipe=args.recipe,
            allocation=args.allocation, heldout=args.heldout,
        )
    )
    if distributed.rank() != 0:
        return
    print(run_summary(result.plan, result.seconds, result.memory))
    print(f"saved: {result.out}  (loads with AutoModelForCausalLM.from_pretrained)")
    if evaluation:
        _eval_dense_and_pruned(args, result, evaluation)


def _add_deprecated_corrections(p) -> None:
    """The three booleans `--correction` replaced, hidden, for one release."""
    for flag in ("--reconstruct", "--one-pass", "--bias-compensation"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)


def _correction(args) -> str:
    """--correction, or what the deprecated booleans meant (with a warning)."""
    old = [flag for flag, on in (("--reconstruct", args.reconstruct), ("--one-pass", args.one_pass),
                                 ("--bias-compensation", getattr(args, "bias_compensation", False))) if on]
    if not old:
        return args.correction
    meaning = {("--reconstruct",): "refit", ("--reconstruct", "--one-pass"): "refit-one-pass",
               ("--bias-compensation",): "bias"}.get(tuple(old))
    if meaning is None or args.correction not in (None, "none"):
        raise AmpruneError(f"{' '.join(old)} cannot be combined that way; use --correction "
                           f"{{{','.join(CORRECTIONS)}}}")
    logger.warning("%s is deprecated: use --correction %s", " ".join(old), meaning)
    return meaning


def _prune_eval_request(args):
    from .evaluation.run import EvalRequest, split_eval_spec

    if args.eval is None:
        if args.eval_limit is not None:
            raise AmpruneError("--eval-limit needs --eval")
        return None
    tasks, ppl = split_eval_spec(args.eval)
    return EvalRequest(
        tasks=tasks, ppl=ppl, limit=args.eval_limit, ppl_windows=args.eval_limit, limit_option="--eval-limit"
    ).check()


def _eval_dense_and_pruned(args, result, request) -> None:
    from .evaluation.results import comparison_table, write_results
    from .evaluation.run import evaluate
    from .models.loading import default_model, load_model, resolve_device_dtype, resolve_model

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    settings = {"dtype": str(dtype), "device": str(device)}
    name, progress = str(result.out or "pruned (in memory)"), not args.quiet
    pruned = evaluate(result.model, result.tokenizer, request, name, settings, progress)
    dense_model = load_model(resolve_model(args.model), device, dtype)
    dense = evaluate(dense_model, result.tokenizer, request, args.model or default_model(), settings, progress)
    table = comparison_table(dense, pruned)
    print(table)
    if result.out:
        json_path, md_path = write_results({"dense": dense, "pruned": pruned}, result.out / "amprune_eval.json", table)
        print(f"evaluation: {json_path} and {md_path}")


EVAL_EXAMPLES = """examples:
  amprune eval --model pruned/ --tasks amp5 --limit 200 --out results.json
  amprune eval --model pruned/ --ppl wiki,c4 --ppl-seq-len 128
  amprune eval --tasks all7 --ppl wiki                 # the packaged dense SmolLM2-135M-Instruct
"""


def _add_eval(sub) -> None:
    from .evaluation import ALIASES, TASKS

    p = sub.add_parser(
        "eval",
        help="zero-shot accuracy (lm-eval on the packaged data) and perplexity of any model",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--tasks",
        help=f"comma-separated: {', '.join(TASKS)}, or the aliases {', '.join(ALIASES)} "
        "(default: amp5 unless only --ppl is given)",
    )
    p.add_argument("--limit", type=int, help="first N documents of each task (default: all); stated in every output")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    p.add_argument(
        "--ppl", help="comma-separated perplexity texts: wiki, c4 (packaged, the half calibration never uses) or .txt"
    )
    p.add_argument(
        "--ppl-seq-len", type=int,
        help="tokens per window: 128 as LLM-Pruner/FLAP, or 2048 as SliceGPT/AMP (default: 2048, or the model's "
        "maximum context if that is shorter)",
    )
    p.add_argument("--ppl-windows", type=int, help="at most N perplexity windows (default: the whole text)")
    p.add_argument("--out", help="results JSON file; the Markdown table is written next to it (.md)")
    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", help="float32 (default on CPU) | bfloat16 (default on CUDA) | float16")
    run.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.set_defaults(handler=_run_eval)


def _run_eval(args) -> None:
    from .evaluation.results import markdown_table, write_results
    from .evaluation.run import EvalRequest, evaluate
    from .models.loading import default_model, load_model, load_tokenizer, resolve_device_dtype, resolve_model

    request = EvalRequest(
        tasks=args.tasks or ("" if args.ppl else "amp5"), ppl=args.ppl or "", limit=args.limit,
        batch_size=args.batch_size, ppl_seq_len=args.ppl_seq_len, ppl_windows=args.ppl_windows,
    ).check()
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    model = load_model(source, device, dtype)
    settings = {"dtype": str(dtype), "device": str(device)}
    record = evaluate(model, tokenizer, request, args.model or default_model(), settings, progress=not args.quiet)
    print(markdown_table(record))
    print(f"time: {record['settings']['seconds']:.1f} s")
    if args.out:
        json_path, md_path = write_results(record, args.out)
        print(f"wrote {json_path} and {md_path}")


COMPARE_EXAMPLES = """examples:
  amprune compare --ratios 0.1,0.3 --scorers amp,random --tasks amp5 --limit 50 --out cmp/
  amprune compare --model my-llama/ --scorers amp,wanda_sp,flap,magnitude,taylor,random --out cmp/
"""


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fractions(text: str) -> list[float]:
    return [_fraction(item) for item in _names(text)]


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="prune with several scorers at several ratios and evaluate every result side by side",
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for compare.json, compare.md and the plots")
    p.add_argument(
        "--scorers", type=_names, default=_names("amp,wanda_sp,flap,magnitude,random"),
        help=f"comma-separated, from: {', '.join(usable_scorers())} (default: amp,wanda_sp,flap,magnitude,random; "
        "taylor needs a backward pass and gradient memory)",
    )
    p.add_argument("--ratios", type=_fractions, default=[0.1, 0.2, 0.3, 0.5],
                   help="comma-separated fractions of all parameters (default: 0.1,0.2,0.3,0.5)")
    p.add_argument("--gqa-mode", choices=GQA_MODES, default="query", help="as for `prune` (default: query)")
    p.add_argument("--correction", choices=[c for c in CORRECTIONS if c != "bias"], default="none",
                   help="every run's correction, as for `prune` (default: none)")
    _add_deprecated_corrections(p)
    _add_calibration(p)
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--tasks", default="amp5", help="zero-shot tasks or aliases (amp5, all7) or 'none' (default: amp5)")
    ev.add_argument("--limit", type=int, help="first N documents of every task (default: all)")
    ev.add_argument("--ppl-source", default="wiki", help="wiki | c4 | a .txt file for perplexity (default: wiki)")
    ev.add_argument("--ppl-seq-len", type=int, default=512, help="tokens per perplexity window (default: 512)")
    ev.add_argument("--ppl-windows", type=int, help="at most this many perplexity windows (default: all)")
    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", help="float32 (default on CPU) | bfloat16 (default on CUDA) | float16")
    run.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.set_defaults(handler=_run_compare)


def _run_compare(args) -> None:
    from .compare import CompareRequest, run_compare

    if args.batch_size <= 0:
        raise AmpruneError(f"--batch-size must be positive, got {args.batch_size}")
    request = CompareRequest(
        out=args.out, model=args.model, scorers=args.scorers, ratios=args.ratios, gqa_mode=args.gqa_mode,
        calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
        tasks=None if args.tasks == "none" else args.tasks, limit=args.limit, ppl=args.ppl_source,
        ppl_seq_len=args.ppl_seq_len, ppl_windows=args.ppl_windows, correction=_correction(args), dtype=args.dtype,
        device=args.device, progress=not args.quiet,
    )
    results = run_compare(request)
    failed = sum("error" in run for run in results["runs"])
    print((Path(args.out) / "compare.md").read_text())
    print(f"{len(results['runs']) - failed} of {len(results['runs'])} runs finished; results in {args.out}")


BENCH_EXAMPLES = """examples:
  amprune bench --model pruned/ --out bench.json     # against the packaged SmolLM2-135M; chart: bench.png
  amprune bench --model p20/ p30/ --baseline my-llama/ --out bench.json
  amprune bench --model pruned/ --warmup 2 --runs 5 --batch-sizes 1 8 --out bench.json   # a quick look
"""


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure the speed and memory of models against a baseline, side by side",
        epilog=BENCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", nargs="+", required=True, help="model(s) to measure: HF folder, .gguf file or hub id")
    p.add_argument("--baseline", help="reference model (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--png", help="bar chart: speedup per workload, baseline vs models, the ideal marked "
                   "(default: the --out path with .png, when matplotlib is installed)")
    proto = p.add_argument_group("protocol (defaults: the AMP paper's latency protocol)")
    proto.add_argument("--prompt-tokens", type=int, default=12, help="prompt of the generation (default: 12)")
    proto.add_argument("--new-tokens", type=int, default=128,
                       help="tokens generated, EOS suppressed; 0: no generation (default: 128)")
    proto.add_argument("--prompt-len", type=int, default=128, help="prompt length of the prefill (default: 128)")
    proto.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32],
                       help="prefill batch sizes (default: 1 8 32)")
    proto.add_argument("--warmup", type=int, default=10, help="untimed rounds per workload (default: 10)")
    proto.add_argument("--runs", type=int, default=20, help="timed rounds per workload (default: 20)")
    proto.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass (one process per model)")
    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", help="float32 (default on CPU) | bfloat16 (default on CUDA) | float16")
    run.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(handler=_run_bench)


def _run_bench(args) -> None:
    from .benchmark import BenchRequest, bench, has_matplotlib, summary

    png = args.png
    if png is None:
        png = str(Path(args.out).with_suffix(".png"))
        if not has_matplotlib():
            png = None
            logger.warning("no bar chart: matplotlib is not installed (pip install 'amprune[plot]')")
    result = bench(
        BenchRequest(
            models=args.model, out=args.out, png=png, baseline=args.baseline, prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens, prompt_len=args.prompt_len, batch_sizes=args.batch_sizes, warmup=args.warmup,
            runs=args.runs, memory=not args.no_memory, dtype=args.dtype, device=args.device, threads=args.threads,
            progress=not args.quiet,
        )
    )
    print(summary(result))
    print(f"saved: {args.out}" + (f" and {args.png}" if args.png else ""))


RECOVER_EXAMPLES = """examples:
  amprune recover --model pruned/ --out recovered/                 # the paper's LoRA: rank 8, 2 epochs on C4
  amprune recover --model pruned/ --out recovered/ --max-steps 100  # bounded, for a CPU
  amprune recover --model pruned/ --out recovered/ --distill        # learn the dense model's predictions
"""


def _add_recover(sub) -> None:
    p = sub.add_parser(
        "recover",
        help="LoRA-fine-tune a pruned checkpoint and save it merged, as a standard checkpoint",
        epilog=RECOVER_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a folder written by `amprune prune` (or any supported model)")
    p.add_argument("--out", required=True, help="output folder for the recovered checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    lora = p.add_argument_group("LoRA (defaults: the paper's)")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    lora.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: 16)")
    lora.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    lora.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate, decaying linearly (default: 3e-4)")
    lora.add_argument("--epochs", type=int, default=2, help="passes over the text (default: 2)")
    lora.add_argument("--batch-size", type=int, default=1, help="windows per step (default: 1)")
    data = p.add_argument_group("training text and cost bounds")
    data.add_argument("--text", default="c4",
                      help="packaged text(s), their calibration halves: c4 | wiki | c4,wiki (default: c4)")
    data.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    data.add_argument("--max-steps", type=int, help="stop after this many steps")
    data.add_argument("--max-tokens", type=int, help="stop before training on more than this many tokens")
    data.add_argument("--seed", type=int, default=0, help="seed for LoRA init and shuffling (default: 0)")
    loss = p.add_argument_group("distillation (beyond the paper)")
    loss.add_argument("--distill", action="store_true",
                      help="train on KL(teacher ‖ model) of the next-token distributions instead of the text's tokens")
    loss.add_argument("--teacher", help="model to distil from (default: the model the plan was pruned from)")
    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", help="float32 (default on CPU) | bfloat16 (default on CUDA) | float16")
    run.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    run.add_argument("--no-verify", action="store_true", help="skip reloading the saved checkpoint to compare logits")
    p.set_defaults(handler=_run_recover)


def _run_recover(args) -> None:
    from .recovery import RecoverRequest, recover

    result = recover(
        RecoverRequest(
            model=args.model, out=args.out, text=args.text, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
            lr=args.lr, seq_len=args.seq_len, epochs=args.epochs, batch_size=args.batch_size,
            max_steps=args.max_steps, max_tokens=args.max_tokens, distill=args.distill, teacher=args.teacher,
            seed=args.seed, dtype=args.dtype,
            device=args.device, overwrite=args.overwrite, verify=not args.no_verify, progress=not args.quiet,
        )
    )
    losses = result.losses
    steps = " · ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    kind = "distillation loss" if args.distill else "loss"
    print(f"LoRA recovery: {len(losses)} steps, {kind} {losses[0]:.3f} → {losses[-1]:.3f}")
    print(f"time: {steps}\npeak memory: {result.peak_memory_bytes / 2**30:.2f} GiB")
    print(f"saved: {result.out}  (adapters merged; loads with AutoModelForCausalLM.from_pretrained)")


EXPORT_EXAMPLES = """examples:
  amprune export --model pruned/ --gguf pruned-f16.gguf                  # 16-bit, llama.cpp's converter
  amprune export --model pruned/ --gguf pruned-q4.gguf --quant Q4_K_M   # + llama-quantize
  llama-cli -m pruned-q4.gguf                                           # run it in any llama.cpp build
needs llama.cpp's converter and tools: `make llamacpp` builds them into .llamacpp/ (or set AMPRUNE_LLAMACPP)
"""


def _add_export(sub) -> None:
    from .export import QUANT_TYPES

    p = sub.add_parser(
        "export",
        help="convert a (pruned) checkpoint to a GGUF file for llama.cpp, optionally quantized",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="a model folder (e.g. written by `amprune prune`) or .gguf file; "
                   "default: the packaged SmolLM2-135M-Instruct")
    p.add_argument("--gguf", required=True, help="the GGUF file to write")
    p.add_argument("--quant", default="F16",
                   help=f"{' | '.join(QUANT_TYPES)} (default: F16; F32, F16, BF16 and Q8_0 come from the converter, "
                   "the others from llama-quantize)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    run = p.add_argument_group("runtime")
    run.add_argument("--threads", type=int, help="llama-quantize threads (default: all cores)")
    p.set_defaults(handler=_run_export)


def _run_export(args) -> None:
    from .export import ExportRequest, export, gguf_summary

    result = export(ExportRequest(gguf=args.gguf, model=args.model, quant=args.quant, overwrite=args.overwrite,
                                  threads=args.threads))
    meta = gguf_summary(result.path)
    head_dim = meta["key_length"] or meta["embedding_length"] // meta["head_count"]
    print(f"saved: {result.path}  ({result.quant}, {result.bytes / 2**20:.1f} MiB, {result.seconds:.1f} s)")
    print(f"llama.cpp sees: {meta['architecture']}, {meta['block_count']} layers, {meta['head_count']} heads "
          f"({meta['head_count_kv']} KV) of {head_dim}, feed-forward {meta['feed_forward_length']}, "
          f"{meta['vocab_tokens']} tokens ({meta['tokenizer']})")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print the summary of a pruned checkpoint's plan")
    p.add_argument("folder", help="a folder written by `amprune prune` (or its amprune_plan.json)")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args) -> None:
    from .plan import Plan
    from .report import plan_summary

    print(plan_summary(Plan.load(args.folder)))


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list the supported model families")
    p.set_defaults(handler=_run_list)


def _run_list(args) -> None:
    for family in FAMILIES:
        print(f"{family.name:10s} model_type: {', '.join(family.model_types)}")


def build_parser() -> argparse.ArgumentParser:
    families = ", ".join(t for f in FAMILIES for t in f.model_types)
    parser = argparse.ArgumentParser(
        prog="amprune",
        description=f"AMP structured pruning of LLMs (attention heads + MLP neurons). Families: {families}.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING (default: INFO)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_compare(sub)
    _add_bench(sub)
    _add_recover(sub)
    _add_export(sub)
    _add_inspect(sub)
    _add_list(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 alone reports
        args.quiet = True
    logging.basicConfig(
        level="WARNING" if args.quiet else args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        args.handler(args)
    except AmpruneError as err:
        print(f"amprune: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
