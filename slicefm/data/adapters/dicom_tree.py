"""Plain DICOM trees (any folder structure, any file names): one scan per axial CT series."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pydicom

from slicefm.data.adapters.base import AdapterResult, ScanCandidate, files_size, rel
from slicefm.data.adapters.masks import mask_for
from slicefm.data.adapters.sidecar import Sidecars, is_sidecar, read_sidecars
from slicefm.io.dicom import read_dicom_series, scan_dicom_tree


def series_patient_ref(first_file: Path) -> str | None:
    """PatientID of a series from one header (PHI: used only to hash and to join label tables)."""
    try:
        ds = pydicom.dcmread(first_file, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # the series reader reports the real problem later
        return None
    value = str(getattr(ds, "PatientID", "") or "")
    return value or None


def series_candidates(
    root: Path, skip: Callable[[Path], bool] | None = None
) -> tuple[list[ScanCandidate], list[tuple[str, str]]]:
    """Walk a DICOM tree; candidates carry the SeriesInstanceUID as ref and PatientID as patient_ref.

    `skip`: files the walk leaves to another adapter (see scan_dicom_tree).
    """
    tree = scan_dicom_tree(root, skip)
    rejected = [(rel(Path(p), root), reason) for p, reason in tree.rejected if not is_sidecar(Path(p), root)]
    cands = []
    for uid, files in sorted(tree.series.items()):
        files = sorted(files)
        series_dir = rel(files[0].parent, root)
        cands.append(
            ScanCandidate(
                ref=uid,
                source=series_dir,
                load=partial(read_dicom_series, files, root),
                size_bytes=files_size(files),
                patient_ref=series_patient_ref(files[0]),
            )
        )
    return cands, rejected


def attach_sidecars(source: Path, cands: list[ScanCandidate], side: Sidecars) -> set[str]:
    """Give each series its labels, lesions and mask; returns the label-table keys that matched."""
    used: set[str] = set()
    for cand in cands:
        labels, lesions, key = side.lookup(cand.ref, cand.patient_ref)
        cand.labels, cand.lesions = labels, lesions
        cand.mask_file = mask_for(source, cand.ref)
        if key is not None:
            used.add(key)
    return used


def discover(source: Path, cohort: str | None = None) -> AdapterResult:
    cands, rejected = series_candidates(source)
    side = read_sidecars(source)
    used = attach_sidecars(source, cands, side)
    rejected += side.rejected + side.unmatched(used)
    return AdapterResult(cohort or source.name, "dicom", cands, rejected, side.label_names)
