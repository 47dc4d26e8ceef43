"""Plain layouts: a DICOM tree or a NIfTI folder, with labels.csv and lesions.csv sidecars.

These are the sidecars slicefm.data.adapters.sidecar reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slicefm.phantom.records import CHEST_FINDINGS, LESION_TYPES, PhantomScan
from slicefm.phantom.writers.dicom import series_uid, write_dicom_series
from slicefm.phantom.writers.files import token, write_csv
from slicefm.phantom.writers.nifti import write_nifti


def _label_rows(
    scans: Sequence[PhantomScan], refs: Sequence[tuple[str, str]]
) -> tuple[list[str], list, list]:
    """(labels.csv header, labels.csv rows, lesions.csv rows) for scans named by (patient_ref, scan_ref)."""
    header = ["patient_ref", "scan_ref", *(f"location_{t}" for t in LESION_TYPES)]
    header += [*(f"finding_{f}" for f in CHEST_FINDINGS), "stage"]
    rows, lesion_rows = [], []
    for scan, (patient_ref, scan_ref) in zip(scans, refs, strict=True):
        rows.append(
            [patient_ref, scan_ref, *scan.location_labels.values(), *scan.findings.values(), scan.stage]
        )
        for lesion in scan.lesions:
            box = lesion.box_xyxy
            lesion_rows.append(
                [patient_ref, scan_ref, lesion.key_slice, *box, lesion.type_index, lesion.lesion_type]
            )
    return header, rows, lesion_rows


_LESION_HEADER = [
    "patient_ref",
    "scan_ref",
    "key_slice",
    "x0",
    "y0",
    "x1",
    "y1",
    "lesion_type",
    "lesion_name",
]


def _dicom_tree_dirs(scans: Sequence[PhantomScan], seed: int) -> list[str]:
    return [
        f"{token(seed, s.patient_id)[:12]}/{token(seed, s.patient_id, s.study_index)[:12]}" for s in scans
    ]


def write_dicom_tree_refs(
    scans: Sequence[PhantomScan], root: Path, compress_fraction: float, seed: int
) -> list[str]:
    """write_dicom_tree; returns the SeriesInstanceUID of every scan."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    uids = []
    for scan, series_dir in zip(scans, _dicom_tree_dirs(scans, seed), strict=True):
        compress = bool(rng.random() < compress_fraction)
        uids.append(series_uid(write_dicom_series(scan, root / series_dir, rng, compress=compress)[0]))
    header, rows, lesion_rows = _label_rows(
        scans, [(s.patient_id, u) for s, u in zip(scans, uids, strict=True)]
    )
    write_csv(root / "lesions.csv", _LESION_HEADER, lesion_rows)
    write_csv(root / "labels.csv", header, rows)
    return uids


def write_dicom_tree(
    scans: Sequence[PhantomScan], root: Path, compress_fraction: float = 0.0, *, seed: int = 0
) -> Path:
    """Plain DICOM export: ``root/<patient dir>/<study dir>/<random>.dcm`` plus label CSVs.

    Directory names are random-looking (hashes of seed and patient); a `compress_fraction` of the
    series is RLE-compressed. ``labels.csv``: patient_ref (the fake PatientID), scan_ref (the
    SeriesInstanceUID: a patient may have several scans), location_<type> and finding_<name> 0/1
    columns, stage. ``lesions.csv``: patient_ref, scan_ref, key_slice (canonical index), x0, y0,
    x1, y1 (inclusive pixel box on the key slice, canonical frame), lesion_type (DeepLesion
    coarse type 1-8), lesion_name. These are the sidecars slicefm.data.adapters.sidecar reads.
    """
    write_dicom_tree_refs(scans, root, compress_fraction, seed)
    return Path(root)


def nifti_dir_names(scans: Sequence[PhantomScan], seed: int) -> list[str]:
    return [f"scan_{token(seed, s.patient_id, s.study_index)[:10]}" for s in scans]


def write_nifti_dir(scans: Sequence[PhantomScan], root: Path, *, seed: int = 0) -> Path:
    """Plain NIfTI folder: ``root/scan_<hash>.nii.gz`` plus ``labels.csv`` and ``lesions.csv``.

    Columns as in write_dicom_tree; patient_ref is the fake PatientID (a patient's scans share
    it) and scan_ref the file stem (name without .nii.gz).
    """
    root = Path(root)
    names = nifti_dir_names(scans, seed)
    for scan, name in zip(scans, names, strict=True):
        write_nifti(scan, root / f"{name}.nii.gz")
    refs = [(s.patient_id, name) for s, name in zip(scans, names, strict=True)]
    header, rows, lesion_rows = _label_rows(scans, refs)
    write_csv(root / "lesions.csv", _LESION_HEADER, lesion_rows)
    write_csv(root / "labels.csv", header, rows)
    return root
