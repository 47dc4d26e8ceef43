"""CT-RATE: dataset/<split>/<split>_<n>/<split>_<n>_<r>/<volume>.nii.gz, metadata and 18-label CSVs.

The released NIfTI headers do not carry usable spacing or HU scaling: spacing comes from
dataset/metadata/<split>_metadata.csv (XYSpacing "[x, y]", ZSpacing) and HU = stored * RescaleSlope +
RescaleIntercept from the same table. Labels: dataset/multi_abnormality_labels/<split>_predicted_labels.csv.
CT-RATE "valid" is the papers' test split.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from slicefm.data.adapters.base import (
    AdapterResult,
    ScanCandidate,
    TableError,
    files_size,
    parse_label_row,
    read_table,
    rel,
)
from slicefm.data.adapters.masks import mask_for
from slicefm.io.nifti import read_nifti

CTRATE_CLASSES = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)  # fmt: skip
META_COLUMNS = ["VolumeName", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope"]
SPLIT_NAMES = {"train": "train", "valid": "test", "val": "val", "test": "test"}


def _xy(text: str) -> tuple[float, float]:
    vals = [float(v) for v in str(text).strip("[]() ").split(",")]
    if len(vals) != 2:
        raise ValueError(f"XYSpacing {text!r} is not two numbers")
    return vals[0], vals[1]


def discover(source: Path, cohort: str | None = None) -> AdapterResult:
    cohort = cohort or "ctrate"
    root = source / "dataset"
    rejected: list[tuple[str, str]] = []
    cands: list[ScanCandidate] = []
    volumes = {p.name: p for p in root.rglob("*.nii.gz")} | {p.name: p for p in root.rglob("*.nii")}
    seen: set[str] = set()
    for meta_path in sorted((root / "metadata").glob("*_metadata.csv")):
        split_name = meta_path.name[: -len("_metadata.csv")]
        try:
            meta = read_table(meta_path, META_COLUMNS, source)
        except TableError as err:
            rejected.append((err.path, err.reason))
            continue
        labels_path = root / "multi_abnormality_labels" / f"{split_name}_predicted_labels.csv"
        labels: dict[str, dict[str, int]] = {}
        if labels_path.exists():
            try:
                table = read_table(labels_path, ["VolumeName", *CTRATE_CLASSES], source)
                for i, row in table.iterrows():
                    parsed, err = parse_label_row(row, list(CTRATE_CLASSES), list(CTRATE_CLASSES))
                    if err:
                        rejected.append((rel(labels_path, source), f"line {int(i) + 2}: {err}"))
                    else:
                        labels[row["VolumeName"]] = parsed
                unknown = sorted(set(labels) - set(meta["VolumeName"]))
                for name in unknown:
                    rejected.append(
                        (rel(labels_path, source), f"labels for {name} which has no metadata row")
                    )
            except TableError as err:
                rejected.append((err.path, err.reason))
        for i, row in meta.iterrows():
            name = row["VolumeName"]
            path = volumes.get(name)
            if path is None:
                rejected.append(
                    (rel(meta_path, source), f"line {int(i) + 2}: volume {name} not found under dataset/")
                )
                continue
            try:
                x, y = _xy(row["XYSpacing"])
                spacing = (float(row["ZSpacing"]), y, x)
                rescale = (float(row["RescaleSlope"]), float(row["RescaleIntercept"]))
            except ValueError as err:
                rejected.append((rel(meta_path, source), f"line {int(i) + 2}: {err}"))
                continue
            seen.add(name)
            cands.append(
                ScanCandidate(
                    ref=name,
                    source=rel(path, source),
                    load=partial(read_nifti, path, spacing, rescale),
                    size_bytes=files_size(path),
                    patient_ref="_".join(name.split("_")[:2]),  # train_1_a_1 -> patient train_1
                    labels=labels.get(name, {}),
                    split=SPLIT_NAMES.get(split_name, ""),
                    mask_file=mask_for(source, name.split(".nii")[0]),
                )
            )
    for name, path in sorted(volumes.items()):
        if name not in seen and not any(c.ref == name for c in cands):
            rejected.append((rel(path, source), "volume has no row in any metadata CSV (no spacing/rescale)"))
    return AdapterResult(cohort, "ctrate", cands, rejected, list(CTRATE_CLASSES))
