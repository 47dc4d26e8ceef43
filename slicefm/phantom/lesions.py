"""Lesions: DeepLesion-style masses in the eight coarse locations, placed mostly inside a host organ.

add_lesions puts 1-4 lesions (plus required types) into a Canvas whose anatomy and findings are painted;
each lesion gets a host-dependent HU (rim-enhancing soft-tissue metastases, lung and bone lesions), a
number in the lesion mask, and a PhantomLesion record with its key slice and box.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from slicefm.phantom import portable_math
from slicefm.phantom.canvas import Canvas
from slicefm.phantom.records import LESION_TYPES, ORGAN_CLASSES, ORGAN_INDEX, PhantomLesion

logger = logging.getLogger(__name__)

_SOFT_TISSUE_HU = 40.0  # reference for lesions embedded in fat, bowel or muscle
_FLUID_HU = (0.0, 20.0)  # necrotic / cystic lesion cores: the darkest a soft-tissue lesion gets
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


def _host_mask(canvas: Canvas, lesion_type: str) -> np.ndarray:
    """Where a lesion of this type may sit: its organs and region, nothing already marked."""
    host = canvas.free(*_LESION_HOSTS[lesion_type])
    s = canvas.g.s[:, None, None]
    if lesion_type == "bone":
        host &= canvas.hu >= 200.0  # bone proper, not the spinal canal or a disc
    elif lesion_type == "abdomen":
        host &= canvas.cavity & (s >= 0.25) & (s < canvas.s_dia - 0.02)
    elif lesion_type == "pelvis":
        host &= canvas.cavity & (s < 0.25)  # pelvic soft tissue around the bladder
    elif lesion_type == "soft_tissue":
        host &= ~canvas.cavity  # the body wall, not visceral fat
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


def _place_lesion(canvas: Canvas, lesion_type: str, diameter_mm: float) -> PhantomLesion | None:
    """Put an ellipsoidal lesion mostly inside its host; None when the host is too small."""
    host = _host_mask(canvas, lesion_type)
    candidates = np.flatnonzero(host)
    if candidates.size < _MIN_HOST_VOXELS:
        return None
    radius = min(0.5 * diameter_mm, _MAX_RADIUS_MM.get(lesion_type, 20.0))
    # (fit, voxel, radii, box, voxels inside the host, squared normalised radius on the box)
    best: tuple[float, tuple[int, ...], np.ndarray, tuple[slice, ...], np.ndarray, np.ndarray] | None = None
    for attempt in range(24):  # a few random centres; keep the one whose ellipsoid fits best
        voxel = tuple(int(v) for v in np.unravel_index(int(canvas.rng.choice(candidates)), canvas.shape))
        radii = radius * canvas.rng.uniform(0.8, 1.2, 3)
        where, r2 = canvas.g.ellipsoid_r2(canvas.centre_mm(voxel), radii)  # type: ignore[misc]
        mask = r2 <= 1.0
        inside = mask & host[where]
        # Compare with the whole ellipsoid's volume so lesions cut off by the volume's edge lose out.
        fit = inside.sum() / max(
            mask.sum(), 4.0 / 3.0 * np.pi * np.prod(radii) / np.prod(canvas.spacing_anat)
        )
        if best is None or fit > best[0]:
            best = (fit, voxel, radii, where, inside, r2)
        if fit >= 0.9:
            break
        if attempt % 8 == 7:
            radius *= 0.7  # the host is thin here (rib, body wall): try a smaller lesion
    _, voxel, radii, where, mask, r2 = best  # type: ignore[misc]
    number = int(canvas.lesion.max()) + 1
    reference, contrast, rim = _lesion_hu(canvas.rng, lesion_type, canvas.contrast)
    canvas.hu[where][mask] = reference + contrast + rim * (r2[mask] > _LESION_CORE * _LESION_CORE)
    canvas.lesion[where][mask] = number
    rows, cols = np.nonzero(canvas.lesion[voxel[0]] == number)
    return PhantomLesion(
        lesion_type=lesion_type,
        type_index=LESION_TYPES.index(lesion_type) + 1,
        centre_zyx=voxel,
        radius_mm=portable_math.geometric_mean(radii),
        contrast_hu=contrast,
        key_slice=voxel[0],
        box_xyxy=(int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())),
    )


def _plausible_types(canvas: Canvas) -> list[str]:
    """Lesion types whose host organs exist in the right part of this volume (cheap pre-check)."""
    n_z, n_classes = canvas.shape[0], len(ORGAN_CLASSES)
    flat = canvas.organ.reshape(n_z, -1).astype(np.intp) + (np.arange(n_z) * n_classes)[:, None]
    per_slice = np.bincount(flat.ravel(), minlength=n_z * n_classes).reshape(n_z, n_classes)
    s_ranges = {"abdomen": (0.25, canvas.s_dia - 0.02), "pelvis": (0.0, 0.25)}
    plausible = []
    for lesion_type, organs in _LESION_HOSTS.items():
        lo, hi = s_ranges.get(lesion_type, (0.0, 1.0))
        zs = canvas.g.slab(lo, hi)
        if per_slice[zs][:, [ORGAN_INDEX[o] for o in organs]].sum() >= _MIN_HOST_VOXELS:
            plausible.append(lesion_type)
    return [t for t in LESION_TYPES if t in plausible]


def add_lesions(
    canvas: Canvas, rng: np.random.Generator, stage: int, min_lesions: int, required: Sequence[str]
) -> list[PhantomLesion]:
    """1-4 lesions (every DeepLesion scan has one; at least `min_lesions`, and one of each `required`
    type when it fits)."""
    plausible = _plausible_types(canvas)
    n_random = max(int(rng.integers(1, 5)), min_lesions) - len(required)
    lesions = []
    for lesion_type in required:
        lesion = _place_lesion(canvas, lesion_type, _lesion_diameter_mm(rng, lesion_type, stage))
        if lesion is None:
            logger.warning("phantom: no room for a required %s lesion", lesion_type)
        else:
            lesions.append(lesion)
    while n_random > 0 and plausible:
        # Stage III-IV patients more often carry a lung primary.
        weights = np.array([2.0 if (t == "lung" and stage) else 1.0 for t in plausible])
        lesion_type = str(rng.choice(plausible, p=weights / weights.sum()))
        lesion = _place_lesion(canvas, lesion_type, _lesion_diameter_mm(rng, lesion_type, stage))
        if lesion is None:
            plausible.remove(lesion_type)
            continue
        lesions.append(lesion)
        n_random -= 1
    return lesions
