"""The voxel grid in anatomical millimetres, and the ellipse / ellipsoid masks every structure is drawn with.

Anatomy is laid out on a body coordinate ``s`` (0 = pelvis floor, ~0.6 = diaphragm, 1 = above the lung
apices) and in anatomical millimetres in-plane (physical mm / anatomy scale); shapes are evaluated by
numpy broadcasting on their bounding box only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of ascending `coords` within [lo, hi]."""
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))


@dataclass
class Grid:
    """Voxel-centre coordinates in anatomical mm (physical mm / anatomy scale)."""

    z: np.ndarray  # (Z,) from the bottom of the covered region
    y: np.ndarray  # (N,) from the image centre, + posterior
    x: np.ndarray  # (N,) from the image centre, + patient left
    s_lo: float
    length_mm: float  # anatomical mm per unit of s

    @property
    def s(self) -> np.ndarray:
        """The body coordinate of every slice."""
        return self.s_lo + self.z / self.length_mm

    def z_of(self, s: float) -> float:
        """The z (anatomical mm) of body coordinate `s`."""
        return (s - self.s_lo) * self.length_mm

    def slab(self, s_lo: float, s_hi: float) -> slice:
        """The slices whose body coordinate lies in [s_lo, s_hi] (possibly empty)."""
        return span(self.z, self.z_of(s_lo), self.z_of(s_hi))

    def ellipsoid(
        self, centre_zyx: Sequence[float], radii_zyx: Sequence[float]
    ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """(bounding-box slices, boolean mask on that box), or None when outside the volume."""
        found = self.ellipsoid_r2(centre_zyx, radii_zyx)
        return None if found is None else (found[0], found[1] <= 1.0)

    def ellipsoid_r2(
        self, centre_zyx: Sequence[float], radii_zyx: Sequence[float]
    ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """(bounding-box slices, squared normalised radius on that box: <= 1 inside), or None."""
        boxes = tuple(
            span(axis, c - r, c + r)
            for axis, c, r in zip((self.z, self.y, self.x), centre_zyx, radii_zyx, strict=True)
        )
        if any(b.stop <= b.start for b in boxes):
            return None
        terms = [
            ((axis[b] - c) / r).astype(np.float32) ** 2
            for axis, b, c, r in zip((self.z, self.y, self.x), boxes, centre_zyx, radii_zyx, strict=True)
        ]
        r2 = terms[0][:, None, None] + terms[1][None, :, None] + terms[2][None, None, :]
        return boxes, r2  # type: ignore[return-value]

    def ellipse_slab(self, zs: slice, cx, cy, rx, ry) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """Per-slice ellipses on slab `zs` (centres/radii: scalars or arrays over the slab).

        Returns (slices, mask) on the in-plane bounding box of all the slab's ellipses.
        """
        nz = zs.stop - zs.start
        cx, cy, rx, ry = (np.broadcast_to(np.asarray(v, np.float32), (nz,)) for v in (cx, cy, rx, ry))
        ys = span(self.y, float((cy - ry).min()), float((cy + ry).max())) if nz else slice(0, 0)
        xs = span(self.x, float((cx - rx).min()), float((cx + rx).max())) if nz else slice(0, 0)
        col = lambda v: v[:, None, None]  # noqa: E731
        tx = ((self.x[None, None, xs] - col(cx)) / col(rx)) ** 2
        ty = ((self.y[None, ys, None] - col(cy)) / col(ry)) ** 2
        return (zs, ys, xs), tx + ty <= 1.0
