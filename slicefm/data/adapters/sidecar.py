"""Optional label/lesion tables beside plain DICOM or NIfTI data (labels.csv, lesions.csv, masks/).

labels.csv: a key column (`scan_ref` = SeriesInstanceUID or file stem, or `patient_ref` = PatientID /
file stem) and any number of binary target columns. lesions.csv: the same key column plus
key_slice (canonical index), x0, y0, x1, y1 and lesion_type (1-8). masks/<ref>.npz: organ and lesion
masks in the canonical frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slicefm.data.adapters.base import LesionAnnotation, TableError, parse_label_row, read_table, rel

SIDECAR_FILES = ("labels.csv", "lesions.csv")
SIDECAR_DIRS = ("masks",)
KEY_COLUMNS = ("scan_ref", "patient_ref")
LESION_NAMES = ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft_tissue", "pelvis")


@dataclass
class Sidecars:
    key_column: str | None = None
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    label_lines: dict[str, int] = field(default_factory=dict)  # key -> table line, to report unmatched rows
    lesions: dict[str, list[LesionAnnotation]] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    patients: dict[str, str] = field(default_factory=dict)  # scan_ref -> patient_ref, when both columns exist

    def lookup(
        self, scan_ref: str, patient_ref: str | None
    ) -> tuple[dict[str, int], list[LesionAnnotation], str | None]:
        """Labels and lesions for a scan; also returns the key that matched (to track unused rows)."""
        key = scan_ref if self.key_column == "scan_ref" else patient_ref
        if key is None:
            return {}, [], None
        return self.labels.get(key, {}), self.lesions.get(key, []), key if key in self.labels else None

    def unmatched(self, used: set[str], table: str = "labels.csv") -> list[tuple[str, str]]:
        """Rows of the label table that name no scan of the source (reported by line, never by identifier)."""
        return [
            (table, f"line {line}: {self.key_column} matches no scan in the source")
            for key, line in sorted(self.label_lines.items(), key=lambda kv: kv[1])
            if key not in used
        ]


def is_sidecar(path: Path, root: Path) -> bool:
    r = Path(rel(path, root))
    return r.as_posix() in SIDECAR_FILES or (len(r.parts) > 1 and r.parts[0] in SIDECAR_DIRS)


def read_sidecars(root: Path) -> Sidecars:
    out = Sidecars()
    labels_path = root / "labels.csv"
    if labels_path.exists():
        try:
            df = read_table(labels_path, [], root)
            keys = [c for c in KEY_COLUMNS if c in df.columns]
            if not keys:
                raise TableError(
                    "labels.csv",
                    f"label table needs a key column ({' or '.join(KEY_COLUMNS)}); has {list(df.columns)}",
                )
            out.key_column = keys[0]
            cols = [c for c in df.columns if c not in KEY_COLUMNS]
            if not cols:
                raise TableError("labels.csv", "label table has a key column but no label columns")
            out.label_names = cols
            for i, row in df.iterrows():
                line = int(i) + 2  # header is line 1
                labels, err = parse_label_row(row, cols, cols)
                if err:
                    out.rejected.append(("labels.csv", f"line {line}: {err}"))
                    continue
                out.labels[str(row[out.key_column])] = labels
                if out.key_column == "scan_ref" and "patient_ref" in df.columns and row["patient_ref"]:
                    out.patients[str(row["scan_ref"])] = str(row["patient_ref"])
                out.label_lines[str(row[out.key_column])] = line
        except TableError as err:
            out.rejected.append((err.path, err.reason))
            out.key_column = None
    lesions_path = root / "lesions.csv"
    if lesions_path.exists() and out.key_column is not None:
        try:
            df = read_table(
                lesions_path, [out.key_column, "key_slice", "x0", "y0", "x1", "y1", "lesion_type"], root
            )
            for i, row in df.iterrows():
                try:
                    ltype = int(float(row["lesion_type"]))
                    les = LesionAnnotation(
                        key_slice=int(float(row["key_slice"])),
                        box_xyxy=tuple(float(row[c]) for c in ("x0", "y0", "x1", "y1")),  # type: ignore[arg-type]
                        lesion_type=ltype,
                        lesion_name=LESION_NAMES[ltype - 1] if 1 <= ltype <= 8 else "unknown",
                    )
                except ValueError as err:
                    out.rejected.append(("lesions.csv", f"line {int(i) + 2}: {err}"))
                    continue
                out.lesions.setdefault(str(row[out.key_column]), []).append(les)
        except TableError as err:
            out.rejected.append((err.path, err.reason))
    return out
