"""DeepLesion (NIH): Images_png/<pat>_<study>_<series>/<NNN>.png (16-bit, HU = value - 32768) + DL_info.csv.

DL_info.csv has one row per lesion: File_name (the key slice, e.g. 000001_01_01_109.png), Key_slice_index,
Bounding_boxes ("x1, y1, x2, y2" in pixels), Coarse_lesion_type (1-8; -1 = unlabelled test lesions),
Spacing_mm_px_ ("x, y, z"), Train_Val_Test (1/2/3). Series folders hold only the slices around
annotated lesions, so a folder can have gaps in its slice numbers: each run of consecutive slices
becomes its own scan (a volume with a hole has no single z spacing).
DeepLesion publishes no slice positions; slicefm takes increasing file number as inferior->superior
(config-free assumption, documented in the README).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from slicefm.data.adapters.base import (
    AdapterResult,
    LesionAnnotation,
    ScanCandidate,
    TableError,
    files_size,
    read_table,
    rel,
)
from slicefm.data.adapters.sidecar import LESION_NAMES
from slicefm.io.png16 import read_png_slices

REQUIRED = [
    "File_name",
    "Patient_index",
    "Key_slice_index",
    "Bounding_boxes",
    "Coarse_lesion_type",
    "Spacing_mm_px_",
    "Train_Val_Test",
]
SPLITS = {"1": "train", "2": "val", "3": "test"}


def _floats(text: str, n: int) -> list[float]:
    vals = [float(v) for v in str(text).replace("[", "").replace("]", "").split(",") if v.strip()]
    if len(vals) != n:
        raise ValueError(f"expected {n} numbers, got {text!r}")
    return vals


def _runs(numbers: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def discover(source: Path, cohort: str | None = None) -> AdapterResult:
    cohort = cohort or "deeplesion"
    rejected: list[tuple[str, str]] = []
    try:
        info = read_table(source / "DL_info.csv", REQUIRED, source)
    except TableError as err:
        # Without the table there are no lesions, spacing or splits: nothing to ingest.
        return AdapterResult(cohort, "deeplesion", [], [(err.path, err.reason)], list(LESION_NAMES))
    per_series: dict[str, list[tuple[int, LesionAnnotation, str, str, list[float]]]] = {}
    for i, row in info.iterrows():
        line = int(i) + 2
        try:
            series = row["File_name"].rsplit("_", 1)[0]
            key_no = int(row["Key_slice_index"])
            box = _floats(row["Bounding_boxes"], 4)
            ltype = int(float(row["Coarse_lesion_type"]))
            spacing = _floats(row["Spacing_mm_px_"], 3)  # x, y, z
            split = SPLITS.get(str(row["Train_Val_Test"]).strip(), "")
        except (ValueError, IndexError) as err:
            rejected.append(("DL_info.csv", f"line {line}: {err}"))
            continue
        name = LESION_NAMES[ltype - 1] if 1 <= ltype <= 8 else "unknown"
        les = LesionAnnotation(key_no, tuple(box), ltype, name)  # type: ignore[arg-type]
        per_series.setdefault(series, []).append((key_no, les, row["Patient_index"], split, spacing))

    cands: list[ScanCandidate] = []
    for series, entries in sorted(per_series.items()):
        folder = source / "Images_png" / series
        pngs = {int(p.stem): p for p in folder.glob("*.png") if p.stem.isdigit()} if folder.is_dir() else {}
        if not pngs:
            rejected.append((rel(folder, source), "series folder named in DL_info.csv has no PNG slices"))
            continue
        patient, split, spacing = entries[0][2], entries[0][3], entries[0][4]
        spacing_zyx = (spacing[2], spacing[1], spacing[0])
        for run in _runs(list(pngs)):
            lesions = []
            for key_no, les, *_ in entries:
                if run[0] <= key_no <= run[-1]:
                    lesions.append(
                        LesionAnnotation(key_no - run[0], les.box_xyxy, les.lesion_type, les.lesion_name)
                    )
            if not lesions:
                continue  # slices kept only as context for another run's lesion
            labels = {n: 0 for n in LESION_NAMES}
            for les in lesions:
                if les.lesion_name in labels:
                    labels[les.lesion_name] = 1
            if any(les.lesion_type < 1 for les in lesions):
                # Unlabelled lesions (DeepLesion test set) make absence of a type unknowable.
                labels = {n: (1 if v else -1) for n, v in labels.items()}
            files = [pngs[n] for n in run]
            cands.append(
                ScanCandidate(
                    ref=f"{series}#{run[0]:03d}-{run[-1]:03d}",
                    source=f"{rel(folder, source)} [{run[0]:03d}-{run[-1]:03d}]",
                    load=partial(read_png_slices, files, spacing_zyx),
                    size_bytes=files_size(files),
                    patient_ref=str(patient),
                    labels=labels,
                    lesions=lesions,
                    split=split,
                )
            )
    return AdapterResult(cohort, "deeplesion", cands, rejected, list(LESION_NAMES))
