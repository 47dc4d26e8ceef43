"""RAD-ChestCT: <split><nnnnn>.npz (HU under key 'ct', [z, y, x], 0.8 mm isotropic) + <split>_labels.csv.

The label table's key column is NoteAcc_DEID (the file stem); every other column is a binary finding.
File prefixes trn/val/tst give the split. One scan per patient in this cohort.
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
from slicefm.io.npz import read_npz_volume

SPLITS = {"trn": "train", "val": "val", "tst": "test"}
SPACING_MM = (0.8, 0.8, 0.8)


def discover(source: Path, cohort: str | None = None) -> AdapterResult:
    cohort = cohort or "radchest"
    rejected: list[tuple[str, str]] = []
    labels: dict[str, dict[str, int]] = {}
    names: list[str] = []
    lines: dict[str, tuple[str, int]] = {}
    for table_path in sorted(source.glob("*_labels.csv")):
        try:
            table = read_table(table_path, ["NoteAcc_DEID"], source)
        except TableError as err:
            rejected.append((err.path, err.reason))
            continue
        cols = [c for c in table.columns if c != "NoteAcc_DEID"]
        names = names or cols
        if cols != names:
            rejected.append(
                (rel(table_path, source), f"label columns {cols} differ from the other tables' {names}")
            )
            continue
        for i, row in table.iterrows():
            parsed, err = parse_label_row(row, cols, cols)
            if err:
                rejected.append((rel(table_path, source), f"line {int(i) + 2}: {err}"))
                continue
            labels[row["NoteAcc_DEID"]] = parsed
            lines[row["NoteAcc_DEID"]] = (rel(table_path, source), int(i) + 2)
    cands = []
    for path in sorted(source.glob("*.npz")):
        stem = path.stem
        cands.append(
            ScanCandidate(
                ref=stem,
                source=rel(path, source),
                load=partial(read_npz_volume, path, "ct", SPACING_MM),
                size_bytes=files_size(path),
                patient_ref=stem,
                labels=labels.get(stem, {}),
                split=SPLITS.get(stem[:3], ""),
                mask_file=mask_for(source, stem),
            )
        )
    stems = {c.ref for c in cands}
    for key, (table, line) in sorted(lines.items(), key=lambda kv: kv[1]):
        if key not in stems:
            rejected.append((table, f"line {line}: NoteAcc_DEID matches no .npz volume"))
    return AdapterResult(cohort, "radchest", cands, rejected, names)
