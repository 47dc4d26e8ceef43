"""Synthetic CT phantoms: anatomically plausible HU volumes with organ, lesion and finding masks.

Every array is in the canonical orientation of slicefm.io.volume: ``[z, y, x]`` with slice 0 at the
feet end, row 0 anterior and column 0 on the patient's right (so the liver sits at LOW column
indices). Anatomy is laid out on a body coordinate ``s`` (0 = pelvis floor, ~0.6 = diaphragm,
1 = above the lung apices) and in anatomical millimetres in-plane; every structure is an ellipse,
ellipsoid or smooth random field evaluated by numpy broadcasting on its bounding box, so a
128 x 128 x 96 volume takes ~0.15 s on one core.

Randomness comes only from the ``numpy.random.Generator`` passed in: the same seed gives the same
volume, bit for bit. Patient habitus (body size, fat, organ sizes) comes from a per-patient seed,
so two scans of one patient share a body and differ in scanner set-up, lesions and findings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from slicefm.phantom import portable_math

logger = logging.getLogger(__name__)

# DeepLesion coarse lesion types 1..8, in the published order.
LESION_TYPES = ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft_tissue", "pelvis")
# The eight RadChest-style chest abnormalities CLEAR's Task 2 predicts.
CHEST_FINDINGS = (
    "nodule",
    "emphysema",
    "pleural_effusion",
    "opacity",
    "calcification",
    "atelectasis",
    "cardiomegaly",
    "lymphadenopathy",
)
# Further phantom features, so more of CT-RATE's 18 classes carry image signal.
EXTRA_FINDINGS = (
    "coronary_calcification",
    "arterial_calcification",
    "pericardial_effusion",
    "consolidation",
    "medical_material",
    "hiatal_hernia",
)
# Values of PhantomScan.finding_mask (0 = none); calcification subtypes share "calcification".
FINDING_MASK_CLASSES = ("none", *CHEST_FINDINGS, *EXTRA_FINDINGS[2:])
ORGAN_CLASSES = (
    "background",
    "body_fat",
    "muscle",
    "lung_left",
    "lung_right",
    "airway",
    "spine",
    "ribs",
    "liver",
    "kidney_left",
    "kidney_right",
    "bladder",
    "heart",
    "aorta",
    "spleen",
    "bowel",
    "mediastinum",
    "pelvic_bone",
    "skin",
)
ORGAN_INDEX = {name: i for i, name in enumerate(ORGAN_CLASSES)}
_FINDING_INDEX = {name: i for i, name in enumerate(FINDING_MASK_CLASSES)}

# Body-coordinate range (s) each region covers, and its cranio-caudal extent in anatomical mm.
REGIONS = {"chest_abdomen": (0.0, 1.0), "chest": (0.44, 1.0)}
_EXTENT_MM = {"chest_abdomen": (360.0, 480.0), "chest": (260.0, 340.0)}
N_SLICES_RANGE = (24, 96)  # keeps test and demo volumes small
OUTSIDE_FOV_HU = -2000  # what scanners write outside the reconstruction circle
HU_RANGE = (-1024, 3071)  # 12-bit CT range; stored = HU + 1024 fits in [0, 4095]
_FOV_CIRCLE = 0.53  # reconstruction circle radius / FOV: only the corners fall outside
_FINDING_PROBABILITY = 0.3
_EXTRA_PROBABILITY = 0.15
_SOFT_TISSUE_HU = 40.0  # reference for lesions embedded in fat, bowel or muscle
_FLUID_HU = (0.0, 20.0)  # necrotic / cystic lesion cores: the darkest a soft-tissue lesion gets


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition and reconstruction settings of one (simulated) scanner."""

    name: str
    noise_sd_hu: float  # Gaussian quantum noise after the reconstruction kernel
    hu_offset: float  # calibration offset added to every tissue voxel
    blur_sigma_px: float  # in-plane Gaussian standing in for the reconstruction kernel
    fov_mm: tuple[float, float]  # display field of view range (enlarged when a body would not fit)
    slice_thickness_mm: tuple[float, float]  # sampled, then adjusted to keep n_slices in range
    manufacturer: str = "PhantomCT"
    model: str = "Phantom 64"
    kernel: str = "B30f"


DEFAULT_PROFILE = ScannerProfile("default", 15.0, 0.0, 0.6, (340.0, 440.0), (2.5, 5.0))
# The "second scanner" of the external cohort: noisier, smoother kernel, +6 HU miscalibration,
# wider FOV (smaller body in the image) and thinner slices.
SHIFTED_PROFILE = ScannerProfile(
    "shifted", 24.0, 6.0, 1.2, (400.0, 500.0), (1.0, 3.0), "OtherCT Systems", "Phantom 128", "STANDARD"
)
PROFILES = {p.name: p for p in (DEFAULT_PROFILE, SHIFTED_PROFILE)}


@dataclass(frozen=True)
class PatientInfo:
    """Patient-level attributes shared by all scans of one (fake) patient."""

    patient_id: str
    patient_name: str
    sex: str  # "M" | "F"
    age: int
    stage: int  # 0 = stage I-II, 1 = stage III-IV
    habitus_seed: int  # seeds body size and organ sizes, shared across the patient's scans


@dataclass
class PhantomLesion:
    """One DeepLesion-style lesion; voxel indices and boxes are in the canonical frame."""

    lesion_type: str
    type_index: int  # 1..8, DeepLesion's Coarse_lesion_type
    centre_zyx: tuple[int, int, int]
    radius_mm: float
    contrast_hu: float  # lesion HU minus its host tissue's reference HU
    key_slice: int  # canonical z index of the lesion centre
    box_xyxy: tuple[int, int, int, int]  # inclusive pixel indices (x0, y0, x1, y1) on key_slice


@dataclass
class PhantomScan:
    """One phantom CT with its ground truth."""

    hu: np.ndarray  # int16 [z, y, x], canonical orientation
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    organ_mask: np.ndarray  # uint8 [z, y, x], indices into ORGAN_CLASSES
    lesion_mask: np.ndarray  # uint8 [z, y, x], 0 or lesion number 1..n
    finding_mask: np.ndarray  # uint8 [z, y, x], indices into FINDING_MASK_CLASSES
    lesions: list[PhantomLesion]
    findings: dict[str, int]  # over CHEST_FINDINGS
    extra_findings: dict[str, int]  # over EXTRA_FINDINGS
    stage: int
    patient_id: str
    patient_name: str
    sex: str
    age: int
    study_index: int = 1  # 1-based index of this scan among the patient's scans
    region: str = "chest_abdomen"
    profile: str = "default"
    contrast: bool = True  # intravenous contrast phase
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)  # centre of voxel [0, 0, 0], LPS mm
    acquisition: dict[str, float] = field(default_factory=dict)  # fov_mm, anatomy_scale

    @property
    def location_labels(self) -> dict[str, int]:
        """1 for every DeepLesion location with at least one lesion."""
        present = {lesion.lesion_type for lesion in self.lesions}
        return {t: int(t in present) for t in LESION_TYPES}


# --- sampling of patients and scan set-up --------------------------------------------------------


