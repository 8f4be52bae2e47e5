"""The packaged texts: present, split by document into two disjoint halves."""

from __future__ import annotations

import pytest

from amprune.errors import AmpruneError
from amprune.textsets import PACKAGED_TEXTS, _documents, packaged_text


@pytest.mark.parametrize("name", sorted(PACKAGED_TEXTS))
def test_calibration_and_evaluation_halves_are_disjoint(name):
    docs = _documents(name)
    calibration, evaluation = packaged_text(name, "calibration"), packaged_text(name, "evaluation")
    assert calibration.count("\n\n") + evaluation.count("\n\n") + 2 >= len(docs)
    assert not set(calibration.split("\n\n")) & set(evaluation.split("\n\n"))
    assert "<doc" not in calibration and "</doc>" not in evaluation


def test_document_counts():
    assert len(_documents("c4")) == 113  # 118 lines, 5 of them repeats
    assert len(set(_documents("wiki"))) == len(_documents("wiki"))


def test_unknown_text():
    with pytest.raises(AmpruneError, match="unknown packaged text 'pile'; available: c4, wiki"):
        packaged_text("pile", "calibration")
