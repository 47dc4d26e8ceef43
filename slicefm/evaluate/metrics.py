"""Per-class and macro AUROC, AUPRC, F1 and balanced accuracy, with labels 1/0/-1 (-1 = unknown, ignored).

A class with no positives (or no negatives) among the known labels of a split has no defined AUROC/AUPRC:
it is reported as "n/a: no positives" / "n/a: no negatives" and left out of the macro mean, never 0.5 or NaN.
So is a class whose scores hold NaN or inf (a diverged head), with a warning, instead of a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

log = logging.getLogger(__name__)

METRICS = ("auroc", "auprc", "f1", "balanced_accuracy")


@dataclass
class ClassScores:
    n_pos: int
    n_neg: int
    auroc: float | None = None
    auprc: float | None = None
    f1: float | None = None
    balanced_accuracy: float | None = None
    threshold: float = 0.5
    note: str | None = None  # set (and every metric None) when the class is undefined in this split

    def get(self, metric: str) -> float | None:
        return getattr(self, metric)


@dataclass
class Summary:
    """Mean and sd over folds of one metric; `n` folds contributed, `note` explains n == 0."""

    mean: float | None
    sd: float | None
    n: int
    note: str | None = None


def score_class(y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5) -> ClassScores:
    """Metrics of one class; entries of y_true equal to -1 are ignored."""
    y_true = np.asarray(y_true)
    known = y_true >= 0
    y, s = y_true[known].astype(int), np.asarray(y_score, dtype=np.float64)[known]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        note = "n/a: no positives" if n_pos == 0 else "n/a: no negatives"
        return ClassScores(n_pos, n_neg, threshold=float(threshold), note=note)
    n_bad = int((~np.isfinite(s)).sum())
    if n_bad:
        # A diverged head (NaN/inf outputs) has no ranking to score: excluded from the macro mean, and said.
        note = f"n/a: {n_bad} of {len(s)} scores are NaN or inf (diverged head?)"
        log.warning("%s", note)
        return ClassScores(n_pos, n_neg, threshold=float(threshold), note=note)
    pred = (s >= threshold).astype(int)
    return ClassScores(
        n_pos,
        n_neg,
        auroc=float(roc_auc_score(y, s)),
        auprc=float(average_precision_score(y, s)),
        f1=float(f1_score(y, pred, zero_division=0)),
        balanced_accuracy=float(balanced_accuracy_score(y, pred)),
        threshold=float(threshold),
    )


def score_table(
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> dict[str, ClassScores]:
    """Per-class metrics of scores [n, C] against labels [n, C] (1/0/-1)."""
    thr = np.full(len(class_names), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return {
        name: score_class(labels[:, c], scores[:, c], float(thr[c])) for c, name in enumerate(class_names)
    }


def macro(table: dict[str, ClassScores]) -> dict[str, float | None]:
    """Macro mean of each metric over the classes defined in this split (None when none is)."""
    out: dict[str, float | None] = {}
    for m in METRICS:
        vals = [cs.get(m) for cs in table.values() if cs.note is None]
        out[m] = float(np.mean(vals)) if vals else None
    return out


def summarise_folds(tables: Sequence[dict[str, ClassScores]]) -> dict[str, dict[str, Summary]]:
    """Mean and sample sd (ddof=1; 0 for one fold) over folds, per class and for "macro"."""
    if not tables:
        return {}
    out: dict[str, dict[str, Summary]] = {}
    for name in tables[0]:
        notes = {t[name].note for t in tables if t[name].note is not None}
        out[name] = {m: _summary([t[name].get(m) for t in tables], notes) for m in METRICS}
    macros = [macro(t) for t in tables]
    out["macro"] = {m: _summary([mt[m] for mt in macros], {"n/a: no class defined"}) for m in METRICS}
    return out


def _summary(values: Sequence[float | None], notes: set[str]) -> Summary:
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if vals.size == 0:
        return Summary(None, None, 0, "; ".join(sorted(notes)) or "n/a")
    sd = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
    return Summary(float(vals.mean()), sd, int(vals.size))
