"""The `amprune` command line: argparse wiring around the library.

Every subcommand has one request dataclass that holds its defaults and its checks (`PruneRequest`,
`EvalRequest`, …). The parser is built from argument groups the subcommands share (model and output,
calibration, evaluation, runtime, logging); an option left out is None, so the request's own default
applies, and the request is filled from the parsed options by field name. Options a release renamed are
hidden aliases that still work, with a deprecation warning.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from . import distributed
from .errors import AmpruneError

logger = logging.getLogger("amprune")

MODEL_HELP = "HF folder, .gguf file, hub id, or gemma3-270m (the packaged Gemma-3-270M); default: the packaged " \
             "SmolLM2-135M-Instruct"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DTYPES = ("float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """One line for every bad option (naming the flag and what it accepts), exit 2: no usage dump."""

    def error(self, message: str):
        self.exit(2, f"amprune: error: {' '.join(message.split())}\n")


def _split(values) -> list[str]:
    """`a,b c` → [a, b, c]: every list option takes commas, spaces or both."""
    values = [values] if isinstance(values, str) else values
    return [item for value in values for item in value.split(",") if item]


class ListAction(argparse.Action):
    def __init__(self, option_strings, dest, item=str, **kwargs):
        self.item = item
        super().__init__(option_strings, dest, nargs="+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, [self.item(v) for v in _split(values)])
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument {option_string}: {err}")
        except (TypeError, ValueError):
            parser.error(f"argument {option_string}: not a list of {self.item.__name__} values: {' '.join(values)}")


class Deprecated(argparse.Action):
    """A former option name: stores into the new option, with a warning (hidden from --help)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        notices = getattr(namespace, "deprecated", None) or []
        namespace.deprecated = [*notices, f"{option_string} is deprecated: use {self.new}"]
        setattr(namespace, self.dest, values if self.nargs != 0 else self.const)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n' if kind is int else ''} {kind.__name__}: {text}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


_fraction.__name__ = "fraction in [0, 1)"
POSITIVE_INT, POSITIVE_FLOAT = _positive(int), _positive(float)


def defaults_in_help(parser, cls) -> None:
    """Append "(default: X)" to every option that fills a field of `cls` with a default, from the dataclass
    itself, so help and behaviour cannot drift apart."""
    from dataclasses import MISSING

    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING and f.default is not None}
    defaults.update({f.name: f.default_factory() for f in fields(cls) if f.default_factory is not MISSING})
    for action in parser._actions:
        if action.dest in defaults and action.help not in (None, argparse.SUPPRESS) and "default:" not in action.help:
            value = defaults[action.dest]
            if isinstance(value, bool):
                continue
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            action.help += f" (default: {shown})"


def request(cls, args):
    """A request of dataclass `cls` from the parsed options, by field name; an option left out (None) takes
    the dataclass default."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)


# ----------------------------------------------------------------------------------------------------------
# Shared argument groups


def logging_group(parser, suppress: bool) -> None:
    """--quiet and --log-level: on the top level and on every subcommand (so they go anywhere)."""
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("logging")
    group.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                       help="no progress bars, warnings only")
    group.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default,
                       help="default: INFO")


def runtime_group(parser, threads: bool = False):
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    group.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own (prune), float32 on CPU and "
                       "bfloat16 on CUDA (the others)")
    if threads:
        group.add_argument("--threads", type=POSITIVE_INT, help="torch CPU threads (default: torch's choice)")
    return group


def calibration_group(parser, recipe: bool = False):
    """Where calibration (or training) samples come from; with `recipe`, the defaults are the recipe's."""
    group = parser.add_argument_group("calibration")
    recipe_note = " (default: the recipe's)" if recipe else ""
    group.add_argument("--calib", help="mix (equal shares of each) | c4 | wiki | c4,wiki (pooled): the packaged "
                       f"texts' calibration halves; or a .txt / .jsonl file{recipe_note}")
    group.add_argument("--samples", type=POSITIVE_INT, help=f"calibration samples{recipe_note}")
    group.add_argument("--seq-len", type=POSITIVE_INT, help="tokens per sample")
    group.add_argument("--seed", type=int, help="seed for drawing the samples")
    group.add_argument("--batch-size", type=POSITIVE_INT, help="samples per forward pass")
    return group


