"""A whole phantom dataset in one call: generate a cohort and write it, with its masks, in a format's layout.

This is what ``slicefm data phantom`` and the demo data (data.dvc) run; the output is byte-identical for
the same arguments on every x86-64 machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from slicefm.phantom.generate import generate_cohort
from slicefm.phantom.records import PhantomScan
from slicefm.phantom.scanner import PROFILES
from slicefm.phantom.writers.ctrate import ctrate_names, write_ctrate
from slicefm.phantom.writers.deeplesion import deeplesion_names, write_deeplesion
from slicefm.phantom.writers.files import atomic_dir
from slicefm.phantom.writers.masks import write_masks
from slicefm.phantom.writers.nsclc import write_nsclc_refs
from slicefm.phantom.writers.plain import nifti_dir_names, write_dicom_tree_refs, write_nifti_dir
from slicefm.phantom.writers.radchest import RADCHEST_SPACING_MM, radchest_names, write_radchest
from slicefm.phantom.writers.splits import patient_splits

logger = logging.getLogger(__name__)


DatasetFormat = Literal["dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"]


def _write_cohort(scans: list[PhantomScan], root: Path, fmt: DatasetFormat, seed: int) -> list[str]:
    """Write one format's layout; returns each scan's ref for its mask file: the adapters' key
    (SeriesInstanceUID for DICOM layouts, file stem for NIfTI/CT-RATE/RAD-ChestCT, series folder
    name for DeepLesion)."""
    if fmt == "dicom":
        return write_dicom_tree_refs(scans, root, compress_fraction=0.05, seed=seed)
    if fmt == "nifti":
        write_nifti_dir(scans, root, seed=seed)
        return nifti_dir_names(scans, seed)
    if fmt == "deeplesion":
        write_deeplesion(scans, root)
        return deeplesion_names(scans)
    if fmt == "nsclc":
        return write_nsclc_refs(scans, root, seed)
    splits = ("train", "valid") if fmt == "ctrate" else ("trn", "val", "tst")
    fractions = (0.8, 0.2) if fmt == "ctrate" else (0.7, 0.15, 0.15)
    assignment = patient_splits(scans, fractions)
    refs = [""] * len(scans)
    for i, split in enumerate(splits):
        members = [j for j, a in enumerate(assignment) if a == i]
        subset = [scans[j] for j in members]
        if fmt == "ctrate":
            write_ctrate(subset, root, split)
            names = ctrate_names(subset, split)
        else:
            write_radchest(subset, root, split)
            names = radchest_names(subset, split)
        for j, name in zip(members, names, strict=True):
            refs[j] = name
    return refs


_COHORT_SETTINGS: dict[str, dict] = {
    "dicom": {"region": "chest_abdomen"},
    "nifti": {"region": "chest_abdomen"},
    "deeplesion": {"region": "chest_abdomen", "min_lesions": 1},
    "ctrate": {"region": "chest"},
    "radchest": {"region": "chest", "spacing_mm": (RADCHEST_SPACING_MM,) * 3, "patients_per_scan": 1.0},
    "nsclc": {"region": "chest", "lesion_types": ("lung",), "patients_per_scan": 1.0},
}


def generate_dataset(
    out: Path,
    n_scans: int,
    fmt: DatasetFormat,
    seed: int = 0,
    shape_xy: int = 128,
    profile: str = "default",
) -> Path:
    """Generate a phantom cohort and write it, with its masks, in `fmt`'s layout under `out`.

    `out` must not exist or be empty; everything is written into a temporary sibling directory
    first and renamed into place at the end. Only the layout's own files and ``masks/`` are written
    (a stray file would be quarantined by ingestion as an unreadable scan).
    """
    if fmt not in _COHORT_SETTINGS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(_COHORT_SETTINGS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown scanner profile {profile!r}; expected one of {sorted(PROFILES)}")
    settings = dict(_COHORT_SETTINGS[fmt])
    ratio = settings.pop("patients_per_scan", 0.8)
    scans = generate_cohort(n_scans, seed, shape_xy, PROFILES[profile], ratio, **settings)
    out = Path(out)
    with atomic_dir(out) as tmp:
        refs = _write_cohort(scans, tmp, fmt, seed)
        write_masks(scans, tmp, refs)
    logger.info("phantom %s dataset: %d scans written to %s", fmt, n_scans, out)
    return out
