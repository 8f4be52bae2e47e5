"""Human-readable summaries: of a plan (`prune`, `inspect`) and of a benchmark (`bench`: table and chart)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import AmpruneError
from .plan import Plan
from .streams import human_bytes


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns; the first row is the header, underlined."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_summary(plan: Plan) -> str:
    """Parameters before → after with target and achieved fractions, the per-layer unit counts, the recipe
    and, after an allocation search, its choice and the runner-up."""
    b, before, after = plan.budget, plan.dims, plan.dims_after
    target = f"target {b.target_fraction:.1%}" if b.target_fraction is not None else "per-layer ratios"
    dropped = f"  (dropped: {', '.join(map(str, b.layers_dropped))})" if b.layers_dropped else (
        "  (same sizes in every layer)")
    rows = [
        ("", "before", "after"),
        ("parameters", f"{b.params_before:,}", f"{b.params_after:,}  (−{b.achieved_fraction:.2%}; {target})"),
        ("attention heads / layer", f"{before.num_heads}", f"{after.num_heads}"),
        ("KV heads / layer", f"{before.num_kv_heads}", f"{after.num_kv_heads}  (--gqa-mode {b.gqa_mode})"),
        ("MLP neurons / layer", f"{before.intermediate_size}", f"{after.intermediate_size}"),
        ("decoder layers", f"{before.num_layers}", f"{after.num_layers}{dropped}"),
    ]
    settings = plan.settings
    lines = [table(rows)]
    if after.intermediate_size % 8 and after.intermediate_size != before.intermediate_size:
        lines.append(
            f"note: {after.intermediate_size} neurons per layer is not a multiple of 8, a matmul width that runs "
            "far slower (on a GPU the pruned model's prefill can be slower than the dense one's; README: "
            "--round-to); --round-to 8 keeps a multiple of 8"
        )
    search = settings.get("allocation")
    if isinstance(search, dict):
        ranked = sorted((c for c in search["candidates"] if c["loss"] is not None), key=lambda c: c["loss"])
        chosen = search["candidates"][search["chosen"]]
        pruned = sum(c.get("stage") != "skipped" for c in search["candidates"])  # plans before stages: all
        lines.append(f"allocation: {chosen['allocation']} (held-out NLL {chosen['loss']:.3f}), best of "
                     f"{len(search['candidates'])} candidates"
                     + (f" ({pruned} pruned: a grid of head counts, then around its best)"
                        if pruned < len(search["candidates"]) else ""))
        if len(ranked) > 1:
            lines.append(f"runner-up:  {ranked[1]['allocation']} (held-out NLL {ranked[1]['loss']:.3f})")
    if settings.get("recipe"):
        lines.append(f"recipe {settings['recipe']}: scorer {settings.get('method')}, correction "
                     f"{settings.get('correction')}, allocation {'search' if isinstance(search, dict) else search}, "
                     f"--round-to {settings.get('round_to')}"
                     + (f", --toward-dense {toward:g}" if (toward := (settings.get("reconstruction") or {})
                                                            .get("toward_dense")) else ""))
    if settings:
        lines.append(
            f"model {settings.get('model')} ({settings.get('model_type')}"
            + (f", saved as {settings['saved_as']}" if settings.get("saved_as") else "")
            + f"); calibration {settings.get('calibration')}: {settings.get('samples')} samples × "
            f"≤{settings.get('seq_len')} tokens ({settings.get('calibration_tokens')} tokens)"
            + (f" + {settings['heldout_samples']} held out" if settings.get("heldout_samples") else "")
            + f", seed {settings.get('seed')}"
        )
    if settings.get("memory"):
        lines.append(memory_summary(settings))
    return "\n".join(lines)


def memory_summary(settings: dict) -> str:
    """Peak memory beside the model's size and the hidden states', where they lived, and the world size
    (from a plan's settings)."""
    memory, peak = settings["memory"], settings["memory"]["peak"]
    line = f"peak memory: {_gib(peak['rss'])} RSS" + (f", {_gib(peak['cuda'])} CUDA" if "cuda" in peak else "")
    line += (f" · model {human_bytes(memory['model_bytes'])} · hidden states {human_bytes(memory['hidden_bytes'])} "
             f"({memory['hidden_place']})")
    if settings.get("world_size", 1) > 1:
        line += f" · {settings['world_size']} ranks"
    compute, stored = settings.get("compute_dtype"), settings.get("dtype")
    if compute and stored and compute != stored:
        line += f"\nnote: layers computed in {compute} (no fast {stored} kernels on this CPU)"
    return line


def run_summary(plan: Plan, seconds: dict[str, float]) -> str:
    """The plan summary (memory included) plus wall time per step."""
    steps = " · ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
    return f"{plan_summary(plan)}\ntime: {steps}"


def speedup_text(speedup: dict[str, float]) -> str:
    """A paired speedup as "median× [p25–p75]"."""
    return f"{speedup['median']:.3f}× [{speedup['p25']:.3f}–{speedup['p75']:.3f}]"


def _mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f} MiB"