def evaluation_group(parser, title: str = "evaluation"):
    from .evaluation import ALIASES, TASKS

    group = parser.add_argument_group(title)
    group.add_argument("--tasks", action=ListAction, help=f"zero-shot tasks: {', '.join(TASKS)}, or the aliases "
                       f"{', '.join(ALIASES)}")
    group.add_argument("--limit", type=POSITIVE_INT, help="first N documents of each task (default: all); stated "
                       "in every output")
    group.add_argument("--eval-batch-size", type=POSITIVE_INT, help="lm-eval batch size")
    group.add_argument("--ppl", action=ListAction, help="perplexity texts: wiki, c4 (the packaged texts' halves "
                       "calibration never uses) or .txt files")
    group.add_argument("--ppl-seq-len", type=POSITIVE_INT, help="tokens per perplexity window: 128 as "
                       "LLM-Pruner/FLAP, 2048 as SliceGPT/AMP (default: 2048, or the model's maximum context)")
    group.add_argument("--ppl-windows", type=POSITIVE_INT, help="at most N perplexity windows (default: all)")
    return group


# ----------------------------------------------------------------------------------------------------------
# Subcommands: each `add_*` declares its options, each `run_*` builds its request and calls the library.

PRUNE_EXAMPLES = """examples:
  amprune prune --ratio 0.3 --out pruned/                       # the packaged SmolLM2-135M, the default recipe
  amprune prune --ratio 0.3 --recipe paper --out pruned/        # AMP exactly as published
  amprune prune --model my-llama/ --ratio 0.2 --gqa-mode group --out pruned/
  torchrun --nproc-per-node 2 -m amprune prune --model my-llama/ --ratio 0.3 --out pruned/   # 2 ranks
"""


def add_prune(sub) -> None:
    from .engine import CORRECTIONS
    from .pipeline import PruneRequest
    from .plan import GQA_MODES
    from .recipes import ALLOCATIONS, RECIPES
    from .scoring import SCORERS
    from .streams import PLACES

    p = sub.add_parser("prune", help="prune a model and save a standard checkpoint", epilog=PRUNE_EXAMPLES,
                       description="Prune a model layer by layer and save a plain Hugging Face checkpoint. "
                       "--recipe default is the best recipe measured; --recipe paper is AMP exactly as published.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out")
    size = p.add_argument_group("how much to prune")
    size.add_argument("--ratio", type=_fraction, help="fraction of all parameters to remove, in [0, 1) (AMP's c)")
    size.add_argument("--head-ratio", type=_fraction, help="fraction of attention heads per layer (instead of --ratio)")
    size.add_argument("--mlp-ratio", type=_fraction, help="fraction of MLP neurons per layer (instead of --ratio)")
    size.add_argument("--gqa-mode", choices=GQA_MODES, help="query: the same number of query heads from every KV "
                      "group; group: whole KV groups (a smaller KV cache)")
    how = p.add_argument_group("how (defaults: the recipe's)")
    how.add_argument("--recipe", choices=RECIPES, help="default: the best recipe measured; paper: AMP as published "
                     "(uniform p, AMP scores on the dense model, no re-fit)")
    how.add_argument("--scorer", choices=SCORERS, help="how units are ranked: amp, a baseline (see `amprune "
                     "compare`) or, with --correction refit-one-pass, obs (what the re-fit makes up for best)")
    how.add_argument("--correction", choices=CORRECTIONS, help="how removed units are made up for: none; bias "
                     "(FLAP's mean compensation, LLaMA only); refit (least-squares re-fit of o_proj/down_proj on the "
                     "pruned stream); refit-one-pass (the same, units chosen on the pruned stream too)")
    how.add_argument("--allocation", choices=ALLOCATIONS, help="with --ratio: search (the heads/neurons/layers split "
                     "with the lowest held-out loss) or uniform (the paper's single fraction)")
    how.add_argument("--heldout", type=_not_negative, help="held-out calibration samples the search ranks on")
    how.add_argument("--round-to", type=POSITIVE_INT, help="keep a multiple of N neurons per layer (1: AMP's exact "
                     "rule; 8: full matmul speed)")
    for flag in ("--reconstruct", "--one-pass", "--bias-compensation"):
        how.add_argument(flag, action="store_true", default=False, help=argparse.SUPPRESS)
    calibration_group(p, recipe=True)
    run = runtime_group(p)
    run.add_argument("--hidden-states", choices=PLACES, help="where calibration hidden states live between layers: "
                     "ram, disk (a file in the output's temporary folder) or auto (disk only if RAM is short)")
    run.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                     help="skip reloading the saved checkpoint with stock transformers to compare logits")
    run.add_argument("--no-check", dest="check", action="store_false", default=True,
                     help="skip the quality check at the end (dense vs pruned perplexity and generation)")
    evaluation_group(p, "evaluation after pruning: the dense and the pruned model side by side")
    p.add_argument("--eval", dest="eval_spec", action=Deprecated, new="--tasks and --ppl")
    p.add_argument("--eval-limit", dest="eval_limit", type=POSITIVE_INT, action=Deprecated, new="--limit and "
                   "--ppl-windows")
    defaults_in_help(p, PruneRequest)
    p.set_defaults(handler=run_prune)


