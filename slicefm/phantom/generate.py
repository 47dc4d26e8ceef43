"""Generate phantom CTs: one scan (generate_scan) or a cohort of patients' scans (generate_cohort).

A scan is an anatomically plausible HU volume with organ, lesion and finding masks, painted in this
order: anatomy (anatomy.py), findings (findings.py), lesions (lesions.py), then the scanner's effects
(scanner.py).

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
from collections.abc import Sequence

import numpy as np

from slicefm.phantom.anatomy import paint_anatomy
from slicefm.phantom.canvas import Canvas
from slicefm.phantom.findings import paint_findings, sample_findings
from slicefm.phantom.geometry import Grid
from slicefm.phantom.lesions import add_lesions
from slicefm.phantom.patient import Habitus, sample_patient
from slicefm.phantom.records import LESION_TYPES, PatientInfo, PhantomScan
from slicefm.phantom.scanner import (
    DEFAULT_PROFILE,
    FOV_CIRCLE,
    REGIONS,
    ScannerProfile,
    scanner_effects,
    slice_geometry,
)

logger = logging.getLogger(__name__)


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
    habitus = Habitus.sample(patient.habitus_seed, patient.sex)
    present, extra = sample_findings(rng, patient.stage, findings)
    contrast = bool(rng.random() < 0.8)
    centre = (float(rng.uniform(-8.0, 8.0)), float(rng.uniform(-4.0, 14.0)))
    depth = habitus.half_width * habitus.depth_ratio * (1.0 + habitus.belly)
    fov_needed = 2.0 * max(habitus.half_width + abs(centre[0]), depth + abs(centre[1]) + 20.0) * 1.04
    n, dz, pixel, scale = slice_geometry(rng, region, profile, n_slices, spacing_mm, shape_xy, fov_needed)

    s_lo, s_hi = REGIONS[region]
    extent_anat = n * dz / scale
    centred = ((np.arange(shape_xy) - (shape_xy - 1) / 2.0) * pixel / scale).astype(np.float32)
    grid = Grid(
        z=(np.arange(n) + 0.5) * dz / scale,
        y=centred,
        x=centred,
        s_lo=s_lo,
        length_mm=extent_anat / (s_hi - s_lo),
    )
    spacing_anat = (dz / scale, pixel / scale, pixel / scale)
    canvas = Canvas(rng, grid, habitus, present, extra, contrast, centre, spacing_anat)
    paint_anatomy(canvas)
    paint_findings(canvas)
    lesions = add_lesions(canvas, rng, patient.stage, min_lesions, lesion_types)
    for lesion in lesions:
        lesion.radius_mm *= scale
    radius_px = FOV_CIRCLE * shape_xy
    rows, cols = np.meshgrid(centred, centred, indexing="ij")
    fov_circle = np.sqrt(rows * rows + cols * cols) * (scale / pixel) <= radius_px
    hu = scanner_effects(rng, canvas.hu, profile, fov_circle)
    canvas.organ[:, ~fov_circle] = 0

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
        organ_mask=canvas.organ,
        lesion_mask=canvas.lesion,
        finding_mask=canvas.finding,
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
