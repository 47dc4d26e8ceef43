"""Latent continuity of a scan's slice embeddings (DALE-CT).

For embeddings e_1..e_n ordered along z and a distance D:

    continuity = D(e_1, e_n) / sum_{i=1}^{n-1} D(e_i, e_{i+1})

With D = cosine distance (1 - cos) this is the published DALE-CT number (0.43 pure 2D vs 1.68 depth-aware;
cosine distance violates the triangle inequality, so the ratio can exceed 1). With D = Euclidean (L2), as
the later DALE-CT code, the triangle inequality bounds it by 1 (1 = the embeddings move on a straight line).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _distance(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        na = np.linalg.norm(a, axis=-1)
        nb = np.linalg.norm(b, axis=-1)
        return 1.0 - np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-12)
    if metric == "l2":
        return np.linalg.norm(a - b, axis=-1)
    raise ValueError(f"unknown continuity metric {metric!r} (cosine | l2)")


def latent_continuity(embeddings: np.ndarray, metric: str = "cosine") -> float:
    """D(e_1, e_n) / sum_i D(e_i, e_{i+1}) for one scan [n_slices, d]; NaN when n < 2 or the path has length 0."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.shape[0] < 2:
        return float("nan")
    path = float(_distance(e[:-1], e[1:], metric).sum())
    if path <= 0:
        return float("nan")
    return float(_distance(e[0], e[-1], metric)) / path


def mean_continuity(scans: Sequence[np.ndarray], metric: str = "cosine") -> tuple[float, float, int]:
    """Mean and sd of latent continuity over scans (undefined scans skipped) and how many counted."""
    vals = np.asarray([latent_continuity(s, metric) for s in scans])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan"), 0
    return float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else 0.0, int(vals.size)