def _correction(args) -> str | None:
    """--correction, or what the deprecated booleans meant (with a warning)."""
    from .engine import CORRECTIONS

    old = [flag for flag in ("--reconstruct", "--one-pass", "--bias-compensation")
           if getattr(args, flag[2:].replace("-", "_"))]
    if not old:
        return args.correction
    meaning = {("--reconstruct",): "refit", ("--reconstruct", "--one-pass"): "refit-one-pass",
               ("--bias-compensation",): "bias"}.get(tuple(old))
    if meaning is None or args.correction is not None:
        raise AmpruneError(f"{' '.join(old)} cannot be combined that way; use --correction {{{','.join(CORRECTIONS)}}}")
    logger.warning("%s is deprecated: use --correction %s", " ".join(old), meaning)
    return meaning


def _prune_evaluation(args):
    """The evaluation asked after pruning (--tasks/--ppl, or the deprecated --eval/--eval-limit), or None."""
    from .evaluation.run import EvalRequest, split_eval_spec

    if args.eval_spec is not None:
        args.tasks, args.ppl = split_eval_spec(args.eval_spec)
    if args.eval_limit is not None:
        args.limit, args.ppl_windows = args.eval_limit, args.eval_limit
    if not args.tasks and not args.ppl:
        if args.limit or args.ppl_windows:
            raise AmpruneError("--limit and --ppl-windows go with --tasks or --ppl")
        return None
    return request(EvalRequest, args).check()


def run_prune(args) -> None:
    from .evaluation.check import check_summary, quick_check
    from .evaluation.run import evaluate_side_by_side
    from .models.loading import DTYPES, default_model, resolve_device, resolve_model
    from .pipeline import PruneRequest, prune
    from .report import run_summary

    args.correction = _correction(args)
    evaluation = _prune_evaluation(args)
    args.progress = not args.quiet
    args.keep_model = evaluation is not None
    result = prune(request(PruneRequest, args))
    if distributed.rank() != 0:
        return
    print(run_summary(result.plan, result.seconds, result.memory))
    print(f"saved: {result.out}  (loads with AutoModelForCausalLM.from_pretrained)")
    dense_source = resolve_model(args.model)
    if evaluation is not None:
        name = args.model or default_model()
        print(evaluate_side_by_side(dense_source, name, result.model, result.tokenizer, evaluation, str(result.out),
                                    str(result.out / "amprune_eval.json")))
    if args.check and not args.quiet:
        device, dtype = resolve_device(args.device), DTYPES[result.memory["compute_dtype"]]
        check = quick_check(dense_source, result.model or result.out, result.tokenizer, device, dtype)
        print(check_summary(check) if check else "quality check skipped: the dense and the pruned model do not "
              "both fit in memory (use `amprune eval`)")


EVAL_EXAMPLES = """examples:
  amprune eval --model pruned/ --tasks amp5 --limit 200 --out results.json
  amprune eval --model pruned/ --ppl wiki c4 --ppl-seq-len 128
  amprune eval --tasks all7 --ppl wiki                 # the packaged dense SmolLM2-135M-Instruct
"""


def add_eval(sub) -> None:
    from .evaluation.run import EvalRequest

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
    from .evaluation.run import EvalRequest, evaluate

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
    from .compare import CompareRequest
    from .engine import CORRECTIONS
    from .plan import GQA_MODES
    from .stats import usable_scorers

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
    from .compare import CompareRequest, run_compare

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
    from .benchmark import BenchRequest

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
    from .benchmark import BenchRequest, bench, summary

    args.progress = not args.quiet
    result = bench(request(BenchRequest, args))
    print(summary(result))
    print(f"saved: {args.out}" + (f" and {result['png']}" if result.get("png") else ""))


RECOVER_EXAMPLES = """examples:
  amprune recover --model pruned/ --out recovered/                 # the paper's LoRA: rank 8, 2 epochs on C4
  amprune recover --model pruned/ --out recovered/ --max-steps 100  # bounded, for a CPU
  amprune recover --model pruned/ --out recovered/ --distill        # learn the dense model's predictions
"""


