"""The registry gate (slicefm.edge.promotion): which head is the candidate, and when `champion` moves."""

from __future__ import annotations

import pytest

from slicefm.edge.promotion import Scored, baseline_for, decide, pick_candidate

ROWS = [
    Scored("pretrained", "abmil", 0.71, "u/p-abmil"),
    Scored("pretrained", "probe", 0.74, "u/p-probe"),
    Scored("random", "abmil", 0.69, "u/r-abmil"),
    Scored("random", "probe", 0.76, "u/r-probe"),
    Scored("supervised", "probe", 0.90, "u/s-probe"),
]


def test_the_candidate_is_the_best_head_of_a_pretrained_encoder_never_the_baseline_or_the_ceiling():
    assert pick_candidate(ROWS, excluded=("random", "supervised")) == ROWS[1]
    assert pick_candidate(ROWS, excluded=()) == ROWS[4]
    assert pick_candidate(ROWS[2:4], excluded=("random",)) is None


def test_the_baseline_is_the_random_head_of_the_candidates_protocol():
    assert baseline_for(ROWS, ROWS[0]) == ROWS[2] and baseline_for(ROWS, ROWS[1]) == ROWS[3]
    assert baseline_for(ROWS[:2], ROWS[0]) is None


@pytest.mark.parametrize(
    ("candidate", "baseline", "champion", "promote", "why"),
    [
        (ROWS[0], ROWS[2], None, True, "beats random weights (0.6900) and no champion yet"),
        (ROWS[0], ROWS[2], 0.70, True, "beats random weights (0.6900) and champion 0.7000"),
        (ROWS[1], ROWS[3], None, False, "does not beat random weights (0.7600)"),
        (ROWS[0], ROWS[2], 0.71, False, "does not beat the current champion (0.7100)"),  # a tie holds
        (ROWS[0], Scored("random", "abmil", 0.71, ""), None, False, "does not beat random weights"),
        (ROWS[0], None, None, False, "no random-weights baseline of protocol abmil"),
    ],
)
def test_the_gate(candidate, baseline, champion, promote, why):
    decision = decide(candidate, baseline, champion, "auroc")
    assert decision.promote is promote
    assert why in decision.reason and decision.reason.startswith(f"pretrained · {candidate.protocol} auroc")
