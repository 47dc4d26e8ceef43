import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from slicefm.evaluate.metrics import macro, score_class, score_table, summarise_folds
from slicefm.evaluate.thresholds import best_f1_threshold, fit_thresholds


def _data(seed: int, n: int = 200, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(int)
    s = np.clip(0.3 * y + rng.random((n, c)) * 0.8, 0, 1)
    y[rng.random((n, c)) < 0.1] = -1  # unknown labels
    return y, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_metrics_match_sklearn(seed: int) -> None:
    y, s = _data(seed)
    for c in range(y.shape[1]):
        known = y[:, c] >= 0
        yy, ss = y[known, c], s[known, c]
        cs = score_class(y[:, c], s[:, c], threshold=0.45)
        assert cs.note is None and (cs.n_pos, cs.n_neg) == (int(yy.sum()), int((yy == 0).sum()))
        assert cs.auroc == pytest.approx(roc_auc_score(yy, ss))
        assert cs.auprc == pytest.approx(average_precision_score(yy, ss))
        assert cs.f1 == pytest.approx(f1_score(yy, ss >= 0.45))
        assert cs.balanced_accuracy == pytest.approx(balanced_accuracy_score(yy, ss >= 0.45))


def test_undefined_classes_are_reported_and_left_out_of_macro() -> None:
    y, s = _data(3, c=3)
    y[:, 1] = np.where(y[:, 1] == 1, 0, y[:, 1])  # no positives
    y[:, 2] = np.where(y[:, 2] == 0, 1, y[:, 2])  # no negatives
    table = score_table(y, s, ["a", "b", "c"])
    assert table["b"].note == "n/a: no positives" and table["b"].auroc is None
    assert table["c"].note == "n/a: no negatives" and table["c"].auprc is None
    known = y[:, 0] >= 0
    assert macro(table)["auroc"] == pytest.approx(roc_auc_score(y[known, 0], s[known, 0]))
    assert macro({"b": table["b"]})["auroc"] is None


def test_nan_or_inf_scores_are_noted_and_left_out_not_a_crash(caplog) -> None:
    y, s = _data(4, c=2)
    s[3, 1], s[5, 1] = np.nan, np.inf
    y[3, 1], y[5, 1] = 1, 0  # known labels: these scores count
    table = score_table(y, s, ["a", "b"])
    n_known = int((y[:, 1] >= 0).sum())
    assert table["b"].note == f"n/a: 2 of {n_known} scores are NaN or inf (diverged head?)"
    assert table["b"].auroc is None
    assert "NaN or inf" in caplog.text
    known = y[:, 0] >= 0
    assert macro(table)["auroc"] == pytest.approx(roc_auc_score(y[known, 0], s[known, 0]))
    summary = summarise_folds([table, table])
    assert summary["b"]["auroc"].mean is None and summary["macro"]["auroc"].mean is not None


def test_fold_summary_mean_sd_and_notes() -> None:
    tables = []
    for seed in range(3):
        y, s = _data(seed, c=2)
        if seed == 0:
            y[:, 1] = np.minimum(y[:, 1], 0)  # class 1 undefined in fold 0
        tables.append(score_table(y, s, ["a", "b"]))
    summ = summarise_folds(tables)
    a = [t["a"].auroc for t in tables]
    assert summ["a"]["auroc"].mean == pytest.approx(np.mean(a))
    assert summ["a"]["auroc"].sd == pytest.approx(np.std(a, ddof=1))
    assert summ["b"]["auroc"].n == 2  # the undefined fold does not count as 0.5 or NaN
    assert summ["b"]["auroc"].mean == pytest.approx(np.mean([tables[1]["b"].auroc, tables[2]["b"].auroc]))
    assert summ["macro"]["auroc"].mean == pytest.approx(np.mean([macro(t)["auroc"] for t in tables]))
    undefined = summarise_folds([score_table(np.zeros((5, 1)), np.ones((5, 1)), ["z"])])
    assert undefined["z"]["auroc"].mean is None and undefined["z"]["auroc"].note == "n/a: no positives"


def test_best_f1_threshold_is_optimal() -> None:
    y, s = _data(5, c=1)
    t = best_f1_threshold(y[:, 0], s[:, 0])
    known = y[:, 0] >= 0
    brute = max(f1_score(y[known, 0], s[known, 0] >= c) for c in np.unique(s[known, 0]))
    assert f1_score(y[known, 0], s[known, 0] >= t) == pytest.approx(brute)
    assert best_f1_threshold(np.zeros(4), np.arange(4.0)) == 0.5  # undefined -> default
    assert fit_thresholds(y, s).shape == (1,)
