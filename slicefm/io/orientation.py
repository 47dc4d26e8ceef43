"""Voxel geometry: bring any 3-D array with a voxel->world affine into the canonical [z, y, x] order.

Only axis permutations and flips are applied (nibabel.orientations), never resampling: an oblique
acquisition is mapped to the closest canonical axes and its small tilt is ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

logger = logging.getLogger(__name__)

# World (x, y, z) axes pointing to +L, +P, +S: voxel axis i -> +x, j -> +y, k -> +z.
_LPS_TARGET_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
# RAS and LPS differ by the sign of the first two world axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def reorient_to_canonical(
    data_ijk: np.ndarray, affine: np.ndarray, frame: Literal["RAS", "LPS"]
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Return `data_ijk` in canonical [z, y, x] order and its spacing (z, y, x) in mm.

    `affine` maps voxel indices (i, j, k) to world coordinates in `frame` (NIfTI: RAS, DICOM: LPS).
    Canonical: axis 0 inferior->superior, axis 1 anterior->posterior, axis 2 right->left
    (see slicefm.io.volume). Raises ValueError for a non-3-D array or a degenerate affine.
    """
    if data_ijk.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {data_ijk.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got {affine.tolist()}")
    if frame == "RAS":
        affine = _RAS_TO_LPS @ affine
    elif frame != "LPS":
        raise ValueError(f"unknown world frame {frame!r} (expected 'RAS' or 'LPS')")

    start_ornt = io_orientation(affine)
    if np.isnan(start_ornt).any():
        raise ValueError(f"degenerate affine (voxel axes do not span 3-D space): {affine.tolist()}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # voxel size along i, j, k

    transform = ornt_transform(start_ornt, _LPS_TARGET_ORNT)
    data_lps = apply_orientation(data_ijk, transform)  # axes now (x:+L, y:+P, z:+S)
    spacing_xyz = [0.0, 0.0, 0.0]
    for voxel_axis, (world_axis, _flip) in enumerate(start_ornt):
        spacing_xyz[int(world_axis)] = float(zooms[voxel_axis])
    canonical = np.ascontiguousarray(data_lps.transpose(2, 1, 0))
    return canonical, (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])


def check_spacing_mm(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    """Return `spacing_mm` as three floats; ValueError unless they are three finite, positive mm values."""
    try:
        values = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive finite mm values (z, y, x), got {spacing_mm!r}")
    return values  # type: ignore[return-value]
