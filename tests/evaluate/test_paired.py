"""Paired differences between embedding sets on identical folds, against hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from slicefm.evaluate.metrics import ClassScores, summarise_folds
from slicefm.evaluate.paired import NOT_RESOLVED, compare_sets, gap_closed, paired_difference
from slicefm.evaluate.summary import build_comparison

# Student t quantiles t_{0.975, df} from a printed table.
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446}


def test_interval_above_zero_holds():
    # d = 0.10, 0.12, 0.14, 0.12: mean 0.12, sd sqrt(0.0008 / 3), half = t_3 * sd / 2.
    d = paired_difference([0.60, 0.62, 0.64, 0.62], [0.50, 0.50, 0.50, 0.50])
    half = T975[3] * math.sqrt(0.0008 / 3) / 2
    assert d.mean_diff == pytest.approx(0.12)
    assert (d.ci_low, d.ci_high) == (
        pytest.approx(0.12 - half, abs=1e-6),
        pytest.approx(0.12 + half, abs=1e-6),
    )
    assert d.ci_low == pytest.approx(0.094015, abs=1e-6) and d.n_folds == 4 and d.verdict == "holds"


def test_interval_across_zero_is_not_resolved():
    # d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half = 4.302653 * 0.1 / sqrt(3) = 0.248414.
    d = paired_difference([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    assert (d.mean_diff, d.ci_low, d.ci_high) == pytest.approx(
        (0.2, 0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6
    )
    assert d.verdict == NOT_RESOLVED == "not resolved (interval includes 0)"


def test_interval_below_zero_is_worse_than_the_reference():
    d = paired_difference([0.50, 0.50, 0.50, 0.50], [0.60, 0.62, 0.64, 0.62])
    assert d.mean_diff == pytest.approx(-0.12) and d.ci_high == pytest.approx(-0.094015, abs=1e-6)
    assert d.verdict == "worse than random"


def test_only_folds_with_a_value_in_both_count():
    # Fold 1 has no macro for the set (no class defined), fold 3 a NaN: d = 0.1, 0.2 over n = 2 folds.
    d = paired_difference([0.6, None, 0.7, math.nan], [0.5, 0.5, 0.5, 0.5])
    half = T975[1] * math.sqrt(0.005) / math.sqrt(2)
    assert d.n_folds == 2 and d.mean_diff == pytest.approx(0.15)
    assert (d.ci_low, d.ci_high) == pytest.approx((0.15 - half, 0.15 + half), abs=1e-5)
    one = paired_difference([0.6], [0.5])
    assert (one.mean_diff, one.ci_low, one.ci_high, one.n_folds) == (pytest.approx(0.1), None, None, 1)
    assert one.verdict == "no interval (fewer than 2 folds)"
    assert paired_difference([None], [0.5]).mean_diff is None


def test_fold_counts_must_match():
    with pytest.raises(ValueError, match=r"fold counts differ \(2 vs 3 of random\)"):
        paired_difference([0.6, 0.7], [0.5, 0.5, 0.5])
    assert compare_sets({"pretrained": [0.6, 0.7]}) == {}  # no random set: nothing to compare against


def test_gap_closed():
    assert gap_closed(0.58, 0.50, 0.90) == pytest.approx(0.2)
    assert gap_closed(0.95, 0.50, 0.90) == pytest.approx(1.125)  # beyond the ceiling
    assert gap_closed(0.58, 0.50, 0.50) is None and gap_closed(0.58, 0.50, 0.45) is None
    assert gap_closed(None, 0.50, 0.90) is None


def _cv(per_fold: list[dict[str, float | None]]) -> SimpleNamespace:
    """A cross-validation whose folds score classes with these values (None: class undefined, "n/a")."""
    tables = [
        {c: ClassScores(5, 5, v, v, v, v) if v is not None else ClassScores(0, 10, note="n/a: no positives")
         for c, v in fold.items()}
        for fold in per_fold
    ]  # fmt: skip
    return SimpleNamespace(
        folds=[SimpleNamespace(test_metrics=t) for t in tables], summary=summarise_folds(tables)
    )


def test_comparison_of_every_task_with_a_supervised_ceiling():
    # Per-fold macros (class b undefined in fold 2 and left out): pretrained 0.57, 0.57, 0.59;
    # random 0.50, 0.50, 0.49; supervised 0.75, 0.76, 0.74. pretrained − random = 0.07, 0.07, 0.10:
    # mean 0.08, sd sqrt(0.0003), half = t_2 * 0.01. Gap closed = 0.08 / (0.75 − 0.49667).
    findings = {
        "pretrained": _cv([{"a": 0.60, "b": 0.54}, {"a": 0.58, "b": 0.56}, {"a": 0.59, "b": None}]),
        "random": _cv([{"a": 0.50, "b": 0.50}, {"a": 0.52, "b": 0.48}, {"a": 0.49, "b": None}]),
        "supervised": _cv([{"a": 0.80, "b": 0.70}, {"a": 0.78, "b": 0.74}, {"a": 0.74, "b": None}]),
    }
    flat = {s: _cv([{"a": 0.5}, {"a": 0.5}, {"a": 0.5}]) for s in findings}
    runs = [("location", "abmil", s, r) for s, r in flat.items()]
    runs += [("findings", "probe", s, r) for s, r in findings.items()]
    cmp = build_comparison(runs, "auroc")
    d = cmp.paired["findings"]["probe"]["pretrained"]
    half = T975[2] * 0.01
    assert (d.mean_diff, d.ci_low, d.ci_high) == pytest.approx((0.08, 0.08 - half, 0.08 + half), abs=1e-7)
    assert d.verdict == "holds" and d.n_folds == 3
    assert cmp.paired["findings"]["probe"]["supervised"].mean_diff == pytest.approx(0.76 / 3)
    assert cmp.gap_closed("findings", "probe", "pretrained") == pytest.approx(0.08 / (0.76 / 3))
    assert cmp.paired["location"]["abmil"]["pretrained"].verdict == NOT_RESOLVED  # sd 0: interval [0, 0]
    header, _, *rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in cmp.text().splitlines()[4:]
    ]
    assert header == ["task", "protocol", "folds", "pretrained", "random", "supervised",
                      "pretrained − random [95% CI]", "supervised − random [95% CI]", "pretrained: gap closed"]  # fmt: skip
    assert rows[1] == ["findings", "probe", "3", "0.577 ± 0.012", "0.497 ± 0.006", "0.750 ± 0.010",
                       "+0.080 [+0.037, +0.123] holds", "+0.253 [+0.239, +0.268] holds", "0.32"]  # fmt: skip
    assert rows[0][:3] == ["location", "abmil", "3"] and rows[0][-1] == "n/a"  # supervised = random: no gap
    assert "Gap closed = (set − random) / (supervised − random)" in cmp.caption()
    # A ceiling that does not itself beat random (its interval includes 0) closes no gap, even a tiny one.
    noisy = {
        "pretrained": _cv([{"a": 0.46}, {"a": 0.47}, {"a": 0.45}]),
        "random": _cv([{"a": 0.48}, {"a": 0.50}, {"a": 0.47}]),
        "supervised": _cv([{"a": 0.50}, {"a": 0.47}, {"a": 0.49}]),
    }
    chance = build_comparison([("location", "abmil", s, r) for s, r in noisy.items()], "auroc")
    assert chance.macro["location"]["abmil"]["supervised"].mean > chance.macro["location"]["abmil"]["random"].mean
    assert chance.paired["location"]["abmil"]["supervised"].verdict == NOT_RESOLVED
    assert chance.gap_closed("location", "abmil", "pretrained") is None
    assert chance.table()[1][-1] == "n/a"


def test_comparison_errors_and_no_reference():
    short = _cv([{"a": 0.6}, {"a": 0.7}])
    with pytest.raises(ValueError, match=r"task t, abmil: pretrained vs random: fold counts differ \(2 vs 3"):
        build_comparison([("t", "abmil", "pretrained", short), ("t", "abmil", "random", _cv([{"a": 0.5}] * 3))],
                         "auroc")  # fmt: skip
    alone = build_comparison([("t", "abmil", "pretrained", short)], "auroc")
    assert alone.paired == {"t": {"abmil": {}}} and alone.compared == []
    assert alone.table() == [
        ["task", "protocol", "folds", "pretrained"],
        ["t", "abmil", "2", "0.650 ± 0.071"],
    ]
    assert "No 'random' embedding set: no paired differences." in alone.caption()
