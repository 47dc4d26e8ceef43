"""The volume a phantom is painted into: HU and label arrays, the body geometry shared by every painter,
and the painting primitives (ellipses, ellipsoids, masks, random voxels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slicefm.phantom.geometry import Grid
from slicefm.phantom.patient import Habitus
from slicefm.phantom.records import FINDING_INDEX, ORGAN_INDEX


def _sub(arr: np.ndarray, where: tuple[slice, ...]) -> np.ndarray:
    """`arr[where]`, leaving broadcast (length-1) axes whole."""
    return arr[tuple(w if n > 1 else slice(None) for w, n in zip(where, arr.shape, strict=True))]


Shape = tuple[tuple[slice, slice, slice], np.ndarray] | None  # (bounding box, mask on it)


class Canvas:
    """One phantom being painted: float32 HU and uint8 organ / finding / lesion label volumes [z, y, x].

    anatomy.paint_anatomy paints the body (and sets `inner_wall` and `cavity`), findings.paint_findings
    the findings, lesions.add_lesions the lesions; all draw from `rng` in that fixed order.
    """

    inner_wall: np.ndarray  # bool [z, y, x]: inside the subcutaneous fat (muscle and deeper)
    cavity: np.ndarray  # bool [z, y, x]: the thoracic / abdominal cavity

    def __init__(
        self,
        rng: np.random.Generator,
        grid: Grid,
        habitus: Habitus,
        findings: dict[str, int],
        extra: dict[str, int],
        contrast: bool,
        centre_xy: tuple[float, float],
        spacing_anat: tuple[float, float, float],
    ) -> None:
        self.rng, self.g, self.h = rng, grid, habitus
        self.findings, self.extra, self.contrast = findings, extra, contrast
        self.spacing_anat = spacing_anat
        self.shape = (grid.z.size, grid.y.size, grid.x.size)
        self.hu = np.full(self.shape, -1000.0, np.float32)
        self.organ = np.zeros(self.shape, np.uint8)
        self.finding = np.zeros(self.shape, np.uint8)
        self.lesion = np.zeros(self.shape, np.uint8)
        self.xc, self.yc = centre_xy
        self._derive_geometry()

    def _derive_geometry(self) -> None:
        """Sizes and positions shared by several structures (anatomical mm, +y posterior, +x left)."""
        h, s, L = self.h, self.g.s, self.g.length_mm
        widths = [0.97, 0.95, 0.9, 0.97, 1.0, 1.0, 0.9]
        # Semi-axes of the body outline per slice (arrays over z): lateral (x) and antero-posterior (y).
        self.body_rx = h.half_width * np.interp(s, [0, 0.2, 0.35, 0.55, 0.85, 0.97, 1.0], widths)
        bulge = np.interp(
            s, [0, 0.15, 0.35, 0.5, 0.6, 1.0], [0.95, 1.0, 1 + h.belly, 1 + 0.6 * h.belly, 1, 0.95]
        )
        self.body_ry = h.half_width * h.depth_ratio * bulge
        self.wall = 2.0 + h.fat_mm  # skin + subcutaneous fat
        # Semi-axes of the body cavity (thorax / abdomen) per slice: inside fat and muscle.
        self.cavity_rx = self.body_rx - self.wall - h.muscle_mm
        self.cavity_ry = self.body_ry - self.wall - h.muscle_mm
        # The cavity semi-axes at chest level (scalars): organ sizes and positions are scaled by these.
        self.chest_cavity_rx = float(h.half_width - self.wall - h.muscle_mm)
        self.chest_cavity_ry = float(h.half_width * h.depth_ratio - self.wall - h.muscle_mm)
        chest_rx, chest_ry = self.chest_cavity_rx, self.chest_cavity_ry
        self.r_v = float(np.clip(0.17 * chest_ry, 12.0, 20.0))
        # The vertebral body bulges into the cavity; lungs wrap round it in the paravertebral gutters.
        self.y_v = self.yc + chest_ry - self.r_v - 24.0
        self.s_dia = h.s_dia
        self.s_car = min(h.s_dia + 0.24, 0.9)
        self.s_arch = min(h.s_dia + 0.27, 0.93)
        self.trachea_xy = (self.xc, self.y_v - self.r_v - 20.0)
        self.r_ao = 11.0 * h.organ_scale
        self.desc_ao = (self.xc + 0.9 * self.r_v, self.y_v - self.r_v - 0.6 * self.r_ao)
        self.asc_ao = (self.xc + 0.08 * chest_rx, self.yc - 0.25 * chest_ry)
        card = float(self.rng.uniform(1.25, 1.4)) if self.findings["cardiomegaly"] else 1.0
        self.heart_c = (self.g.z_of(h.s_dia + 0.085), self.yc - 0.28 * chest_ry, self.xc + 0.15 * chest_rx)
        self.heart_r = tuple(card * h.organ_scale * r for r in (0.1 * L, 0.5 * chest_ry, 0.45 * chest_rx))
        # Lungs: (cx, cy, rx, ry, dome shift) per side; the right dome sits higher over the liver.
        cy, rx, ry = self.yc + 0.05 * chest_ry, 0.52 * chest_rx, 1.0 * chest_ry
        self.lungs = {
            "lung_right": (self.xc - 0.5 * chest_rx, cy, rx, ry, 0.02),
            "lung_left": (self.xc + 0.5 * chest_rx, cy, rx, ry, 0.0),
        }

    # -- painting primitives --
    def paint(self, shape: Shape, hu: float | np.ndarray, organ: str | None = None, within=None) -> Shape:
        """Set HU (scalar or array on the box) and organ label inside `shape` (and `within`)."""
        if shape is None:
            return None
        where, mask = shape
        if within is not None:
            mask = mask & _sub(within, where)
        self.hu[where][mask] = hu[mask] if isinstance(hu, np.ndarray) else hu
        if organ is not None:
            self.organ[where][mask] = ORGAN_INDEX[organ]
        return where, mask

    def slab(self, s_lo: float, s_hi: float) -> slice | None:
        """The slices with body coordinate in [s_lo, s_hi], or None when there are none."""
        zs = self.g.slab(s_lo, s_hi)
        return zs if zs.stop > zs.start else None

    def ellipses(self, zs: slice | None, cx, cy, rx, ry) -> Shape:
        """Per-slice ellipses on slab `zs` (see Grid.ellipse_slab); None for no slab."""
        return None if zs is None else self.g.ellipse_slab(zs, cx, cy, rx, ry)

    def full(self, shape: Shape) -> np.ndarray:
        """`shape` as a whole-volume boolean mask."""
        out = np.zeros(self.shape, bool)
        if shape is not None:
            out[shape[0]] = shape[1]
        return out

    def mark(self, shape: Shape, finding: str) -> None:
        """Label `shape` as `finding` in the finding mask."""
        if shape is not None:
            self.finding[shape[0]][shape[1]] = FINDING_INDEX[finding]

    def free(self, *organs: str) -> np.ndarray:
        """Voxels of these organs not yet taken by a finding or lesion."""
        return (
            np.isin(self.organ, [ORGAN_INDEX[n] for n in organs]) & (self.finding == 0) & (self.lesion == 0)
        )

    def random_voxel(
        self, mask: np.ndarray, z_weight: np.ndarray | None = None
    ) -> tuple[int, int, int] | None:
        """A random voxel of `mask` (weighted by slice with `z_weight`), or None when `mask` is empty."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return None
        p = None
        if z_weight is not None:
            w = z_weight[idx // (self.shape[1] * self.shape[2])]
            p = w / w.sum() if w.sum() > 0 else None
        flat = int(self.rng.choice(idx, p=p))
        return tuple(int(v) for v in np.unravel_index(flat, self.shape))  # type: ignore[return-value]

    def centre_mm(self, voxel: Sequence[int]) -> tuple[float, float, float]:
        """The (z, y, x) anatomical-mm coordinates of a voxel's centre."""
        return (float(self.g.z[voxel[0]]), float(self.g.y[voxel[1]]), float(self.g.x[voxel[2]]))

    def nearest_voxel(self, centre_mm: Sequence[float]) -> tuple[int, int, int] | None:
        """The voxel containing the point `centre_mm`, or None when it is outside the volume."""
        idx = tuple(
            int(np.argmin(np.abs(axis - c)))
            for axis, c in zip((self.g.z, self.g.y, self.g.x), centre_mm, strict=True)
        )
        inside = all(
            abs(axis[i] - c) <= d
            for axis, i, c, d in zip(
                (self.g.z, self.g.y, self.g.x), idx, centre_mm, self.spacing_anat, strict=True
            )
        )
        return idx if inside else None  # type: ignore[return-value]

    def blob(
        self, voxel, radii, hu: float, within: np.ndarray, finding: str, organ: str | None = None
    ) -> None:
        """An ellipsoid finding around `voxel` (which is inside it), restricted to `within`."""
        shape = self.paint(self.g.ellipsoid(self.centre_mm(voxel), radii), hu, organ, within=within)
        self.mark(shape, finding)
