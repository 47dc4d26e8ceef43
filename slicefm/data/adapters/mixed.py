"""A plain tree holding both NIfTI volumes and DICOM series (research exports): both are ingested.

Each file is judged by one reader only: the NIfTI files by the nifti_dir rules, every other file by the
DICOM walk (which skips .nii/.nii.gz). labels.csv / lesions.csv / masks/ are read once and matched
against both kinds of scan (scan_ref = SeriesInstanceUID or file stem; patient_ref = PatientID or file
stem), so a row is reported as unmatched only when it names no scan of either format.
"""

from __future__ import annotations

import logging
from pathlib import Path

from slicefm.data.adapters import MIXED_FORMAT, dicom_tree, nifti_dir
from slicefm.data.adapters.base import AdapterResult
from slicefm.data.adapters.sidecar import read_sidecars

log = logging.getLogger(__name__)


def discover(source: Path, cohort: str | None = None) -> AdapterResult:
    """Candidates of both formats (each tagged with its own `fmt`), rejections of both, one label set."""
    source = Path(source)
    side = read_sidecars(source)
    nifti_cands, nifti_used = nifti_dir.file_candidates(source, nifti_dir.nifti_files(source), side)
    dicom_cands, rejected = dicom_tree.series_candidates(source, skip=nifti_dir.is_nifti)
    dicom_used = dicom_tree.attach_sidecars(source, dicom_cands, side)
    for cand in dicom_cands:
        cand.fmt = "dicom"
    for cand in nifti_cands:
        cand.fmt = "nifti"
    log.info(
        "mixed tree %s: %d DICOM series and %d NIfTI volumes, both ingested",
        source,
        len(dicom_cands),
        len(nifti_cands),
    )
    rejected += side.rejected + side.unmatched(dicom_used | nifti_used)
    cands = dicom_cands + nifti_cands
    return AdapterResult(cohort or source.name, MIXED_FORMAT, cands, rejected, side.label_names)
