"""Per-class decision thresholds that maximise F1 on validation data (DALE-CT protocol)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve


def best_f1_threshold(y_true: np.ndarray, y_score: np.ndarray, default: float = 0.5) -> float:
    """The score threshold (predict positive when score >= t) with the highest F1; -1 labels ignored.

    Falls back to `default` when the class has no positive or no negative known label.
    """
    y_true = np.asarray(y_true)
    known = y_true >= 0
    y, s = y_true[known].astype(int), np.asarray(y_score, dtype=np.float64)[known]
    if y.sum() == 0 or y.sum() == y.size:
        return float(default)
    precision, recall, thr = precision_recall_curve(y, s)
    # precision/recall have one more entry than thr (the final (1, 0) point has no threshold).
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    return float(thr[int(np.argmax(f1))])


def fit_thresholds(labels: np.ndarray, scores: np.ndarray, default: float = 0.5) -> np.ndarray:
    """One F1-maximising threshold per class column."""
    return np.asarray(
        [best_f1_threshold(labels[:, c], scores[:, c], default) for c in range(labels.shape[1])]
    )
