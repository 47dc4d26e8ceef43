"""DALE-CT slabs: consecutive slices grouped into non-overlapping ~12 mm blocks."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def slices_per_slab(z_mm: np.ndarray, slab_mm: float = 12.0) -> int:
    """``max(1, round(slab_mm / median z spacing))`` as in the DALE-CT code (Python round: halves to even)."""
    if slab_mm <= 0:
        raise ValueError(f"slab_mm must be positive, got {slab_mm}")
    z = np.asarray(z_mm, dtype=np.float64)
    if z.ndim != 1:
        raise ValueError(f"expected 1-D slice positions, got shape {z.shape}")
    if z.size < 2:
        return 1
    # Median, not mean: one missing slice or a reconstruction overlap barely moves it.
    spacing = float(np.median(np.abs(np.diff(z))))
    if not np.isfinite(spacing) or spacing <= 0:
        raise ValueError(f"cannot derive a z spacing from positions (median step {spacing} mm)")
    return max(1, round(slab_mm / spacing))


def slab_ids(z_mm: np.ndarray, slab_mm: float = 12.0) -> np.ndarray:
    """Slab index of every slice: slices ``0..n-1`` -> 0, ``n..2n-1`` -> 1, ... (n = `slices_per_slab`).

    Grouping is by count over consecutive slices in array order, not by position, as in the DALE-CT code; a
    trailing partial slab keeps its own id. Returns int64 ``[len(z_mm)]``.
    """
    n = slices_per_slab(z_mm, slab_mm)
    ids = np.arange(len(z_mm), dtype=np.int64) // n
    logger.debug("%d slices -> %d slabs of %d slices", len(z_mm), ids[-1] + 1 if len(ids) else 0, n)
    return ids
