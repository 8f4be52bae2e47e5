"""amprune: structured pruning of LLMs (attention heads, MLP neurons, whole layers) into standard
Hugging Face checkpoints, with evaluation, benchmarking and LoRA recovery.

    import amprune

    result = amprune.prune(amprune.PruneRequest(out="pruned/", ratio=0.3))   # the packaged SmolLM2-135M
    plan = amprune.load_plan("pruned/")
    record, table = amprune.evaluate(amprune.EvalRequest(model="pruned/", ppl="wiki", tasks=[]))

Every command of the `amprune` CLI is a request dataclass and a function here. Names are imported on
first use, so `import amprune` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prune": "pipeline", "PruneRequest": "pipeline", "PruneResult": "pipeline",
    "Plan": "plan", "load_plan": "plan",
    "evaluate": "evaluation.run", "EvalRequest": "evaluation.run",
    "perplexity": "evaluation", "zero_shot": "evaluation",
    "bench": "benchmark", "BenchRequest": "benchmark",
    "recover": "recovery", "RecoverRequest": "recovery",
    "run_compare": "compare", "CompareRequest": "compare",
    "export": "export", "ExportRequest": "export",
    "RECIPES": "recipes", "SCORERS": "scoring", "FAMILIES": "models", "get_family": "models",
    "AmpruneError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'amprune' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