def summary(result: dict) -> str:
    """One table per measured model: every workload against the baseline, then sizes and memory."""
    base = result["models"][0]
    header = ("workload", "baseline", "model", "speedup [p25–p75]", "fastest runs", "ideal (FLOPs)",
              "of ideal")
    blocks = []
    for index, model in enumerate(result["models"][1:], start=1):
        rows: list[tuple[str, ...]] = []
        for work in result["workloads"]:
            b, m = work["results"][0], work["results"][index]
            rows.append((
                work["name"], f"{b['tokens_per_s']:,.1f} tok/s", f"{m['tokens_per_s']:,.1f} tok/s",
                speedup_text(m["speedup"]), f"{m['speedup_of_fastest']:.3f}×",
                f"{m['ideal_speedup']:.3f}×", f"{m['fraction_of_ideal']:.0%}",
            ))
            if work["new_tokens"]:
                latency = [f"{r['seconds']['median']:.3f} s" for r in (b, m)]
                rows.append(("  latency (median)", *latency))
                rows.append(("  decode (cached steps)", f"{b['decode']['tokens_per_s']:,.1f} tok/s",
                             f"{m['decode']['tokens_per_s']:,.1f} tok/s", speedup_text(m["decode"]["speedup"])))
        bc, mc = base["cost"], model["cost"]
        rows += [
            ("parameters", f"{bc['params']:,}", f"{mc['params']:,}", f"{mc['params'] / bc['params']:.1%}"),
            ("weight bytes", _mib(bc["weight_bytes"]), _mib(mc["weight_bytes"])),
            ("KV cache / token", f"{bc['kv_bytes_per_token']:,} B", f"{mc['kv_bytes_per_token']:,} B"),
            ("peak memory", _mib(base["peak_memory_bytes"]), _mib(model["peak_memory_bytes"])),
        ]
        rows = [header] + [row + ("",) * (len(header) - len(row)) for row in rows]
        blocks.append(f"{model['source']} vs baseline {base['source']}\n{table(rows)}")
    env = result["environment"]
    blocks.append(f"{env['device']}, {env['dtype']}, {env['torch_threads']} thread(s); {_rounds_text(result)}; "
                  f"{env['date']}")
    return "\n\n".join(blocks)


def _rounds_text(result: dict) -> str:
    """The protocol's rounds; with early stopping, how many each workload ran and how sure its median is."""
    proto, works = result["protocol"], result["workloads"]
    if "rounds" not in works[0]:  # written before protocols: fixed rounds
        return f"{proto['warmup']} warm-up + {proto['runs']} timed rounds per workload, models alternating"
    if not (proto["tolerance"] > 0 and proto["min_runs"] < proto["runs"]):
        plan = f"{proto['runs']} timed rounds"
        return f"{proto['protocol']} protocol: {proto['warmup']} warm-up + {plan} per workload, models alternating"
    ran = ", ".join(
        f"{w['name']} {w['rounds']['timed']}"
        + (f" (±{w['rounds']['median_interval']:.1%})" if w["rounds"]["stop"] == "tolerance" else " (the most)")
        for w in works
    )
    return (f"{proto['protocol']} protocol: {proto['warmup']} warm-up + {proto['min_runs']}–{proto['runs']} timed "
            f"rounds per workload, models alternating, until every speedup's median is known to "
            f"±{proto['tolerance']:.0%}; timed rounds run: {ran}")


def has_matplotlib() -> bool:
    """Whether the bar chart can be drawn (matplotlib is the optional `amprune[plot]` dependency)."""
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> None:
    if not has_matplotlib():
        raise AmpruneError("--png needs matplotlib: pip install 'amprune[plot]'")


def plot(result: dict, path: str) -> None:
    """One panel per workload: speedup bars (baseline = 1, median with quartiles), ideal dashed."""
    from matplotlib.figure import Figure  # the object API renders with Agg, no global backend state

    works, models = result["workloads"], result["models"]
    fig = Figure(figsize=(max(2.6 * len(works), 5.0), 4.0), layout="constrained")
    axes = fig.subplots(1, len(works), squeeze=False, sharey=True)[0]
    labels = ["baseline"] + [Path(m["source"]).name or m["source"] for m in models[1:]]
    for ax, work in zip(axes, works, strict=True):
        ax.bar(0, 1.0, color="C0", label=labels[0])
        for i, entry in enumerate(work["results"][1:], start=1):
            s = entry["speedup"]
            ax.bar(i, s["median"], yerr=[[s["median"] - s["p25"]], [s["p75"] - s["median"]]], capsize=3,
                   color=f"C{i}", label=labels[i])
            ax.hlines(entry["ideal_speedup"], i - 0.4, i + 0.4, colors="black", linestyles="--",
                      label="ideal (FLOPs)" if i == 1 else None)
        ax.set_title(f"{work['name']}\nbaseline {work['results'][0]['tokens_per_s']:,.1f} tok/s", fontsize=8)
        ax.set_xticks([])
    axes[0].set_ylabel("speedup over the baseline (×)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 3), fontsize=8)
    fig.savefig(path, dpi=120)
