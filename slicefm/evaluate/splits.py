"""Patient-level, multi-label-stratified splits: held-out test + k-fold CV, or nested k-fold CV.

Stratification is the iterative algorithm of Sechidis, Tsoumakas & Vlahavas (2011) applied to patients
(a patient's label vector = any positive over their bags), so no patient ever sits in two partitions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slicefm.evaluate.config import SplitConfig

log = logging.getLogger(__name__)
SPLITS_VERSION = 1


@dataclass
class Fold:
    """Patient ids of one fold's train / validation / test partitions."""

    train: list[str]
    val: list[str]
    test: list[str]

    def indices(self, patients: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bag indices (into `patients`) of train, val and test."""
        pid = np.asarray([str(p) for p in patients])
        return tuple(np.flatnonzero(np.isin(pid, part)) for part in (self.train, self.val, self.test))  # type: ignore[return-value]


@dataclass
class Splits:
    mode: str  # "holdout" (common test set) | "nested" (outer folds are the test sets)
    seed: int
    folds: list[Fold] = field(default_factory=list)

    def dumps(self) -> str:
        data = {"version": SPLITS_VERSION, "mode": self.mode, "seed": self.seed}
        data["folds"] = [asdict(f) for f in self.folds]
        return json.dumps(data, indent=1)

    @classmethod
    def loads(cls, text: str | bytes, where: str = "splits") -> Splits:
        data = json.loads(text)
        if data.get("version") != SPLITS_VERSION:
            raise ValueError(f"{where}: splits version {data.get('version')} != {SPLITS_VERSION}")
        return cls(data["mode"], int(data["seed"]), [Fold(**f) for f in data["folds"]])

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())

    @classmethod
    def from_json(cls, path: str | Path) -> Splits:
        return cls.loads(Path(path).read_text(), str(path))


def patient_label_matrix(labels: np.ndarray, patients: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unique patient ids (sorted) and their binary label matrix (1 where any bag is positive)."""
    pid = np.asarray([str(p) for p in patients])
    uniq, inverse = np.unique(pid, return_inverse=True)
    y = np.zeros((uniq.size, labels.shape[1]), dtype=np.int64)
    np.maximum.at(y, inverse, (np.asarray(labels) == 1).astype(np.int64))
    return uniq, y


def iterative_stratify(y: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Assign each row of a binary matrix y [n, C] to a subset so every class is spread as `fractions`.

    Rarest label first: each of its rows goes to the subset that still wants most of that label (ties:
    most wanted rows overall, then random). Rows without positives fill the subsets' remaining room.
    """
    n = y.shape[0]
    frac = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    want_rows = frac * n
    want_label = frac[:, None] * y.sum(axis=0)[None, :]
    assign = np.full(n, -1, dtype=np.int64)
    remaining = y.astype(bool).copy()
    while remaining.any():
        counts = remaining.sum(axis=0)
        label = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        rows = np.flatnonzero(remaining[:, label])
        for r in rng.permutation(rows):
            best = _argmax_ties(want_label[:, label], want_rows, rng)
            assign[r] = best
            want_label[best] -= y[r]
            want_rows[best] -= 1
            remaining[r] = False
    for r in rng.permutation(np.flatnonzero(assign < 0)):
        best = _argmax_ties(want_rows, np.zeros_like(want_rows), rng)
        assign[r] = best
        want_rows[best] -= 1
    return assign


def _argmax_ties(primary: np.ndarray, secondary: np.ndarray, rng: np.random.Generator) -> int:
    cand = np.flatnonzero(np.isclose(primary, primary.max()))
    cand = cand[np.isclose(secondary[cand], secondary[cand].max())]
    return int(rng.choice(cand))


def make_splits(labels: np.ndarray, patients: Sequence[str], cfg: SplitConfig, seed: int) -> Splits:
    """Held-out test + k-fold CV when the cohort has >= cfg.holdout_min_cases bags, nested k-fold otherwise."""
    rng = np.random.default_rng(seed)
    uniq, y = patient_label_matrix(np.asarray(labels), patients)
    k = cfg.n_folds
    mode = cfg.mode
    if mode == "auto":
        mode = "holdout" if len(patients) >= cfg.holdout_min_cases else "nested"
    folds: list[Fold] = []
    if mode == "holdout":
        part = iterative_stratify(y, [cfg.test_fraction, 1 - cfg.test_fraction], rng)
        test, rest = uniq[part == 0], np.flatnonzero(part == 1)
        groups = iterative_stratify(y[rest], [1.0] * k, rng)
        for f in range(k):
            val = uniq[rest[groups == f]]
            train = uniq[rest[groups != f]]
            folds.append(Fold(sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())))
    elif mode == "nested":
        outer = iterative_stratify(y, [1.0] * k, rng)
        for f in range(k):
            rest = np.flatnonzero(outer != f)
            # Inner split: one of k stratified inner folds is the validation set (early stopping, thresholds).
            inner = iterative_stratify(y[rest], [1.0] * k, rng)
            folds.append(
                Fold(
                    sorted(uniq[rest[inner != 0]].tolist()),
                    sorted(uniq[rest[inner == 0]].tolist()),
                    sorted(uniq[outer == f].tolist()),
                )
            )
    else:
        raise ValueError(f"unknown split mode {mode!r}")
    log.info("splits: mode=%s, %d patients, %d folds", mode, uniq.size, k)
    return Splits(mode, seed, folds)
