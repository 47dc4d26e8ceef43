"""The CT-RATE layout: NIfTI volumes of stored values (with CT-RATE's wrong unit spacing), metadata CSV and
the 18 multi-abnormality labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slicefm.phantom.records import PhantomScan
from slicefm.phantom.scanner import PROFILES
from slicefm.phantom.writers.dicom import RESCALE_INTERCEPT
from slicefm.phantom.writers.files import fmt_decimal, write_csv
from slicefm.phantom.writers.nifti import nifti_bytes, write_nii
from slicefm.phantom.writers.splits import patient_numbers

CTRATE_CLASSES = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)


def ctrate_labels(scan: PhantomScan) -> dict[str, int]:
    """The 18 CT-RATE classes from the phantom's findings; classes the phantom never draws are 0."""
    f, e = scan.findings, scan.extra_findings
    lung_lesion = any(lesion.lesion_type == "lung" for lesion in scan.lesions)
    labels = dict.fromkeys(CTRATE_CLASSES, 0)
    labels.update(
        {
            "Medical material": e["medical_material"],
            "Arterial wall calcification": e["arterial_calcification"],
            "Cardiomegaly": f["cardiomegaly"],
            "Pericardial effusion": e["pericardial_effusion"],
            "Coronary artery wall calcification": e["coronary_calcification"],
            "Hiatal hernia": e["hiatal_hernia"],
            "Lymphadenopathy": f["lymphadenopathy"],
            "Emphysema": f["emphysema"],
            "Atelectasis": f["atelectasis"],
            "Lung nodule": int(bool(f["nodule"] or lung_lesion)),  # CT-RATE reports masses as nodules too
            "Lung opacity": f["opacity"],
            "Pleural effusion": f["pleural_effusion"],
            "Consolidation": e["consolidation"],
        }
    )
    return labels


def ctrate_names(scans: Sequence[PhantomScan], split: str) -> list[str]:
    patient, study = patient_numbers(scans)
    return [
        f"{split}_{p}_{'abcdefghijklmnopqrstuvwxyz'[s - 1]}_1" for p, s in zip(patient, study, strict=True)
    ]


def write_ctrate(scans: Sequence[PhantomScan], root: Path, split: str = "train") -> Path:
    """CT-RATE layout: ``root/dataset/{split}/{split}_{n}/{split}_{n}_{a|b..}/{split}_{n}_{a}_1.nii.gz``.

    n numbers patients, the letter their scans, _1 the reconstruction. As in the real release the
    NIfTI holds raw stored values (HU = stored * RescaleSlope + RescaleIntercept, intercept -1024)
    and a WRONG unit spacing (1, 1, 1) in its header (orientation is right): adapters must take
    spacing and rescale from ``root/dataset/metadata/{split}_metadata.csv`` (VolumeName,
    Manufacturer, XYSpacing "[x, y]", ZSpacing, RescaleIntercept, RescaleSlope, Rows, Columns,
    PatientSex, PatientAge "058Y"). Labels: ``root/dataset/multi_abnormality_labels/
    {split}_predicted_labels.csv`` with VolumeName and the 18 CT-RATE classes (see ctrate_labels).
    """
    root = Path(root) / "dataset"
    names = ctrate_names(scans, split)
    metadata, labels = [], []
    for scan, name in zip(scans, names, strict=True):
        patient_dir, scan_dir = name.rsplit("_", 2)[0], name.rsplit("_", 1)[0]
        stored = (scan.hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.int16)
        write_nii(
            root / split / patient_dir / scan_dir / f"{name}.nii.gz",
            nifti_bytes(stored, (1, 1, 1), (0, 0, 0)),
        )
        dz, dy, dx = scan.spacing_mm
        profile = PROFILES.get(scan.profile, PROFILES["default"])
        metadata.append(
            [
                f"{name}.nii.gz",
                profile.manufacturer,
                f"[{fmt_decimal(dx)}, {fmt_decimal(dy)}]",
                fmt_decimal(dz),
                RESCALE_INTERCEPT,
                1,
            ]
            + [scan.hu.shape[1], scan.hu.shape[2], scan.sex, f"{scan.age:03d}Y"]
        )
        labels.append([f"{name}.nii.gz", *ctrate_labels(scan).values()])
    meta_header = ["VolumeName", "Manufacturer", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope"]
    meta_header += ["Rows", "Columns", "PatientSex", "PatientAge"]
    write_csv(root / "metadata" / f"{split}_metadata.csv", meta_header, metadata)
    label_path = root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
    write_csv(label_path, ["VolumeName", *CTRATE_CLASSES], labels)
    return root.parent
