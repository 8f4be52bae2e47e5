"""`amprune prune`, `inspect` and `list`."""

from __future__ import annotations

import argparse
import logging

from .. import distributed
from ..errors import AmpruneError
from .options import (
    MODEL_HELP,
    POSITIVE_INT,
    Deprecated,
    _fraction,
    _not_negative,
    calibration_group,
    defaults_in_help,
    evaluation_group,
    request,
    runtime_group,
)

logger = logging.getLogger("amprune")

PRUNE_EXAMPLES = """examples:
  amprune prune --ratio 0.3 --out pruned/                       # the packaged SmolLM2-135M, the default recipe
  amprune prune --ratio 0.3 --recipe paper --out pruned/        # AMP exactly as published
  amprune prune --model my-llama/ --ratio 0.2 --gqa-mode group --out pruned/
  torchrun --nproc-per-node 2 -m amprune prune --model my-llama/ --ratio 0.3 --out pruned/   # 2 ranks
"""


def add_prune(sub) -> None:
    from ..engine import CORRECTIONS
    from ..pipeline import PruneRequest
    from ..plan import GQA_MODES
    from ..recipes import ALLOCATIONS, RECIPES
    from ..scoring import SCORERS
    from ..streams import PLACES

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
    how.add_argument("--search-samples", type=POSITIVE_INT, help="calibration samples each search candidate is "
                     "pruned on (more: a truer ranking, a slower search)")
    how.add_argument("--max-dropped", type=_not_negative, help="the search drops at most this many whole decoder "
                     "layers (0: none)")
    how.add_argument("--toward-dense", type=float, metavar="ALPHA", help="re-fit each MLP this fraction (0–1) "
                     "of the way towards the dense model's hidden states instead of its own dense output on the "
                     "pruned stream (0, the default); 0.25 measured best on SmolLM2; not for Gemma")
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
    from ..engine import CORRECTIONS

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
    from ..evaluation.run import EvalRequest, split_eval_spec

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
    from ..evaluation.check import check_summary, quick_check
    from ..evaluation.run import evaluate_side_by_side
    from ..models.loading import DTYPES, default_model, resolve_device, resolve_model
    from ..pipeline import PruneRequest, prune
    from ..report import run_summary

    args.correction = _correction(args)
    evaluation = _prune_evaluation(args)
    args.progress = not args.quiet
    args.keep_model = evaluation is not None
    result = prune(request(PruneRequest, args))
    if distributed.rank() != 0:
        return
    print(run_summary(result.plan, result.seconds))
    print(f"saved: {result.out}  (loads with AutoModelForCausalLM.from_pretrained)")
    dense_source = resolve_model(args.model)
    if evaluation is not None:
        name = args.model or default_model()
        print(evaluate_side_by_side(dense_source, name, result.model, result.tokenizer, evaluation, str(result.out),
                                    str(result.out / "amprune_eval.json")))
    if args.check and not args.quiet:
        device, dtype = resolve_device(args.device), DTYPES[result.plan.settings["compute_dtype"]]
        check = quick_check(dense_source, result.model or result.out, result.tokenizer, device, dtype)
        print(check_summary(check) if check else "quality check skipped: the dense and the pruned model do not "
              "both fit in memory (use `amprune eval`)")


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print the summary of a pruned checkpoint's plan")
    p.add_argument("folder", nargs="?", help="a folder written by `amprune prune` (or its amprune_plan.json)")
    p.add_argument("--model", help="the same, as the other subcommands name it")
    p.set_defaults(handler=run_inspect)


def run_inspect(args) -> None:
    from ..plan import Plan
    from ..report import plan_summary

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
    from ..evaluation import ALIASES, TASKS
    from ..models import FAMILIES
    from ..models.loading import PACKAGED_GGUFS
    from ..recipes import RECIPES
    from ..scoring import SCORERS
    from ..textsets import PACKAGED_TEXTS

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
