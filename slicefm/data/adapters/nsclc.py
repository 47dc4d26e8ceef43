"""NSCLC-Radiomics (TCIA): NSCLC-Radiomics/LUNG1-nnn/<study>/<series>/*.dcm + the clinical CSV.

Target: `stage` = 1 for Overall.Stage III/IIIa/IIIb/IV, 0 for I/II, -1 when missing (CLEAR Task 3).
Only CT series are candidates; the RTSTRUCT/SEG series in the tree are reported as non-CT.
"""

from __future__ import annotations

from pathlib import Path

from slicefm.data.adapters.base import AdapterResult, TableError, read_table
from slicefm.data.adapters.dicom_tree import series_candidates

STAGE_LABEL = "stage"


def stage_target(overall_stage: str) -> int | None:
    """I/II -> 0, III*/IV -> 1, missing -> -1, anything else -> None (invalid)."""
    s = str(overall_stage).strip().upper()
    if s in ("", "NA", "NAN"):
        return -1
    if s.startswith("IV") or s.startswith("III"):
        return 1
    if s in ("I", "IA", "IB", "II", "IIA", "IIB"):
        return 0
    return None


def discover(source: Path, cohort: str | None = None) -> AdapterResult:
    cohort = cohort or "nsclc"
    dicom_root = source / "NSCLC-Radiomics" if (source / "NSCLC-Radiomics").is_dir() else source
    cands, rejected = series_candidates(dicom_root)
    rejected = [
        (f"{dicom_root.relative_to(source)}/{f}" if dicom_root != source else f, r) for f, r in rejected
    ]
    for c in cands:
        if dicom_root != source:
            c.source = f"{dicom_root.relative_to(source)}/{c.source}"
    stages: dict[str, int] = {}
    tables = sorted(source.glob("NSCLC-Radiomics-Lung1*.csv"))
    if not tables:
        rejected.append(
            ("NSCLC-Radiomics-Lung1.clinical*.csv", "clinical table not found: stage labels unknown")
        )
    for table_path in tables:
        try:
            table = read_table(table_path, ["PatientID", "Overall.Stage"], source)
        except TableError as err:
            rejected.append((err.path, err.reason))
            continue
        for i, row in table.iterrows():
            target = stage_target(row["Overall.Stage"])
            if target is None:
                rejected.append(
                    (table_path.name, f"line {int(i) + 2}: unknown Overall.Stage {row['Overall.Stage']!r}")
                )
                continue
            stages[row["PatientID"]] = target
    patients = {c.patient_ref for c in cands}
    for pid in stages:
        if pid not in patients:
            rejected.append(
                (tables[0].name, "a clinical row names a patient with no CT series in the source")
            )
    for c in cands:
        c.labels = {STAGE_LABEL: stages.get(c.patient_ref or "", -1)}
    return AdapterResult(cohort, "nsclc", cands, rejected, [STAGE_LABEL])
