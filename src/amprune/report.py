"""Human-readable summaries of a plan (used by `prune` and `inspect`)."""

from __future__ import annotations

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
            "markedly slower per neuron (README: --round-to); --round-to 8 keeps a multiple of 8"
        )
    search = settings.get("allocation")
    if isinstance(search, dict):
        ranked = sorted((c for c in search["candidates"] if c["loss"] is not None), key=lambda c: c["loss"])
        chosen = search["candidates"][search["chosen"]]
        lines.append(f"allocation: {chosen['allocation']} (held-out NLL {chosen['loss']:.3f}), best of "
                     f"{len(search['candidates'])} candidates")
        if len(ranked) > 1:
            lines.append(f"runner-up:  {ranked[1]['allocation']} (held-out NLL {ranked[1]['loss']:.3f})")
    if settings.get("recipe"):
        lines.append(f"recipe {settings['recipe']}: scorer {settings.get('method')}, correction "
                     f"{settings.get('correction')}, allocation {'search' if isinstance(search, dict) else search}, "
                     f"--round-to {settings.get('round_to')}")
    if settings:
        lines.append(
            f"model {settings.get('model')} ({settings.get('model_type')}"
            + (f", saved as {settings['saved_as']}" if settings.get("saved_as") else "")
            + f"); calibration {settings.get('calibration')}: {settings.get('samples')} samples × "
            f"≤{settings.get('seq_len')} tokens ({settings.get('calibration_tokens')} tokens)"
            + (f" + {settings['heldout_samples']} held out" if settings.get("heldout_samples") else "")
            + f", seed {settings.get('seed')}"
        )
    return "\n".join(lines)


def memory_summary(memory: dict) -> str:
    """Peak memory beside the model's size and the hidden states', where they lived, and the world size."""
    peak = memory["peak"]
    line = f"peak memory: {_gib(peak['rss'])} RSS" + (f", {_gib(peak['cuda'])} CUDA" if "cuda" in peak else "")
    line += (f" · model {human_bytes(memory['model_bytes'])} · hidden states {human_bytes(memory['hidden_bytes'])} "
             f"({memory['hidden_place']})")
    if memory.get("world_size", 1) > 1:
        line += f" · {memory['world_size']} ranks"
    if memory.get("compute_dtype") and memory["compute_dtype"] != memory.get("dtype", memory["compute_dtype"]):
        line += f"\nnote: layers computed in {memory['compute_dtype']} (no fast {memory['dtype']} kernels on this CPU)"
    return line


def run_summary(plan: Plan, seconds: dict[str, float], memory: dict) -> str:
    """The plan summary plus wall time per step and memory."""
    steps = " · ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
    return f"{plan_summary(plan)}\ntime: {steps}\n{memory_summary(memory)}"