def sample_patient(rng: np.random.Generator, patient_id: str | None = None) -> PatientInfo:
    """A fake patient: identifiers that look like PHI (for pseudonymisation tests), sex, age, stage."""
    letters = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), size=6))
    if patient_id is None:
        patient_id = f"PHA{int(rng.integers(1_000_000, 10_000_000)):07d}"
    return PatientInfo(
        patient_id=patient_id,
        patient_name=f"PHANTOM^{letters}",
        sex=str(rng.choice(["M", "F"])),
        age=int(rng.integers(35, 86)),
        stage=int(rng.random() < 0.5),
        habitus_seed=int(rng.integers(0, 2**31 - 1)),
    )


@dataclass(frozen=True)
class _Habitus:
    """Body shape in anatomical mm at scale 1 (sampled once per patient)."""

    half_width: float  # A: lateral semi-axis of the body outline
    depth_ratio: float  # B / A
    fat_mm: float
    muscle_mm: float
    belly: float  # abdominal bulge (fraction of B)
    s_dia: float  # diaphragm level on the body axis
    organ_scale: float
    bladder_fill: float

    @classmethod
    def sample(cls, seed: int, sex: str) -> _Habitus:
        rng = np.random.default_rng(seed)
        male = sex == "M"
        return cls(
            half_width=float(rng.uniform(150.0, 185.0) if male else rng.uniform(138.0, 172.0)),
            depth_ratio=float(rng.uniform(0.6, 0.72)),
            fat_mm=float(rng.uniform(6.0, 26.0)),
            muscle_mm=float(rng.uniform(7.0, 14.0)),
            belly=float(rng.uniform(0.0, 0.15)),
            s_dia=float(rng.uniform(0.56, 0.62)),
            organ_scale=float(rng.uniform(0.9, 1.1)),
            bladder_fill=float(rng.uniform(0.7, 1.25)),
        )


def _sample_findings(
    rng: np.random.Generator, stage: int, forced: Sequence[str] | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Independent findings (p ~ 0.3); nodes and effusion depend on stage (marginal p stays ~0.3).

    `forced` (names from CHEST_FINDINGS and EXTRA_FINDINGS) replaces the draw: exactly those are present.
    """
    p = dict.fromkeys(CHEST_FINDINGS, _FINDING_PROBABILITY)
    p["lymphadenopathy"] = 0.45 if stage else 0.15
    p["pleural_effusion"] = 0.4 if stage else 0.2
    drawn = {name: int(rng.random() < p[name]) for name in CHEST_FINDINGS}
    drawn |= {name: int(rng.random() < _EXTRA_PROBABILITY) for name in EXTRA_FINDINGS[2:]}
    coronary, arterial = int(rng.random() < 0.6), int(rng.random() < 0.6)
    if forced is not None:
        unknown = set(forced) - set(CHEST_FINDINGS) - set(EXTRA_FINDINGS)
        if unknown:
            raise ValueError(f"unknown findings {sorted(unknown)}")
        drawn = {name: int(name in forced) for name in drawn}
        coronary, arterial = int("coronary_calcification" in forced), int("arterial_calcification" in forced)
        drawn["calcification"] |= coronary | arterial
    if not drawn["calcification"]:
        coronary = arterial = 0
    elif not (coronary or arterial):
        coronary = arterial = 1
    findings = {name: drawn[name] for name in CHEST_FINDINGS}
    extra = {"coronary_calcification": coronary, "arterial_calcification": arterial}
    return findings, extra | {name: drawn[name] for name in EXTRA_FINDINGS[2:]}


# --- geometry ----------------------------------------------------------------------------------


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of ascending `coords` within [lo, hi]."""
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))


@dataclass
class _Grid:
    """Voxel-centre coordinates in anatomical mm (physical mm / anatomy scale)."""

    z: np.ndarray  # (Z,) from the bottom of the covered region
    y: np.ndarray  # (N,) from the image centre, + posterior
    x: np.ndarray  # (N,) from the image centre, + patient left
    s_lo: float
    length_mm: float  # anatomical mm per unit of s

    @property
    def s(self) -> np.ndarray:
        return self.s_lo + self.z / self.length_mm

    def z_of(self, s: float) -> float:
        return (s - self.s_lo) * self.length_mm

    def slab(self, s_lo: float, s_hi: float) -> slice:
        return _span(self.z, self.z_of(s_lo), self.z_of(s_hi))

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
            _span(axis, c - r, c + r)
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
        ys = _span(self.y, float((cy - ry).min()), float((cy + ry).max())) if nz else slice(0, 0)
        xs = _span(self.x, float((cx - rx).min()), float((cx + rx).max())) if nz else slice(0, 0)
        col = lambda v: v[:, None, None]  # noqa: E731
        tx = ((self.x[None, None, xs] - col(cx)) / col(rx)) ** 2
        ty = ((self.y[None, ys, None] - col(cy)) / col(ry)) ** 2
        return (zs, ys, xs), tx + ty <= 1.0


