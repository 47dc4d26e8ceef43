"""The DeepLesion layout: 16-bit PNG slices per series and DL_info.csv, one row per lesion."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from slicefm.io.png16 import write_png16
from slicefm.phantom.records import PhantomScan
from slicefm.phantom.writers.files import atomic_dir, fmt_decimal, write_csv
from slicefm.phantom.writers.splits import patient_numbers, patient_splits

DEEPLESION_WINDOW = "-175, 275"
_DL_COLUMNS = [
    "File_name",
    "Patient_index",
    "Study_index",
    "Series_ID",
    "Key_slice_index",
    "Measurement_coordinates",
    "Bounding_boxes",
    "Lesion_diameters_Pixel_",
    "Normalized_lesion_location",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Slice_range",
    "Spacing_mm_px_",
    "Image_size",
    "DICOM_windows",
    "Patient_gender",
    "Patient_age",
    "Train_Val_Test",
]


def deeplesion_names(scans: Sequence[PhantomScan]) -> list[str]:
    patient, study = patient_numbers(scans)
    return [f"{p:06d}_{s:02d}_01" for p, s in zip(patient, study, strict=True)]


def _recist(box: Sequence[int]) -> tuple[list[float], tuple[float, float]]:
    """RECIST-like long and short axis end points through the box centre, and their lengths."""
    x0, y0, x1, y1 = (float(v) for v in box)
    xc, yc = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    horizontal, vertical = [x0, yc, x1, yc], [xc, y0, xc, y1]
    width, height = x1 - x0 + 1.0, y1 - y0 + 1.0
    if width >= height:
        return horizontal + vertical, (width, height)
    return vertical + horizontal, (height, width)


def _join(values: Sequence[float]) -> str:
    return ", ".join(fmt_decimal(float(v)) for v in values)


def write_deeplesion(scans: Sequence[PhantomScan], root: Path) -> Path:
    """DeepLesion layout: ``root/Images_png/{patient:06d}_{study:02d}_{series:02d}/{slice:03d}.png``.

    16-bit PNGs with value = HU + 32768, slice numbers 1-based. DeepLesion publishes no slice
    positions; here increasing file number = canonical index (inferior -> superior), so file
    ``k.png`` is canonical slice k-1. ``root/DL_info.csv`` has DeepLesion's columns, one row per
    lesion: File_name (the key slice's PNG, e.g. 000001_01_01_023.png), Key_slice_index (1-based),
    Measurement_coordinates (RECIST long then short axis end points, px), Bounding_boxes
    ("x1, y1, x2, y2": the inclusive tight pixel box), Lesion_diameters_Pixel_ ("long, short"),
    Normalized_lesion_location ("x, y, z" in [0, 1]), Coarse_lesion_type (1-8), Possibly_noisy (0),
    Slice_range ("first, last"), Spacing_mm_px_ ("x, y, z"), Image_size ("w, h"), DICOM_windows,
    Patient_gender (M/F), Patient_age, Train_Val_Test (1 train, 2 val, 3 test; by patient, 70/15/15).
    Scans without lesions get PNGs but no row, as only annotated series appear in the real data.
    """
    root = Path(root)
    names = deeplesion_names(scans)
    patient, study = patient_numbers(scans)
    splits = patient_splits(scans, (0.7, 0.15, 0.15))
    rows = []
    for scan, name, p, s, split in zip(scans, names, patient, study, splits, strict=True):
        n, height, width = scan.hu.shape
        with atomic_dir(root / "Images_png" / name) as tmp:
            for k in range(n):
                write_png16(tmp / f"{k + 1:03d}.png", scan.hu[k])
        dz, dy, dx = scan.spacing_mm
        for lesion in scan.lesions:
            coords, diameters = _recist(lesion.box_xyxy)
            x0, y0, x1, y1 = lesion.box_xyxy
            location = (
                (x0 + x1) / 2.0 / (width - 1),
                (y0 + y1) / 2.0 / (height - 1),
                lesion.key_slice / max(n - 1, 1),
            )
            rows.append(
                [
                    f"{name}_{lesion.key_slice + 1:03d}.png",
                    p,
                    s,
                    1,
                    lesion.key_slice + 1,
                    _join(coords),
                    _join(lesion.box_xyxy),
                    _join(diameters),
                    _join(location),
                    lesion.type_index,
                    0,
                    f"1, {n}",
                    _join((dx, dy, dz)),
                    f"{width}, {height}",
                    DEEPLESION_WINDOW,
                    scan.sex,
                    scan.age,
                    split + 1,
                ]
            )
    write_csv(root / "DL_info.csv", _DL_COLUMNS, rows)
    return root
