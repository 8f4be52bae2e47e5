"""Evaluation of any causal LM (pruned or not): perplexity and zero-shot accuracy through lm-eval."""

from .perplexity import perplexity
from .zero_shot import ALIASES, TASKS, resolve_tasks, zero_shot

__all__ = ["ALIASES", "TASKS", "perplexity", "resolve_tasks", "zero_shot"]
