"""Evaluation results: one JSON record per model, a Markdown table, and dense-vs-pruned side by side."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from ..versions import package_versions

NOT_WIKITEXT = "English Wikipedia, not WikiText-2"


def eval_record(model: str, zero_shot: dict | None, perplexity: list[dict], settings: dict | None = None) -> dict:
    """Everything needed to trust and compare the numbers: model, metrics, sizes, limits, versions, date."""
    return {
        "model": model,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "settings": settings or {},
        "zero_shot": zero_shot,
        "perplexity": perplexity,
    }


def limit_note(zero_shot: dict | None) -> str:
    if not zero_shot:
        return ""
    limit = zero_shot.get("limit")
    if limit:
        return f"--limit {limit}: first {limit} documents of each task"
    if any(t["n"] < t["size"] for t in zero_shot["tasks"].values()):
        return "some tasks on their first documents only (see the documents column)"
    return "full tasks (no --limit)"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _text_label(source: str) -> str:
    return f"wiki ({NOT_WIKITEXT})" if source == "wiki" else source


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_table(record: dict) -> str:
    """Zero-shot accuracies (%) per task with the headline metric (± standard error), averages, perplexities."""
    lines = [f"model `{record['model']}`, {record['date']}"]
    zs = record.get("zero_shot")
    if zs:
        lines[0] += f"; {limit_note(zs)}"
        rows = [
            [
                name,
                t["split"],
                f"{t['n']} of {t['size']}",
                _pct(t["acc"]),
                _pct(t["acc_norm"]),
                f"{_pct(t['headline'])} ± {_pct(t[t['headline_metric'] + '_stderr'])} ({t['headline_metric']})",
            ]
            for name, t in zs["tasks"].items()
        ]
        rows += [[f"**{alias} average**", "", "", "", "", f"**{_pct(v)}**"] for alias, v in zs["averages"].items()]
        lines += ["", *_rows(["task", "split", "documents", "acc", "acc_norm", "headline"], rows)]
    if record.get("perplexity"):
        rows = [
            [_text_label(p["source"]), str(p["seq_len"]), str(p["windows"]), f"{p['tokens']:,}", f"{p['ppl']:.3f}"]
            for p in record["perplexity"]
        ]
        lines += ["", *_rows(["text", "seq len", "windows", "tokens", "perplexity"], rows)]
    return "\n".join(lines)


def _ppl_key(p: dict) -> tuple[str, int]:
    return p["source"], p["seq_len"]


def comparison_table(dense: dict, pruned: dict) -> str:
    """Dense vs pruned headline accuracies (%, difference in points) and perplexities (difference, ratio)."""
    rows = []
    dzs, pzs = dense.get("zero_shot"), pruned.get("zero_shot")
    if dzs and pzs:
        for name, d in dzs["tasks"].items():
            p = pzs["tasks"][name]
            rows.append(
                [
                    f"{name} {d['headline_metric']} (%)",
                    _pct(d["headline"]),
                    _pct(p["headline"]),
                    f"{100 * (p['headline'] - d['headline']):+.2f}",
                ]
            )
        for alias, d in dzs["averages"].items():
            p = pzs["averages"][alias]
            rows.append([f"**{alias} average** (%)", _pct(d), _pct(p), f"{100 * (p - d):+.2f}"])
    pruned_ppl = {_ppl_key(p): p for p in pruned.get("perplexity", [])}
    for d in dense.get("perplexity", []):
        p = pruned_ppl[_ppl_key(d)]
        rows.append(
            [
                f"perplexity {_text_label(d['source'])}, seq {d['seq_len']}",
                f"{d['ppl']:.3f}",
                f"{p['ppl']:.3f}",
                f"{p['ppl'] - d['ppl']:+.3f} (×{p['ppl'] / d['ppl']:.2f})",
            ]
        )
    lines = [f"dense `{dense['model']}` vs pruned `{pruned['model']}`"]
    if dzs:
        lines[0] += f"; {limit_note(dzs)}"
    return "\n".join([*lines, "", *_rows(["metric", "dense", "pruned", "difference"], rows)])


def write_results(record: dict, path: str | Path, markdown: str | None = None) -> tuple[Path, Path]:
    """Write the record as JSON at `path` and its Markdown table next to it (same name, `.md`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    md = path.with_suffix(".md")
    md.write_text((markdown or markdown_table(record)) + "\n", encoding="utf-8")
    return path, md
