"""One evaluation request (zero-shot tasks + perplexity texts) checked up front, then run on a model, or on
a dense and a pruned model side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import AmpruneError
from ..textsets import PACKAGED_TEXTS
from .perplexity import DEFAULT_SEQ_LEN, check_text_source, perplexity
from .perplexity import check_options as check_ppl_options
from .results import comparison_table, eval_record, markdown_table, write_results
from .zero_shot import check_options as check_zero_shot_options
from .zero_shot import data_root, require_lm_eval, resolve_tasks, zero_shot

PPL_TOKENS_PER_FORWARD = 2048  # windows per perplexity forward pass: about this many tokens, whatever their length


@dataclass
class EvalRequest:
    """What `amprune eval` is asked to do; `limit` caps the documents of every task, `ppl_windows` the
    perplexity windows. Without tasks and texts, amp5."""

    model: str | None = None  # None: the packaged SmolLM2-135M-Instruct
    tasks: str | list[str] | None = None  # names or aliases; a string is comma-separated; None: amp5 unless ppl
    ppl: str | list[str] = field(default_factory=list)  # wiki, c4 or .txt paths; a string is comma-separated
    limit: int | None = None
    eval_batch_size: int = 8  # lm-eval's batch size
    ppl_seq_len: int | None = None  # None: 2048 or the model's maximum context, whichever is smaller
    ppl_windows: int | None = None
    out: str | None = None  # results JSON (the Markdown table beside it)
    dtype: str | None = None
    device: str | None = None
    progress: bool = True

    def check(self) -> EvalRequest:
        """Fail before loading a model: unknown tasks, missing data or lm-eval, bad limits, missing texts."""
        self.ppl = _items(self.ppl)
        self.tasks = (["amp5"] if not self.ppl else []) if self.tasks is None else _items(self.tasks)
        check_zero_shot_options(self.limit, self.eval_batch_size)
        check_ppl_options(self.ppl_seq_len, self.ppl_windows)
        if self.tasks:
            self.tasks = resolve_tasks(self.tasks)
            require_lm_eval()
            data_root()
        for source in self.ppl:
            check_text_source(source)
        if not self.tasks and not self.ppl:
            raise AmpruneError("nothing to evaluate: give zero-shot tasks (--tasks) and/or perplexity texts (--ppl)")
        return self


def _items(spec: str | list[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else spec
    return [item.strip() for item in items if item.strip()]


def split_eval_spec(spec: str) -> tuple[list[str], list[str]]:
    """`amp5,wiki` → (zero-shot tasks and aliases, perplexity texts): `wiki` and `c4` are texts."""
    items = _items(spec)
    return [i for i in items if i not in PACKAGED_TEXTS], [i for i in items if i in PACKAGED_TEXTS]


def evaluate_model(
    model, tokenizer, request: EvalRequest, model_name: str, settings: dict | None = None, progress: bool = True
) -> dict:
    """A model in memory: perplexity first (its errors are cheap), then zero-shot; returns the results record."""
    started = time.perf_counter()
    ppl_batch = max(1, PPL_TOKENS_PER_FORWARD // (request.ppl_seq_len or DEFAULT_SEQ_LEN))
    ppl = [
        perplexity(model, tokenizer, source, request.ppl_seq_len, request.ppl_windows, ppl_batch, progress)
        for source in request.ppl
    ]
    zs = zero_shot(model, tokenizer, request.tasks, request.limit, request.eval_batch_size) if request.tasks else None
    settings = dict(
        settings or {},
        batch_size=request.eval_batch_size,
        ppl_windows=request.ppl_windows,
        seconds=round(time.perf_counter() - started, 1),
    )
    return eval_record(model_name, zs, ppl, settings)


def evaluate(request: EvalRequest) -> tuple[dict, str]:
    """Load the request's model and evaluate it; writes `out` (and its .md) when given. Returns the record and
    its Markdown table."""
    from ..models.loading import default_model, load_model, load_tokenizer, resolve_device_dtype, resolve_model

    request.check()
    device, dtype = resolve_device_dtype(request.device, request.dtype)
    source = resolve_model(request.model)
    tokenizer = load_tokenizer(source)
    model = load_model(source, device, dtype)
    settings = {"dtype": str(dtype), "device": str(device)}
    record = evaluate_model(model, tokenizer, request, request.model or default_model(), settings, request.progress)
    table = markdown_table(record)
    if request.out:
        write_results(record, request.out, table)
    return record, table


def evaluate_side_by_side(dense_source: str, dense_name: str, pruned, tokenizer, request: EvalRequest,
                          pruned_name: str, out: str | None = None) -> str:
    """The dense model (loaded from `dense_source`) and the in-memory `pruned` one, evaluated alike; writes
    `out` (JSON, and its .md) when given. Returns the side-by-side table."""
    from ..models.loading import load_model

    request.check()
    device, dtype = next(pruned.parameters()).device, next(pruned.parameters()).dtype
    settings = {"dtype": str(dtype), "device": str(device)}
    pruned_record = evaluate_model(pruned, tokenizer, request, pruned_name, settings, request.progress)
    dense = load_model(dense_source, device, dtype)
    dense_record = evaluate_model(dense, tokenizer, request, dense_name, settings, request.progress)
    table = comparison_table(dense_record, pruned_record)
    if out:
        write_results({"dense": dense_record, "pruned": pruned_record}, out, table)
    return table
