import numpy as np
import pytest

from slicefm.evaluate.config import SplitConfig
from slicefm.evaluate.splits import Splits, iterative_stratify, make_splits


def _cohort(n_bags: int, seed: int = 0, c: int = 6) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.04, 0.4, c)
    labels = (rng.random((n_bags, c)) < prevalence).astype(int)
    labels[rng.random((n_bags, c)) < 0.05] = -1
    # About a third of patients have two scans.
    patients = [f"p{i // 2 if i % 3 == 0 else i + n_bags}" for i in range(n_bags)]
    return labels, patients


@pytest.mark.parametrize("n_bags, mode", [(300, "nested"), (1000, "holdout")])
def test_folds_never_share_a_patient(n_bags: int, mode: str) -> None:
    labels, patients = _cohort(n_bags)
    splits = make_splits(labels, patients, SplitConfig(), seed=0)
    assert splits.mode == mode and len(splits.folds) == 5
    all_patients = set(patients)
    for f in splits.folds:
        tr, va, te = set(f.train), set(f.val), set(f.test)
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == all_patients
        idx = f.indices(patients)
        assert sum(i.size for i in idx) == n_bags
    if mode == "holdout":
        assert all(f.test == splits.folds[0].test for f in splits.folds)
        vals = [set(f.val) for f in splits.folds]
        assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1 :])
        assert len(splits.folds[0].test) == pytest.approx(0.2 * len(all_patients), rel=0.05)
    else:
        tests = [set(f.test) for f in splits.folds]
        assert set().union(*tests) == all_patients
        assert sum(len(t) for t in tests) == len(all_patients)


def test_switch_at_1000_cases() -> None:
    assert make_splits(*_cohort(999), SplitConfig(), seed=0).mode == "nested"
    assert make_splits(*_cohort(1000), SplitConfig(), seed=0).mode == "holdout"
    assert make_splits(*_cohort(50), SplitConfig(mode="holdout"), seed=0).mode == "holdout"


def test_iterative_stratification_balances_every_class() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((500, 8)) < np.linspace(0.03, 0.5, 8)).astype(int)
    assign = iterative_stratify(y, [1.0] * 5, np.random.default_rng(0))
    per_fold = np.stack([y[assign == k].sum(axis=0) for k in range(5)])
    target = y.sum(axis=0) / 5
    assert np.all(np.abs(per_fold - target) <= 1.0 + 1e-9)  # each class within one case of its share
    assert np.all(np.abs(np.bincount(assign, minlength=5) - 100) <= 1)
    # A random assignment would typically be off by several cases on the common classes.
    rand = np.random.default_rng(0).integers(0, 5, 500)
    assert np.abs(np.stack([y[rand == k].sum(0) for k in range(5)]) - target).max() > 1.0


def test_splits_json_round_trip(tmp_path) -> None:
    labels, patients = _cohort(200, seed=2)
    splits = make_splits(labels, patients, SplitConfig(), seed=7)
    splits.to_json(tmp_path / "splits.json")
    back = Splits.from_json(tmp_path / "splits.json")
    assert back == splits
    for a, b in zip(splits.folds, back.folds, strict=True):
        assert all(
            np.array_equal(x, y) for x, y in zip(a.indices(patients), b.indices(patients), strict=True)
        )
    assert make_splits(labels, patients, SplitConfig(), seed=7) == splits  # deterministic for a seed
    assert make_splits(labels, patients, SplitConfig(), seed=8) != splits
