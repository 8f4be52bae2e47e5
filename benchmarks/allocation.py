"""Does the allocation search pick the right allocation? Its proxy against full evaluations.

For one model and ratio, with the default recipe (or `--recipe`):
1. the search itself (`amprune.search.search`): every candidate allocation pruned on the recipe's slice
   of the calibration samples and ranked by its NLL on the held-out calibration samples (the proxy);
2. every candidate pruned in full — all the calibration samples, the recipe's scorer and correction, the
   same layers dropped — in one pass of the layer engine, each written to its own checkpoint;
3. every full candidate evaluated on held-out text of both domains: perplexity on `--windows` windows of
   `--seq-len` tokens of the evaluation halves of Wikipedia and C4 (never used for calibration); the
   "true" loss of a candidate is the mean log perplexity of the two.

Reported: the proxy's pick, the truly best candidate, how much worse the pick is (its regret), and the
Spearman correlation of the two rankings. `--search-samples 8,16` also runs the search with those slice
sizes (other proxies of the same candidates) and reports each the same way; `--truth JSON` takes steps 2–3
from an earlier run of the same model, ratio and recipe instead of redoing them (the candidates must be the
same). Results: `--json` (and `--report` prints the tables).

`--heldout N` ranks on N held-out windows instead of the recipe's (the same samples; more windows may move
the angular distances that pick the dropped layers, and then `--truth` refuses the other candidates).

Usage: python benchmarks/allocation.py --ratio 0.3 [--model smollm2|gemma3-270m] [--json ...]
       python benchmarks/allocation.py --ratio 0.3 --truth FIRST.json --search-samples 8,16 --json ...
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import machine  # noqa: E402
from reconstruction import load, perplexities  # noqa: E402

from amprune.calibration import calibration_set, read_calibration  # noqa: E402
from amprune.checkpoint import CheckpointWriter, output_config, saved_model_type  # noqa: E402
from amprune.engine import LayerEngine, Run, Settings  # noqa: E402
from amprune.models.loading import load_tokenizer  # noqa: E402
from amprune.pipeline import describe_model, open_weights  # noqa: E402
from amprune.recipes import resolve  # noqa: E402
from amprune.search import search  # noqa: E402

MODELS = {"smollm2": None, "gemma3-270m": "gemma3-270m"}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def full_evaluations(args, info, source, tokenizer, calib, recipe, settings, found) -> tuple[list[dict], float]:
    """Every candidate pruned with all the samples in one engine pass, then its held-out perplexities."""
    work = Path(tempfile.mkdtemp(prefix="amprune-allocation-"))
    try:
        runs = []
        for index, candidate in enumerate(found.candidates):
            budget, dims_after = candidate.budget, candidate.budget.dims_after(info.dims)
            config = output_config(info.config, info.family, dims_after, saved_model_type(info.family, info.config,
                                                                                            dims_after),
                                   budget.layers_dropped)
            writer = CheckpointWriter(work / f"c{index}", True, config, source.stored_dtype, info.family.layers + ".")
            runs.append(Run(recipe.scorer, budget, recipe.correction, writer))
        tick = time.perf_counter()
        LayerEngine(source, replace(calib, heldout=[]), calib.samples[0][:16], runs,
                    replace(settings, workspace=work, isolate_failures=True)).run()
        full_seconds = time.perf_counter() - tick
        rows = []
        for candidate, run in zip(found.candidates, runs, strict=True):
            folder = run.writer.finish(tokenizer, None, info.source)
            model, tok = load(str(folder))
            ppl = perplexities(model, tok, args.windows, args.seq_len)
            rows.append({"allocation": candidate.allocation.describe(info.dims),
                         "layers_dropped": list(candidate.budget.layers_dropped),
                         "achieved_fraction": candidate.budget.achieved_fraction, **ppl,
                         "true": (math.log(ppl["ppl_wiki"]) + math.log(ppl["ppl_c4"])) / 2})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, full_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--heldout", type=int, default=None, help="held-out windows the proxy ranks on (default: "
                        "the recipe's)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--search-samples", default="", help="comma-separated slice sizes of other proxies")
    parser.add_argument("--truth", default=None, help="reuse the full evaluations of this earlier --json")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"allocation_{args.model}_{args.ratio:g}.json")
    if args.report:
        print(report(json.loads(path.read_text())))
        return
    started = datetime.now(timezone.utc)
    recipe = resolve(args.recipe, heldout=args.heldout)
    info = describe_model(MODELS[args.model])
    tokenizer = load_tokenizer(info.source)
    calib = calibration_set(read_calibration(recipe.calib, recipe.samples, 512), tokenizer, recipe.samples, 512, 0,
                            heldout=recipe.heldout)
    device = torch.device("cpu")
    source = open_weights(info, device, None, whole=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    settings = Settings(pad_id=pad, save_dtype=source.stored_dtype)
    tick = time.perf_counter()
    found = search(source, info, calib, recipe, "query", args.ratio, settings)
    search_seconds = time.perf_counter() - tick
    proxies = {str(recipe.search_samples): {"loss": [c.loss for c in found.candidates], "chosen": found.chosen,
                                            "seconds": search_seconds}}
    for size in filter(None, args.search_samples.split(",")):
        tick = time.perf_counter()
        other = search(source, info, calib, replace(recipe, search_samples=int(size)), "query", args.ratio, settings)
        proxies[size] = {"loss": [c.loss for c in other.candidates], "chosen": other.chosen,
                         "seconds": time.perf_counter() - tick}
    if args.truth:
        earlier = json.loads(Path(args.truth).read_text())
        rows, full_seconds = earlier["candidates"], earlier["full_seconds"]
        described = [(c.allocation.describe(info.dims), list(c.budget.layers_dropped)) for c in found.candidates]
        if described != [(r["allocation"], r["layers_dropped"]) for r in rows]:
            raise SystemExit(f"{args.truth} evaluated other candidates than this search's")
    else:
        rows, full_seconds = full_evaluations(args, info, source, tokenizer, calib, recipe, settings, found)
    dense = earlier["dense"] if args.truth else perplexities(*load(info.source), args.windows, args.seq_len)
    result = {"command": "python benchmarks/allocation.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "started": started.strftime("%Y-%m-%d %H:%M UTC"),
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "model": args.model,
              "ratio": args.ratio, "recipe": args.recipe, "windows": args.windows, "seq_len": args.seq_len,
              "dense": dense, "search_seconds": search_seconds, "full_seconds": full_seconds,
              "chosen": found.chosen, "candidates": [{**row, "proxy": loss} for row, loss in zip(
                  rows, proxies[str(recipe.search_samples)]["loss"], strict=True)],
              "search_samples": recipe.search_samples, "heldout": recipe.heldout, "proxies": proxies}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))


def report(result: dict) -> str:
    rows = result["candidates"]
    proxy, true = [r["proxy"] for r in rows], [r["true"] for r in rows]
    pick, best = result["chosen"], min(range(len(rows)), key=lambda i: true[i])
    dense = result["dense"]
    lines = [f"{result['model']} at {result['ratio']:.0%}, recipe {result['recipe']}: {len(rows)} candidates; "
             f"search {result['search_seconds']:.0f} s, full prunes {result['full_seconds']:.0f} s",
             "", "| candidate | proxy: held-out NLL | wiki ppl (× dense) | C4 ppl (× dense) | true rank |",
             "|---|---|---|---|---|"]
    order = sorted(range(len(rows)), key=lambda i: true[i])
    for i in sorted(range(len(rows)), key=lambda i: proxy[i]):
        r = rows[i]
        mark = " **picked**" if i == pick else ""
        lines.append(f"| {r['allocation']}{mark} | {r['proxy']:.4f} | {r['ppl_wiki']:.2f} "
                     f"({r['ppl_wiki'] / dense['ppl_wiki']:.2f}×) | {r['ppl_c4']:.2f} "
                     f"({r['ppl_c4'] / dense['ppl_c4']:.2f}×) | {order.index(i) + 1} |")
    lines.append("")
    for size, variant in result["proxies"].items():
        chosen, losses = variant["chosen"], variant["loss"]
        regret = math.exp(true[chosen] - true[best])
        lines.append(f"- proxy on {size} search samples ({variant['seconds']:.0f} s): picked the truly best candidate: "
                     f"{'yes' if chosen == best else 'no'} (its rank {order.index(chosen) + 1} of {len(rows)}; "
                     f"geometric-mean perplexity {regret:.3f}× the best's); Spearman correlation of the rankings "
                     f"{spearman(losses, true):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
