"""One evaluation request (zero-shot tasks + perplexity texts) checked up front, then run on a model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import AmpruneError
from ..textsets import PACKAGED_TEXTS
from .perplexity import DEFAULT_SEQ_LEN, check_text_source, perplexity
from .perplexity import check_options as check_ppl_options
from .results import eval_record
from .zero_shot import check_options as check_zero_shot_options
from .zero_shot import data_root, require_lm_eval, resolve_tasks, zero_shot


@dataclass
class EvalRequest:
    """What to evaluate; `limit` caps the documents of every task, `ppl_windows` the perplexity windows."""

    tasks: str | list[str] = field(default_factory=list)  # names or aliases; a string is comma-separated
    ppl: str | list[str] = field(default_factory=list)  # wiki, c4 or .txt paths; a string is comma-separated
    limit: int | None = None
    batch_size: int = 8
    ppl_seq_len: int | None = None  # None: 2048 or the model's maximum context, whichever is smaller
    ppl_windows: int | None = None
    limit_option: str = "--limit"  # how the CLI spells `limit`, for error messages

    def check(self) -> EvalRequest:
        """Fail before loading a model: unknown tasks, missing data or lm-eval, bad limits, missing texts."""
        self.tasks, self.ppl = _items(self.tasks), _items(self.ppl)
        check_zero_shot_options(self.limit, self.batch_size, self.limit_option)
        check_ppl_options(self.ppl_seq_len, self.ppl_windows)
        if self.tasks:
            self.tasks = resolve_tasks(self.tasks)
            require_lm_eval()
            data_root()
        for source in self.ppl:
            check_text_source(source)
        if not self.tasks and not self.ppl:
            raise AmpruneError("nothing to evaluate: give zero-shot tasks and/or perplexity texts")
        return self


def _items(spec: str | list[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else spec
    return [item.strip() for item in items if item.strip()]


def split_eval_spec(spec: str) -> tuple[list[str], list[str]]:
    """`amp5,wiki` → (zero-shot tasks and aliases, perplexity texts): `wiki` and `c4` are texts."""
    items = _items(spec)
    return [i for i in items if i not in PACKAGED_TEXTS], [i for i in items if i in PACKAGED_TEXTS]


def evaluate(
    model, tokenizer, request: EvalRequest, model_name: str, settings: dict | None = None, progress: bool = True
) -> dict:
    """Perplexity first (its errors are cheap), then zero-shot; returns the results record."""
    started = time.perf_counter()
    # about 2048 tokens per forward pass, whatever the window length
    ppl_batch = max(1, DEFAULT_SEQ_LEN // (request.ppl_seq_len or DEFAULT_SEQ_LEN))
    ppl = [
        perplexity(model, tokenizer, source, request.ppl_seq_len, request.ppl_windows, ppl_batch, progress)
        for source in request.ppl
    ]
    zs = zero_shot(model, tokenizer, request.tasks, request.limit, request.batch_size) if request.tasks else None
    settings = dict(
        settings or {},
        batch_size=request.batch_size,
        ppl_windows=request.ppl_windows,
        seconds=round(time.perf_counter() - started, 1),
    )
    return eval_record(model_name, zs, ppl, settings)