def add_recover(sub) -> None:
    from .recovery import RecoverRequest

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
    data.add_argument("--calib", help="packaged text(s), their calibration halves: c4 | wiki | c4,wiki")
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
    from .recovery import RecoverRequest, recover

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
"""


def add_export(sub) -> None:
    from .export import QUANT_TYPES, ExportRequest

    p = sub.add_parser("export", help="convert a (pruned) checkpoint to a GGUF file for llama.cpp, optionally "
                       "quantized", epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (e.g. written by `amprune prune`) or .gguf file; default: the "
                   "packaged SmolLM2-135M-Instruct")
    p.add_argument("--gguf", required=True, help="the GGUF file to write")
    p.add_argument("--quant", help=f"{' | '.join(QUANT_TYPES)} (F32, F16, BF16 and Q8_0 come from the converter, "
                   "the others from llama-quantize)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --gguf file")
    run = p.add_argument_group("runtime")
    run.add_argument("--threads", type=POSITIVE_INT, help="llama-quantize threads (default: all cores)")
    defaults_in_help(p, ExportRequest)
    p.set_defaults(handler=run_export)


def run_export(args) -> None:
    from .export import ExportRequest, export, gguf_summary

    result = export(request(ExportRequest, args))
    meta = gguf_summary(result.path)
    head_dim = meta["key_length"] or meta["embedding_length"] // meta["head_count"]
    print(f"saved: {result.path}  ({result.quant}, {result.bytes / 2**20:.1f} MiB, {result.seconds:.1f} s)")
    print(f"llama.cpp sees: {meta['architecture']}, {meta['block_count']} layers, {meta['head_count']} heads "
          f"({meta['head_count_kv']} KV) of {head_dim}, feed-forward {meta['feed_forward_length']}, "
          f"{meta['vocab_tokens']} tokens ({meta['tokenizer']})")


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print the summary of a pruned checkpoint's plan")
    p.add_argument("folder", nargs="?", help="a folder written by `amprune prune` (or its amprune_plan.json)")
    p.add_argument("--model", help="the same, as the other subcommands name it")
    p.set_defaults(handler=run_inspect)


def run_inspect(args) -> None:
    from .plan import Plan
    from .report import plan_summary

    folder = args.model or args.folder
    if folder is None:
        raise AmpruneError("give the pruned checkpoint: amprune inspect FOLDER")
    plan = Plan.load(folder)
    print(plan_summary(plan))
    print("versions: " + ", ".join(f"{name} {version}" for name, version in plan.versions.items()))


def add_list(sub) -> None:
    p = sub.add_parser("list", help="list the families, scorers, recipes, evaluation tasks, packaged models and texts")
    p.set_defaults(handler=run_list)


def run_list(args) -> None:
    from .evaluation import ALIASES, TASKS
    from .models import FAMILIES
    from .models.loading import PACKAGED_GGUFS
    from .recipes import RECIPES
    from .scoring import SCORERS
    from .textsets import PACKAGED_TEXTS

    print("families (by config.model_type):")
    for family in FAMILIES:
        print(f"  {family.name:10s} {', '.join(family.model_types)}")
    print("scorers (--scorer):")
    for name, scorer in SCORERS.items():
        print(f"  {name:10s} {scorer.source}")
    print("recipes (--recipe):")
    for name, recipe in RECIPES.items():
        print(f"  {name:10s} scorer {recipe.scorer}, correction {recipe.correction}, allocation {recipe.allocation}, "
              f"calibration {recipe.samples} × {recipe.calib}, --round-to {recipe.round_to}")
    print(f"evaluation tasks (--tasks): {', '.join(TASKS)}; aliases: "
          + "; ".join(f"{name} = {', '.join(tasks)}" for name, tasks in ALIASES.items()))
    print("packaged models (--model): the default, SmolLM2-135M-Instruct (Q4_1 GGUF); "
          + ", ".join(f"{name}" for name in PACKAGED_GGUFS))
    print(f"packaged texts (--calib, --ppl): {', '.join(PACKAGED_TEXTS)}, and mix (equal shares of each)")


SUBCOMMANDS = (add_prune, add_eval, add_compare, add_bench, add_recover, add_export, add_inspect, add_list)


def build_parser() -> argparse.ArgumentParser:
    from .models import FAMILIES

    families = ", ".join(t for f in FAMILIES for t in f.model_types)
    parser = Parser(prog="amprune", description="Structured pruning of LLMs (attention heads, MLP neurons, whole "
                    f"layers) into standard checkpoints. Families: {families}.")
    logging_group(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in SUBCOMMANDS:
        add(sub)
    for subparser in sub.choices.values():  # global options anywhere on the line
        logging_group(subparser, suppress=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad option, already reported in one line (2)
        return int(stop.code or 0)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 alone reports
        args.quiet = True
    level = "WARNING" if args.quiet else args.log_level or "INFO"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for notice in getattr(args, "deprecated", None) or []:  # options read before logging was set up
        logger.warning(notice)
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