def _upsample_axis(coarse: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of `coarse` along `axis` onto n_out samples spanning its nodes."""
    n_in = coarse.shape[axis]
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(np.intp), 0, n_in - 2)
    w = (pos - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(coarse.ndim)])
    return np.take(coarse, lo, axis=axis) * (1.0 - w) + np.take(coarse, lo + 1, axis=axis) * w


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: Sequence[int]) -> np.ndarray:
    """Unit-variance random field: coarse Gaussian noise, trilinearly upsampled to `shape`.

    Separable gather-and-lerp (no BLAS: its threads thrash on small shared machines).
    """
    field = rng.standard_normal(tuple(max(2, int(c)) for c in cells), dtype=np.float32)
    for axis in (2, 1, 0):  # smallest intermediate arrays first
        field = _upsample_axis(field, shape[axis], axis)
    return field / max(float(field.std()), 1e-6)


def _sub(arr: np.ndarray, where: tuple[slice, ...]) -> np.ndarray:
    """`arr[where]`, leaving broadcast (length-1) axes whole."""
    return arr[tuple(w if n > 1 else slice(None) for w, n in zip(where, arr.shape, strict=True))]


def _cells(shape: tuple[int, ...], spacing: Sequence[float], cell_mm: float) -> list[int]:
    return [int(math.ceil(n * d / cell_mm)) + 1 for n, d in zip(shape, spacing, strict=True)]


def _cos_7theta_plus(y: np.ndarray, x: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """cos(7 * atan2(y, x) + phase) from Chebyshev polynomials of the angle's cosine and sine.

    Basic arithmetic only: numpy's arctan2 / cos round differently per CPU (see portable_math).
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    r = np.maximum(np.sqrt(x * x + y * y), 1e-12)
    c, s = x / r, y / r
    c2 = c * c
    cos7 = (((64.0 * c2 - 112.0) * c2 + 56.0) * c2 - 7.0) * c  # T7(cos)
    sin7 = (((64.0 * c2 - 80.0) * c2 + 24.0) * c2 - 1.0) * s  # sin * U6(cos)
    return cos7 * portable_math.cos(phase) - sin7 * portable_math.sin(phase)


# --- the builder ---------------------------------------------------------------------------------

_Shape = tuple[tuple[slice, slice, slice], np.ndarray] | None  # (bounding box, mask on it)


class _Builder:
    """Paints one phantom: anatomy, then findings (lesions are placed by _add_lesions)."""

    def __init__(
        self,
        rng: np.random.Generator,
        grid: _Grid,
        habitus: _Habitus,
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
        self.A = h.half_width * np.interp(s, [0, 0.2, 0.35, 0.55, 0.85, 0.97, 1.0], widths)
        bulge = np.interp(
            s, [0, 0.15, 0.35, 0.5, 0.6, 1.0], [0.95, 1.0, 1 + h.belly, 1 + 0.6 * h.belly, 1, 0.95]
        )
        self.B = h.half_width * h.depth_ratio * bulge
        self.wall = 2.0 + h.fat_mm  # skin + subcutaneous fat
        self.A_c = self.A - self.wall - h.muscle_mm  # body cavity (thorax / abdomen)
        self.B_c = self.B - self.wall - h.muscle_mm
        self.Ac = float(h.half_width - self.wall - h.muscle_mm)  # chest-level references
        self.Bc = float(h.half_width * h.depth_ratio - self.wall - h.muscle_mm)
        self.r_v = float(np.clip(0.17 * self.Bc, 12.0, 20.0))
        # The vertebral body bulges into the cavity; lungs wrap round it in the paravertebral gutters.
        self.y_v = self.yc + self.Bc - self.r_v - 24.0
        self.s_dia = h.s_dia
        self.s_car = min(h.s_dia + 0.24, 0.9)
        self.s_arch = min(h.s_dia + 0.27, 0.93)
        self.trachea_xy = (self.xc, self.y_v - self.r_v - 20.0)
        self.r_ao = 11.0 * h.organ_scale
        self.desc_ao = (self.xc + 0.9 * self.r_v, self.y_v - self.r_v - 0.6 * self.r_ao)
        self.asc_ao = (self.xc + 0.08 * self.Ac, self.yc - 0.25 * self.Bc)
        card = float(self.rng.uniform(1.25, 1.4)) if self.findings["cardiomegaly"] else 1.0
        self.heart_c = (self.g.z_of(h.s_dia + 0.085), self.yc - 0.28 * self.Bc, self.xc + 0.15 * self.Ac)
        self.heart_r = tuple(card * h.organ_scale * r for r in (0.1 * L, 0.5 * self.Bc, 0.45 * self.Ac))
        # Lungs: (cx, cy, rx, ry, dome shift) per side; the right dome sits higher over the liver.
        cy, rx, ry = self.yc + 0.05 * self.Bc, 0.52 * self.Ac, 1.0 * self.Bc
        self.lungs = {
            "lung_right": (self.xc - 0.5 * self.Ac, cy, rx, ry, 0.02),
            "lung_left": (self.xc + 0.5 * self.Ac, cy, rx, ry, 0.0),
        }

    # -- painting primitives --
    def paint(self, shape: _Shape, hu: float | np.ndarray, organ: str | None = None, within=None) -> _Shape:
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
        zs = self.g.slab(s_lo, s_hi)
        return zs if zs.stop > zs.start else None

    def ellipses(self, zs: slice | None, cx, cy, rx, ry) -> _Shape:
        return None if zs is None else self.g.ellipse_slab(zs, cx, cy, rx, ry)

    def full(self, shape: _Shape) -> np.ndarray:
        out = np.zeros(self.shape, bool)
        if shape is not None:
            out[shape[0]] = shape[1]
        return out

    def mark(self, shape: _Shape, finding: str) -> None:
        if shape is not None:
            self.finding[shape[0]][shape[1]] = _FINDING_INDEX[finding]

    # -- anatomy --
    def build_anatomy(self) -> None:
        self._table()
        self._body_wall()
        self._abdominal_organs()
        self._pelvic_bones()
        self._lungs()
        self._mediastinum()
        self._airways()
        self._spine()
        self._ribs()

    def _table(self) -> None:
        top = self.yc + float(self.B.max()) + 12.0
        ys = _span(self.g.y, top, top + 5.0)
        xs = _span(self.g.x, self.xc - 0.9 * self.h.half_width, self.xc + 0.9 * self.h.half_width)
        self.hu[:, ys, xs] = 80.0  # carbon-fibre couch: thin and moderately dense; label background

    def _body_wall(self) -> None:
        all_z, xc, yc, A, B = slice(0, self.shape[0]), self.xc, self.yc, self.A, self.B
        self.paint(self.ellipses(all_z, xc, yc, A, B), 40.0, "skin")
        self.paint(self.ellipses(all_z, xc, yc, A - 2.0, B - 2.0), -100.0, "body_fat")
        self.inner_wall = self.full(self.ellipses(all_z, xc, yc, A - self.wall, B - self.wall))
        self.hu[self.inner_wall], self.organ[self.inner_wall] = 50.0, ORGAN_INDEX["muscle"]
        self.cavity = self.full(self.ellipses(all_z, xc, yc, self.A_c, self.B_c))
        above = (self.g.s >= self.s_dia)[:, None, None]
        chest = self.cavity & above
        self.hu[chest], self.organ[chest] = -60.0, ORGAN_INDEX["mediastinum"]  # fat; lungs come later
        self._bowel(self.cavity & ~above)

    def _bowel(self, region: np.ndarray) -> None:
        """Abdominal cavity: bowel loops (~25 HU), visceral fat (-100 HU) and gas pockets."""
        present = np.flatnonzero(region.any(axis=(1, 2)))
        if present.size == 0:
            return
        zs = slice(0, int(present[-1]) + 1)
        sub = region[zs]
        loops = _smooth_field(self.rng, sub.shape, _cells(sub.shape, self.spacing_anat, 18.0))
        gas = _smooth_field(self.rng, sub.shape, _cells(sub.shape, self.spacing_anat, 14.0))
        fat_fraction = float(np.clip(0.15 + self.h.fat_mm / 60.0, 0.15, 0.55))
        is_fat = loops < portable_math.ndtri(fat_fraction)
        hu = np.where(is_fat, np.float32(-100.0), np.float32(25.0) + 6.0 * loops)
        hu = np.where(~is_fat & (gas > 2.0), np.float32(-950.0), hu)
        box = (zs, slice(None), slice(None))
        self.paint((box, sub & ~is_fat), hu, "bowel")
        self.paint((box, sub & is_fat), hu, "body_fat")  # visceral fat

    def _abdominal_organs(self) -> None:
        g, h, L, o, c = self.g, self.h, self.g.length_mm, self.h.organ_scale, self.contrast
        liver = ((g.z_of(self.s_dia - 0.07), self.yc - 0.02 * self.Bc, self.xc - 0.33 * self.Ac),)
        liver += ((0.12 * L * o, 0.85 * self.Bc, 0.62 * self.Ac * o),)
        self.paint(g.ellipsoid(*liver), 95.0 if c else 60.0, "liver", within=self.cavity)
        spleen = (g.z_of(self.s_dia - 0.06), self.yc + 0.45 * self.Bc, self.xc + 0.6 * self.Ac)
        self.paint(
            g.ellipsoid(spleen, (0.06 * L * o, 0.3 * self.Bc, 0.2 * self.Ac)),
            100.0 if c else 50.0,
            "spleen",
            within=self.cavity,
        )
        for side, sign, shift in (("kidney_right", -1.0, -0.02), ("kidney_left", 1.0, 0.0)):
            centre = (
                g.z_of(self.s_dia - 0.2 + shift),
                self.y_v + 0.3 * self.r_v,
                self.xc + sign * (self.r_v + 38.0),
            )
            self.paint(g.ellipsoid(centre, (0.1 * L * o, 24.0 * o, 22.0 * o)), 150.0 if c else 32.0, side)
        f = h.bladder_fill
        bladder = (
            (g.z_of(0.07), self.yc - 0.3 * self.Bc, self.xc),
            (0.07 * L * f, 0.35 * self.Bc * f, 0.28 * self.Ac * f),
        )
        self.paint(g.ellipsoid(*bladder), 10.0, "bladder", within=self.cavity)

    def _bone(self, zs: slice | None, cx, cy, rx, ry, organ: str, cortex_mm: float = 2.5) -> None:
        """Cortical shell (~700 HU) around cancellous bone (~250 HU)."""
        self.paint(self.ellipses(zs, cx, cy, rx, ry), 700.0, organ)
        self.paint(self.ellipses(zs, cx, cy, rx - cortex_mm, ry - cortex_mm), 250.0, organ)

    def _pelvic_bones(self) -> None:
        wings, heads = self.slab(0.12, 0.26), self.slab(0.0, 0.12)
        for sign in (-1.0, 1.0):
            self._bone(
                wings,
                self.xc + sign * 0.62 * self.Ac,
                self.yc + 0.25 * self.Bc,
                10.0,
                0.42 * self.Bc,
                "pelvic_bone",
            )
            self._bone(
                heads, self.xc + sign * 0.55 * self.Ac, self.yc + 0.05 * self.Bc, 22.0, 22.0, "pelvic_bone"
            )

    def _lungs(self) -> None:
        g, zs = self.g, self.slab(self.s_dia - 0.06, 0.96)
        if zs is None:
            return
        s = g.s[zs][:, None, None].astype(np.float32)
        taper = np.sqrt(np.clip((0.96 - s) / 0.1, 0.0, 1.0))  # apices narrow to a cone
        cavity = self.cavity[zs]
        X, Y = g.x[None, None, :], g.y[None, :, None]
        cells = _cells(cavity.shape, self.spacing_anat, 14.0)
        f1, f2 = (_smooth_field(self.rng, cavity.shape, cells) for _ in range(2))
        # Where two smooth fields are both near zero lies a random curve: tube-like vessels.
        tube = np.clip(1.0 - np.sqrt(f1**2 + f2**2) / 0.35, 0.0, 1.0)
        box = (zs, slice(None), slice(None))
        for name, (cx, cy, rx, ry, dome_shift) in self.lungs.items():
            rx_s, ry_s = rx * taper + 1e-3, ry * np.minimum(taper * 1.2, 1.0) + 1e-3
            q = ((X - cx) / rx_s) ** 2 + ((Y - cy) / ry_s) ** 2
            # Domed base: lowest at the periphery and posteriorly (costophrenic recesses).
            base = self.s_dia + dome_shift + 0.05 * (1.0 - np.minimum(q, 1.0)) - 0.03 * (Y - cy) / ry
            mask = (q <= 1.0) & (s >= base) & cavity
            hu = -860.0 + 30.0 * np.clip((Y - cy) / ry, -1.0, 1.0) + 880.0 * tube  # dependent lung denser
            self.paint((box, mask), hu.astype(np.float32), name)

    def _mediastinum(self) -> None:
        g, c = self.g, self.contrast
        zs = self.slab(self.s_dia, 1.0)
        if zs is not None:  # central band between the lungs
            half = self.Ac * np.interp(g.s[zs], [self.s_dia, self.s_dia + 0.2, 1.0], [0.2, 0.17, 0.12])
            self.paint(
                self.ellipses(zs, self.xc + 0.03 * self.Ac, self.yc, half, 1.05 * self.Bc),
                -60.0,
                "mediastinum",
                within=self.cavity,
            )
        paraspinal = self.slab(0.0, 1.0)
        for sign in (-1.0, 1.0):  # erector spinae: replace lung/fat behind the ribs' necks
            shape = self.ellipses(
                paraspinal, self.xc + sign * (self.r_v + 14.0), self.y_v + self.r_v + 18.0, 20.0, 22.0
            )
            self.paint(shape, 50.0, "muscle", within=self.inner_wall)
        above = (g.s >= self.s_dia)[:, None, None]
        heart = self.paint(g.ellipsoid(self.heart_c, self.heart_r), 45.0, "heart", within=self.cavity & above)
        if self.findings["cardiomegaly"]:
            self.mark(heart, "cardiomegaly")
        inner = tuple(0.72 * r for r in self.heart_r)
        self.paint(g.ellipsoid(self.heart_c, inner), 150.0 if c else 42.0, "heart", within=above)
        ao_hu = 180.0 if c else 40.0
        self.paint(
            self.ellipses(self.slab(0.2, self.s_arch), *self.desc_ao, self.r_ao, self.r_ao), ao_hu, "aorta"
        )
        r_asc = 1.1 * self.r_ao
        self.paint(
            self.ellipses(self.slab(self.s_dia + 0.1, self.s_arch), *self.asc_ao, r_asc, r_asc),
            ao_hu,
            "aorta",
        )
        arch = self.slab(self.s_arch - 0.015, self.s_arch + 0.02)
        for t in np.linspace(0.0, 1.0, 9):
            cx = (1 - t) * self.asc_ao[0] + t * self.desc_ao[0]
            cy = (1 - t) * self.asc_ao[1] + t * self.desc_ao[1]
            self.paint(self.ellipses(arch, cx, cy, self.r_ao, self.r_ao), ao_hu, "aorta")
        esophagus = self.slab(self.s_dia - 0.03, 1.0)
        self.paint(
            self.ellipses(esophagus, self.xc + 4.0, self.y_v - self.r_v - 7.0, 7.0, 6.0), 40.0, "mediastinum"
        )

    def _airways(self) -> None:
        tx, ty = self.trachea_xy
        trachea = self.slab(self.s_car, 1.0)
        self.paint(self.ellipses(trachea, tx, ty, 11.0, 10.0), 40.0, "mediastinum")  # cartilage wall
        self.paint(self.ellipses(trachea, tx, ty, 9.0, 8.0), -1000.0, "airway")
        bronchi = self.slab(self.s_car - 0.06, self.s_car)
        if bronchi is not None:
            spread = (self.s_car - self.g.s[bronchi]) / 0.06 * 0.3 * self.Ac
            for sign in (-1.0, 1.0):
                self.paint(self.ellipses(bronchi, tx + sign * spread, ty + 4.0, 6.0, 6.0), -1000.0, "airway")

    def _spine(self) -> None:
        all_z, x, y, r = slice(0, self.shape[0]), self.xc, self.y_v, self.r_v
        self._bone(all_z, x, y, r, 0.9 * r, "spine")
        # Intervertebral discs every ~28 mm give the spine a z rhythm.
        disc = self.ellipses(all_z, x, y, r - 2.5, 0.9 * r - 2.5)
        self.paint(disc, 90.0, "spine", within=((self.g.z % 28.0) < 6.0)[:, None, None])
        canal_y = y + 0.9 * r + 9.0
        self.paint(self.ellipses(all_z, x, canal_y, 11.0, 10.0), 450.0, "spine")  # neural arch
        self.paint(self.ellipses(all_z, x, canal_y + 20.0, 5.0, 12.0), 450.0, "spine")  # spinous process
        for sign in (-1.0, 1.0):
            self.paint(self.ellipses(all_z, x + sign * (r + 8.0), canal_y - 2.0, 10.0, 5.0), 450.0, "spine")
        self.paint(self.ellipses(all_z, x, canal_y, 7.0, 6.0), 15.0, "spine")  # CSF in the canal

    def _ribs(self) -> None:
        g, zs = self.g, self.slab(self.s_dia - 0.1, 0.97)
        if zs is None:
            return
        width = min(9.0, self.h.muscle_mm)
        A, B = self.A_c[zs].astype(np.float32), self.B_c[zs].astype(np.float32)
        (_, ys, xs), outer = self.ellipses(zs, self.xc, self.yc, A + width, B + width)
        X, Y = g.x[None, None, xs] - self.xc, g.y[None, ys, None] - self.yc
        inner = (X / (A[:, None, None] + 0.5)) ** 2 + (Y / (B[:, None, None] + 0.5)) ** 2 <= 1.0
        k, i, j = np.nonzero(outer & ~inner)  # the chest-wall ring the ribs live in
        X, Y = X[0, 0, j], Y[0, i, 0]
        # Ribs slope caudally towards the front, so their cross-sections move round with z.
        phase = (2.0 * np.pi / 30.0) * g.z[zs]
        keep = (_cos_7theta_plus(Y / B[k], np.abs(X) / A[k], phase[k]) > 0.6) & (np.abs(X) > self.r_v + 14.0)
        keep &= (np.abs(X) > 28.0) | (Y > 0)  # costal cartilage gap beside the sternum
        rib = np.zeros_like(outer)
        rib[k[keep], i[keep], j[keep]] = True
        self.paint(((zs, ys, xs), rib), 550.0, "ribs")
        sternum = self.slab(self.s_dia + 0.02, 0.95)
        if sternum is not None:
            y_st = self.yc - self.B_c[sternum] - 0.5 * self.h.muscle_mm
            self.paint(self.ellipses(sternum, self.xc, y_st, 15.0, 5.0), 450.0, "ribs")

    # -- findings --
    def build_findings(self) -> None:
        f, e = self.findings, self.extra
        steps = (
            (f["emphysema"], self._emphysema),
            (f["opacity"], self._opacity),
            (e["consolidation"], self._consolidation),
            (f["pleural_effusion"], self._effusion),
            (f["atelectasis"], self._atelectasis),
            (f["nodule"], self._nodules),
            (f["lymphadenopathy"], self._lymph_nodes),
            (e["pericardial_effusion"], self._pericardial_effusion),
            (e["hiatal_hernia"], self._hiatal_hernia),
            (f["calcification"], self._calcifications),
            (e["medical_material"], self._medical_material),
        )
        for present, paint in steps:
            if present:
                paint()

    def free(self, *organs: str) -> np.ndarray:
        """Voxels of these organs not yet taken by a finding or lesion."""
        return (
            np.isin(self.organ, [ORGAN_INDEX[n] for n in organs]) & (self.finding == 0) & (self.lesion == 0)
        )

    def random_voxel(
        self, mask: np.ndarray, z_weight: np.ndarray | None = None
    ) -> tuple[int, int, int] | None:
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
        return (float(self.g.z[voxel[0]]), float(self.g.y[voxel[1]]), float(self.g.x[voxel[2]]))

    def nearest_voxel(self, centre_mm: Sequence[float]) -> tuple[int, int, int] | None:
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

    def _emphysema(self) -> None:
        upper = np.clip(self.g.s - self.s_dia, 0.0, None)  # centrilobular emphysema favours upper lobes
        for _ in range(int(self.rng.integers(3, 8))):
            lungs = self.free("lung_left", "lung_right")
            v = self.random_voxel(lungs, z_weight=upper)
            if v is not None:
                r = float(self.rng.uniform(10.0, 22.0))
                self.blob(v, (r, r, r), -965.0, lungs, "emphysema")

    def _opacity(self) -> None:
        for _ in range(int(self.rng.integers(1, 3))):
            lungs = self.free("lung_left", "lung_right")
            v = self.random_voxel(lungs)
            found = (
                None if v is None else self.g.ellipsoid(self.centre_mm(v), self.rng.uniform(15.0, 32.0, 3))
            )
            if found is not None:
                where, mask = found
                mask &= lungs[where]
                # Ground glass raises the parenchyma to ~-500 HU but leaves the denser vessels visible.
                self.hu[where][mask] = np.maximum(self.hu[where][mask], -500.0)
                self.mark((where, mask), "opacity")

    def _consolidation(self) -> None:
        lungs = self.free("lung_left", "lung_right")
        v = self.random_voxel(lungs)
        if v is not None:
            self.blob(v, self.rng.uniform(15.0, 30.0, 3), 35.0, lungs, "consolidation")

    def _effusion(self) -> None:
        sides = (
            list(self.lungs)
            if self.rng.random() < 0.5
            else [("lung_right", "lung_left")[int(self.rng.integers(2))]]
        )
        for side in sides:
            lung = self.free(side)
            present = np.flatnonzero(lung.any(axis=(1, 2)))
            if present.size == 0:
                continue
            _, cy, _, ry, _ = self.lungs[side]
            depth, height = self.rng.uniform(0.3, 0.6), 0.25 * self.g.length_mm
            t = np.clip((self.g.z - self.g.z[present[0]]) / height, 0.0, 1.0)[:, None, None]
            # Free fluid layers in the dependent (posterior) pleural space, thinning upwards.
            mask = lung & (self.g.y[None, :, None] >= cy + ry * (1.0 - 2.0 * depth * (1.0 - t)))
            self.hu[mask] = 10.0
            self.finding[mask] = _FINDING_INDEX["pleural_effusion"]

    def _atelectasis(self) -> None:
        side = ("lung_right", "lung_left")[int(self.rng.integers(2))]
        lung = self.free(side)
        present = np.flatnonzero(lung.any(axis=(1, 2)))
        if present.size == 0:
            return
        _, cy, rx, ry, _ = self.lungs[side]
        top = present[0] + max(1, (present[-1] - present[0]) // 6)
        base = lung & (np.arange(self.shape[0]) <= top)[:, None, None] & (self.g.y[None, :, None] > cy)
        v = self.random_voxel(base if base.any() else lung)
        self.blob(v, (float(self.rng.uniform(6.0, 10.0)), 0.25 * ry, 0.5 * rx), 30.0, lung, "atelectasis")

    def _nodules(self) -> None:
        for _ in range(int(self.rng.integers(1, 4))):
            lungs = self.free("lung_left", "lung_right")
            v = self.random_voxel(lungs)
            if v is not None:
                r = float(self.rng.uniform(2.0, 5.0))
                self.blob(v, (r, r, r), float(self.rng.uniform(10.0, 60.0)), lungs, "nodule")

    def _lymph_nodes(self) -> None:
        tx, ty, z = *self.trachea_xy, self.g.z_of
        stations = [
            (z(self.s_car + 0.04), ty, tx - 16.0),  # right paratracheal
            (z(self.s_car - 0.04), ty + 6.0, tx + 2.0),  # subcarinal
            (z(self.s_car - 0.03), self.yc, self.xc - 0.3 * self.Ac),  # right hilum
            (z(self.s_car - 0.03), self.yc, self.xc + 0.3 * self.Ac),  # left hilum
            (z(self.s_car + 0.015), ty - 12.0, tx + 24.0),  # aortopulmonary window
        ]
        host = self.free("mediastinum", "lung_left", "lung_right")
        for i in self.rng.choice(len(stations), size=int(self.rng.integers(1, 4)), replace=False):
            r = float(self.rng.uniform(7.5, 12.5))
            centre = np.asarray(stations[i]) + self.rng.normal(0.0, 3.0, 3)
            shape = self.paint(
                self.g.ellipsoid(centre, (r, r, r)),
                float(self.rng.uniform(35.0, 55.0)),
                "mediastinum",
                within=host,
            )
            self.mark(shape, "lymphadenopathy")

    def _pericardial_effusion(self) -> None:
        above = (self.g.s >= self.s_dia)[:, None, None]
        host = self.free("mediastinum", "lung_left", "lung_right") & above
        shape = self.paint(
            self.g.ellipsoid(self.heart_c, tuple(1.15 * r for r in self.heart_r)),
            12.0,
            "mediastinum",
            within=host,
        )
        self.mark(shape, "pericardial_effusion")

    def _hiatal_hernia(self) -> None:
        r = float(self.rng.uniform(16.0, 24.0))
        centre = (self.g.z_of(self.s_dia + 0.03), self.y_v - self.r_v - 14.0, self.xc + 8.0)
        found = self.g.ellipsoid(centre, (r, r, r))
        if found is None:
            return
        where, mask = found
        mask &= ~np.isin(self.organ[where], [ORGAN_INDEX[n] for n in ("spine", "aorta", "ribs", "airway")])
        # Herniated stomach: gas above an air-fluid level.
        gas = (self.g.z[where[0]] > centre[0])[:, None, None]
        hu = np.where(gas, np.float32(-950.0), np.float32(20.0)) * np.ones(mask.shape, np.float32)
        self.mark(self.paint((where, mask), hu, "bowel"), "hiatal_hernia")

    def _speck(self, centre_mm: Sequence[float]) -> None:
        """A calcified speck (~400-800 HU); always at least the voxel nearest to `centre_mm`."""
        hu, r = float(self.rng.uniform(400.0, 800.0)), float(self.rng.uniform(1.5, 3.0))
        self.mark(self.paint(self.g.ellipsoid(centre_mm, (r, r, r)), hu), "calcification")
        idx = self.nearest_voxel(centre_mm)
        if idx is not None:
            self.hu[idx], self.finding[idx] = hu, _FINDING_INDEX["calcification"]

    def _calcifications(self) -> None:
        if self.extra["coronary_calcification"]:
            for _ in range(int(self.rng.integers(2, 6))):
                # Coronary arteries run on the heart's anterior and left surface.
                theta, phi = self.rng.uniform(0.2, 1.3) * np.pi, self.rng.uniform(-0.4, 0.4)
                direction = np.array(
                    [portable_math.sin(phi), -portable_math.sin(theta), portable_math.cos(theta)]
                )
                self._speck(np.asarray(self.heart_c) + 0.95 * np.asarray(self.heart_r) * direction)
        zs = self.slab(0.25, self.s_arch)
        if self.extra["arterial_calcification"] and zs is not None:
            for _ in range(int(self.rng.integers(2, 6))):
                z = float(self.g.z[int(self.rng.integers(zs.start, zs.stop))])
                a = self.rng.uniform(0.0, 2 * np.pi)
                self._speck(
                    (
                        z,
                        self.desc_ao[1] + self.r_ao * float(portable_math.sin(a)),
                        self.desc_ao[0] + self.r_ao * float(portable_math.cos(a)),
                    )
                )

    def _medical_material(self) -> None:
        """A chest port in the right anterior wall, its catheter running to the superior vena cava."""
        y_port = self.yc - float(self.B.max()) + 0.5 * self.wall
        port = np.array([self.g.z_of(self.s_car + 0.04), y_port, self.xc - 0.45 * self.h.half_width])
        svc = np.array([self.g.z_of(self.s_car - 0.02), self.asc_ao[1], self.xc - 0.1 * self.Ac])
        for t in np.linspace(0.0, 1.0, 60):
            idx = self.nearest_voxel((1 - t) * port + t * svc)
            if idx is not None:
                self.hu[idx], self.finding[idx] = 1800.0, _FINDING_INDEX["medical_material"]
        self.mark(self.paint(self.g.ellipsoid(port, (10.0, 6.0, 9.0)), 2500.0), "medical_material")


# --- lesions -------------------------------------------------------------------------------------

_LESION_HOSTS = {
    "bone": ("spine", "ribs"),
    "abdomen": ("bowel", "body_fat"),
    "mediastinum": ("mediastinum",),
    "liver": ("liver",),
    "lung": ("lung_left", "lung_right"),
    "kidney": ("kidney_left", "kidney_right"),
    "soft_tissue": ("body_fat",),  # subcutaneous: a mass in fat stays visible whatever its contrast
    "pelvis": ("bowel", "body_fat"),
}
_MAX_RADIUS_MM = {"bone": 14.0, "kidney": 18.0, "soft_tissue": 18.0, "mediastinum": 18.0}
_LESION_CORE = 0.6  # core radius / lesion radius; the shell outside it carries the rim enhancement
_MIN_HOST_VOXELS = 30


def _host_mask(b: _Builder, lesion_type: str) -> np.ndarray:
    """Where a lesion of this type may sit: its organs and region, nothing already marked."""
    host = b.free(*_LESION_HOSTS[lesion_type])
    s = b.g.s[:, None, None]
    if lesion_type == "bone":
        host &= b.hu >= 200.0  # bone proper, not the spinal canal or a disc
    elif lesion_type == "abdomen":
        host &= b.cavity & (s >= 0.25) & (s < b.s_dia - 0.02)
    elif lesion_type == "pelvis":
        host &= b.cavity & (s < 0.25)  # pelvic soft tissue around the bladder
    elif lesion_type == "soft_tissue":
        host &= ~b.cavity  # the body wall, not visceral fat
    return host


def _lesion_hu(
    rng: np.random.Generator, lesion_type: str, contrast_phase: bool
) -> tuple[float, float, float]:
    """(reference HU of the host tissue, core contrast, rim enhancement) for a new lesion.

    DeepLesion's lesions are the ones radiologists measured: conspicuous against their host tissue.
    Soft-tissue metastases are drawn rim-enhancing (a brighter shell around a hypo- or hyperdense core;
    a hypodense core is necrotic or cystic, 0-20 HU, never fat density, so a lesion in fat shows whole),
    the texture that tells them apart from bowel loops and vessels; lung and bone lesions stand out
    against air and cancellous bone on their own.
    """
    if lesion_type == "lung":
        return -860.0, float(rng.uniform(10.0, 50.0) + 860.0), 0.0  # a solid tumour in aerated lung
    if lesion_type == "bone":  # lytic or sclerotic metastasis in cancellous bone
        lytic = rng.random() < 0.6
        return 250.0, float(rng.uniform(-220.0, -120.0) if lytic else rng.uniform(180.0, 350.0)), 0.0
    reference = {"liver": 95.0 if contrast_phase else 60.0, "kidney": 150.0 if contrast_phase else 32.0}
    ref = reference.get(lesion_type, _SOFT_TISSUE_HU)
    if rng.random() < 0.5:  # hypodense: a necrotic or cystic core, fluid density, never fat
        contrast = max(rng.uniform(-150.0, -70.0), rng.uniform(*_FLUID_HU) - ref)
    else:
        contrast = rng.uniform(70.0, 160.0)
    return ref, float(contrast), float(rng.uniform(90.0, 160.0))


def _lesion_diameter_mm(rng: np.random.Generator, lesion_type: str, stage: int) -> float:
    if lesion_type == "lung":  # stage III-IV carries the larger primary tumours
        return float(rng.uniform(20.0, 40.0) if stage else rng.uniform(8.0, 28.0))
    return float(rng.uniform(18.0, 40.0))  # RECIST-measurable: DeepLesion's long axes are mostly >= 10 mm


def _place_lesion(b: _Builder, lesion_type: str, diameter_mm: float) -> PhantomLesion | None:
    """Put an ellipsoidal lesion mostly inside its host; None when the host is too small."""
    host = _host_mask(b, lesion_type)
    candidates = np.flatnonzero(host)
    if candidates.size < _MIN_HOST_VOXELS:
        return None
    radius = min(0.5 * diameter_mm, _MAX_RADIUS_MM.get(lesion_type, 20.0))
    # (fit, voxel, radii, box, voxels inside the host, squared normalised radius on the box)
    best: tuple[float, tuple[int, ...], np.ndarray, tuple[slice, ...], np.ndarray, np.ndarray] | None = None
    for attempt in range(24):  # a few random centres; keep the one whose ellipsoid fits best
        voxel = tuple(int(v) for v in np.unravel_index(int(b.rng.choice(candidates)), b.shape))
        radii = radius * b.rng.uniform(0.8, 1.2, 3)
        where, r2 = b.g.ellipsoid_r2(b.centre_mm(voxel), radii)  # type: ignore[misc]
        mask = r2 <= 1.0
        inside = mask & host[where]
        # Compare with the whole ellipsoid's volume so lesions cut off by the volume's edge lose out.
        fit = inside.sum() / max(mask.sum(), 4.0 / 3.0 * np.pi * np.prod(radii) / np.prod(b.spacing_anat))
        if best is None or fit > best[0]:
            best = (fit, voxel, radii, where, inside, r2)
        if fit >= 0.9:
            break
        if attempt % 8 == 7:
            radius *= 0.7  # the host is thin here (rib, body wall): try a smaller lesion
    _, voxel, radii, where, mask, r2 = best  # type: ignore[misc]
    number = int(b.lesion.max()) + 1
    reference, contrast, rim = _lesion_hu(b.rng, lesion_type, b.contrast)
    b.hu[where][mask] = reference + contrast + rim * (r2[mask] > _LESION_CORE * _LESION_CORE)
    b.lesion[where][mask] = number
    rows, cols = np.nonzero(b.lesion[voxel[0]] == number)
    return PhantomLesion(
        lesion_type=lesion_type,
        type_index=LESION_TYPES.index(lesion_type) + 1,
        centre_zyx=voxel,
        radius_mm=portable_math.geometric_mean(radii),
        contrast_hu=contrast,
        key_slice=voxel[0],
        box_xyxy=(int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())),
    )


def _plausible_types(b: _Builder) -> list[str]:
    """Lesion types whose host organs exist in the right part of this volume (cheap pre-check)."""
    n_z, n_classes = b.shape[0], len(ORGAN_CLASSES)
    flat = b.organ.reshape(n_z, -1).astype(np.intp) + (np.arange(n_z) * n_classes)[:, None]
    per_slice = np.bincount(flat.ravel(), minlength=n_z * n_classes).reshape(n_z, n_classes)
    s_ranges = {"abdomen": (0.25, b.s_dia - 0.02), "pelvis": (0.0, 0.25)}
    plausible = []
    for lesion_type, organs in _LESION_HOSTS.items():
        lo, hi = s_ranges.get(lesion_type, (0.0, 1.0))
        zs = b.g.slab(lo, hi)
        if per_slice[zs][:, [ORGAN_INDEX[o] for o in organs]].sum() >= _MIN_HOST_VOXELS:
            plausible.append(lesion_type)
    return [t for t in LESION_TYPES if t in plausible]


def _add_lesions(
    b: _Builder, rng: np.random.Generator, stage: int, min_lesions: int, required: Sequence[str]
) -> list[PhantomLesion]:
    """1-4 lesions (every DeepLesion scan has one; at least `min_lesions`, and one of each `required`
    type when it fits)."""
    plausible = _plausible_types(b)
    n_random = max(int(rng.integers(1, 5)), min_lesions) - len(required)
    lesions = []
    for lesion_type in required:
        lesion = _place_lesion(b, lesion_type, _lesion_diameter_mm(rng, lesion_type, stage))
        if lesion is None:
            logger.warning("phantom: no room for a required %s lesion", lesion_type)
        else:
            lesions.append(lesion)
    while n_random > 0 and plausible:
        # Stage III-IV patients more often carry a lung primary.
        weights = np.array([2.0 if (t == "lung" and stage) else 1.0 for t in plausible])
        lesion_type = str(rng.choice(plausible, p=weights / weights.sum()))
        lesion = _place_lesion(b, lesion_type, _lesion_diameter_mm(rng, lesion_type, stage))
        if lesion is None:
            plausible.remove(lesion_type)
            continue
        lesions.append(lesion)
        n_random -= 1
    return lesions


# --- scanner effects -----------------------------------------------------------------------------


def _scanner_effects(
    rng: np.random.Generator, hu: np.ndarray, profile: ScannerProfile, fov_circle: np.ndarray
) -> np.ndarray:
    """Kernel blur with kernel-correlated noise, calibration offset, 12-bit clip, FOV padding."""
    hu = scanner_signal(rng, hu, profile)
    out = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    out[:, ~fov_circle] = OUTSIDE_FOV_HU
    return out


def scanner_signal(rng: np.random.Generator, hu: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """The float32 image a scanner reconstructs from `hu` (which it may overwrite): noise, in-plane blur,
    calibration offset; still unrounded, so its bits show any platform dependence of the arithmetic."""
    sigma = profile.blur_sigma_px
    noise_sd = profile.noise_sd_hu
    # scipy's gaussian_filter builds its weights with numpy's exp, whose last bits depend on the CPU:
    # the same separable blur with portable weights (see portable_math).
    kernel = portable_math.gaussian_kernel(sigma) if sigma > 0 else None
    if kernel is not None:
        # Noise is added before the kernel so it comes out correlated like real CT noise; scale it up by
        # 1 / ||kernel||_2 so its sd after the blur is still noise_sd_hu (||k x k||_2 = sum(k**2)).
        noise_sd /= float((kernel * kernel).sum())
    hu += noise_sd * rng.standard_normal(hu.shape, dtype=np.float32)
    if kernel is not None:
        for axis in (1, 2):  # in-plane only, like the reconstruction kernel
            hu = ndimage.correlate1d(hu, kernel, axis=axis, mode="nearest")
    hu += profile.hu_offset
    return hu


# --- public API ----------------------------------------------------------------------------------


def _slice_geometry(
    rng: np.random.Generator,
    region: str,
    profile: ScannerProfile,
    n_slices: int | None,
    spacing_mm: tuple[float, float, float] | None,
    shape_xy: int,
    fov_needed: float,
) -> tuple[int, float, float, float]:
    """(n_slices, z spacing, pixel spacing, anatomy scale), spacings in physical mm."""
    extent = float(rng.uniform(*_EXTENT_MM[region]))
    if spacing_mm is not None:
        dz, pixel = float(spacing_mm[0]), float(spacing_mm[2])
        # A forced fine spacing shows too little body at this matrix size: shrink the patient instead.
        scale = min(1.0, pixel * shape_xy / fov_needed)
    else:
        fov = max(float(rng.uniform(*profile.fov_mm)), fov_needed)
        pixel, scale = round(fov / shape_xy, 4), 1.0
        dz = float(rng.uniform(*profile.slice_thickness_mm))
    if n_slices is None:
        n_slices = int(np.clip(round(extent * scale / dz), *N_SLICES_RANGE))
        if spacing_mm is None:
            dz = extent / n_slices  # keep the anatomy's coverage; thickness adapts
    elif spacing_mm is None:
        dz = extent / n_slices
    return int(n_slices), round(dz, 4), pixel, scale


def generate_scan(
    rng: np.random.Generator,
    shape_xy: int = 128,
    n_slices: int | None = None,
    profile: ScannerProfile = DEFAULT_PROFILE,
    region: str = "chest_abdomen",
    *,
    patient: PatientInfo | None = None,
    study_index: int = 1,
    min_lesions: int = 0,
    lesion_types: Sequence[str] = (),
    spacing_mm: tuple[float, float, float] | None = None,
    findings: Sequence[str] | None = None,
) -> PhantomScan:
    """One phantom CT.

    `region`: "chest_abdomen" (pelvis to lung apices) or "chest" (upper abdomen to apices).
    `lesion_types`: lesion types every scan must contain (e.g. ("lung",) for an NSCLC cohort);
    `min_lesions` raises the 1-4 random lesion count. `spacing_mm` (z, y, x) forces the voxel
    spacing (e.g. RAD-ChestCT's 0.8 mm isotropic); when the body would not fit the field of view at
    that spacing, the anatomy is scaled down isotropically (PhantomScan.acquisition["anatomy_scale"]).
    `findings` fixes which CHEST_FINDINGS / EXTRA_FINDINGS are present instead of drawing them.
    """
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {sorted(REGIONS)}")
    unknown = set(lesion_types) - set(LESION_TYPES)
    if unknown:
        raise ValueError(f"unknown lesion types {sorted(unknown)}")
    patient = patient or sample_patient(rng)
    habitus = _Habitus.sample(patient.habitus_seed, patient.sex)
    present, extra = _sample_findings(rng, patient.stage, findings)
    contrast = bool(rng.random() < 0.8)
    centre = (float(rng.uniform(-8.0, 8.0)), float(rng.uniform(-4.0, 14.0)))
    depth = habitus.half_width * habitus.depth_ratio * (1.0 + habitus.belly)
    fov_needed = 2.0 * max(habitus.half_width + abs(centre[0]), depth + abs(centre[1]) + 20.0) * 1.04
    n, dz, pixel, scale = _slice_geometry(rng, region, profile, n_slices, spacing_mm, shape_xy, fov_needed)

    s_lo, s_hi = REGIONS[region]
    extent_anat = n * dz / scale
    centred = ((np.arange(shape_xy) - (shape_xy - 1) / 2.0) * pixel / scale).astype(np.float32)
    grid = _Grid(
        z=(np.arange(n) + 0.5) * dz / scale,
        y=centred,
        x=centred,
        s_lo=s_lo,
        length_mm=extent_anat / (s_hi - s_lo),
    )
    spacing_anat = (dz / scale, pixel / scale, pixel / scale)
    builder = _Builder(rng, grid, habitus, present, extra, contrast, centre, spacing_anat)
    builder.build_anatomy()
    builder.build_findings()
    lesions = _add_lesions(builder, rng, patient.stage, min_lesions, lesion_types)
    for lesion in lesions:
        lesion.radius_mm *= scale
    radius_px = _FOV_CIRCLE * shape_xy
    rows, cols = np.meshgrid(centred, centred, indexing="ij")
    fov_circle = np.sqrt(rows * rows + cols * cols) * (scale / pixel) <= radius_px
    hu = _scanner_effects(rng, builder.hu, profile, fov_circle)
    builder.organ[:, ~fov_circle] = 0

    half = (shape_xy - 1) / 2.0 * pixel
    origin = (
        round(-half + rng.uniform(-10, 10), 2),
        round(-half + rng.uniform(-30, 10), 2),
        round(float(rng.uniform(-900, -300)), 2),
    )
    logger.debug("phantom %s: shape %s, %d lesions", patient.patient_id, hu.shape, len(lesions))
    return PhantomScan(
        hu=hu,
        spacing_mm=(dz, pixel, pixel),
        organ_mask=builder.organ,
        lesion_mask=builder.lesion,
        finding_mask=builder.finding,
        lesions=lesions,
        findings=present,
        extra_findings=extra,
        stage=patient.stage,
        patient_id=patient.patient_id,
        patient_name=patient.patient_name,
        sex=patient.sex,
        age=patient.age + (study_index - 1),
        study_index=study_index,
        region=region,
        profile=profile.name,
        contrast=contrast,
        origin_lps=origin,
        acquisition={"fov_mm": round(pixel * shape_xy, 4), "anatomy_scale": scale},
    )


def generate_cohort(
    n_scans: int,
    seed: int,
    shape_xy: int = 128,
    profile: ScannerProfile = DEFAULT_PROFILE,
    patients_per_scan: float = 0.8,
    *,
    region: str = "chest_abdomen",
    n_slices: int | None = None,
    min_lesions: int = 0,
    lesion_types: Sequence[str] = (),
    spacing_mm: tuple[float, float, float] | None = None,
) -> list[PhantomScan]:
    """`n_scans` phantoms from round(n_scans * patients_per_scan) patients, grouped by patient.

    The first scan of every patient comes first in patient order; the extra scans (follow-ups of
    randomly chosen patients, study_index 2, 3 ...) follow their patient's first scan. Every scan
    has its own random stream (SeedSequence.spawn), so changing one scan never shifts another.
    """
    if n_scans < 1:
        raise ValueError("n_scans must be >= 1")
    if not 0.0 < patients_per_scan <= 1.0:
        raise ValueError("patients_per_scan must be in (0, 1]")
    n_patients = max(1, min(n_scans, round(n_scans * patients_per_scan)))
    root = np.random.SeedSequence(seed)
    cohort_rng, *streams = (np.random.default_rng(s) for s in root.spawn(1 + n_patients + n_scans))
    ids = cohort_rng.choice(9_000_000, size=n_patients, replace=False) + 1_000_000
    patients = [sample_patient(streams[i], f"PHA{int(pid):07d}") for i, pid in enumerate(ids)]
    owners = list(range(n_patients)) + sorted(
        int(p) for p in cohort_rng.integers(0, n_patients, n_scans - n_patients)
    )
    owners.sort()
    scans, seen = [], {}
    for i, owner in enumerate(owners):
        seen[owner] = seen.get(owner, 0) + 1
        scans.append(
            generate_scan(
                streams[n_patients + i],
                shape_xy=shape_xy,
                n_slices=n_slices,
                profile=profile,
                region=region,
                patient=patients[owner],
                study_index=seen[owner],
                min_lesions=min_lesions,
                lesion_types=lesion_types,
                spacing_mm=spacing_mm,
            )
        )
    logger.info("phantom cohort: %d scans from %d patients (seed %d)", n_scans, n_patients, seed)
    return scans
