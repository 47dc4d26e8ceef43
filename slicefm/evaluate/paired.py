"""Paired comparison of embedding sets on identical folds: per-fold difference of a macro metric (set minus
reference, fold k vs fold k), its mean and a Student t 95% interval over folds, said in plain words."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from slicefm.evaluate.metrics import macro
from slicefm.evaluate.protocols import CVResult

REFERENCE = "random"  # the embedding set every other set is compared against, when present
SUPERVISED = "supervised"  # a set with this name is the ceiling of the "gap closed" fraction
HOLDS = "holds"
NOT_RESOLVED = "not resolved (interval includes 0)"


@dataclass(frozen=True)
class PairedDiff:
    """mean of (set − reference) over the folds where both have a value, with its t-interval (None if n < 2)."""

    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    n_folds: int
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def fold_macros(res: CVResult, metric: str) -> list[float | None]:
    """Per-fold test macro of `metric` (the values summarise_folds averages; None where no class is defined)."""
    return [macro(f.test_metrics)[metric] for f in res.folds]


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def paired_difference(
    values: Sequence[float | None],
    reference: Sequence[float | None],
    reference_name: str = REFERENCE,
) -> PairedDiff:
    """values[k] − reference[k] over folds k where both are finite; mean ± t_{0.975, n−1} · sd / √n."""
    if len(values) != len(reference):
        raise ValueError(
            f"fold counts differ ({len(values)} vs {len(reference)} of {reference_name}): "
            "a paired difference needs the same folds for both sets"
        )
    pairs = zip(values, reference, strict=True)
    d = np.array([a - b for a, b in pairs if _finite(a) and _finite(b)], dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return PairedDiff(None, None, None, 0, "no fold with a value in both")
    mean = float(d.mean())
    if n < 2:
        return PairedDiff(mean, None, None, n, "no interval (fewer than 2 folds)")
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
    low, high = mean - half, mean + half
    verdict = HOLDS if low > 0 else f"worse than {reference_name}" if high < 0 else NOT_RESOLVED
    return PairedDiff(mean, low, high, n, verdict)


def compare_sets(
    per_set: Mapping[str, Sequence[float | None]], reference: str = REFERENCE
) -> dict[str, PairedDiff]:
    """Every set other than `reference` against it (empty when there is no `reference` set)."""
    if reference not in per_set:
        return {}
    out = {}
    for name, values in per_set.items():
        if name == reference:
            continue
        try:
            out[name] = paired_difference(values, per_set[reference], reference)
        except ValueError as e:
            raise ValueError(f"{name} vs {reference}: {e}") from e
    return out


def gap_closed(value: float | None, reference: float | None, ceiling: float | None) -> float | None:
    """(value − reference) / (ceiling − reference): the share of the reference→ceiling gap that `value` closes
    (None unless all are known and ceiling > reference)."""
    if value is None or reference is None or ceiling is None or not ceiling - reference > 0:
        return None
    return (value - reference) / (ceiling - reference)
