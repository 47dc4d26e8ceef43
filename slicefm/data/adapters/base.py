"""What every dataset adapter returns: scan candidates (not yet read), their targets, and rejections."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from slicefm.io.volume import Volume


@dataclass
class LesionAnnotation:
    """One annotated lesion in the canonical volume frame of its scan."""

    key_slice: int
    box_xyxy: tuple[float, float, float, float]
    lesion_type: int  # DeepLesion coarse type 1-8, -1 unknown
    lesion_name: str


@dataclass
class ScanCandidate:
    """A scan the adapter found; `load` reads it (picklable: a functools.partial of a module function)."""

    ref: str  # stable source reference (series UID, relative path, volume name): hashed into scan_id
    source: str  # path relative to the source root, for the manifest and quarantine
    load: Callable[[], Volume]
    patient_ref: str | None = None  # None: take PatientID from the volume's identifiers after loading
    labels: dict[str, int] = field(default_factory=dict)
    lesions: list[LesionAnnotation] = field(default_factory=list)
    split: str = ""
    mask_file: Path | None = None  # organ/lesion masks (npz: organ, lesion) when the source has them
    fmt: str = ""  # format of this scan when the adapter reads several (mixed trees); "" = the adapter's
    size_bytes: int = 0  # bytes `load` reads (0: unknown): ingest starts the largest scans first


@dataclass
class AdapterResult:
    cohort: str
    fmt: str
    candidates: list[ScanCandidate]
    rejected: list[tuple[str, str]]  # (file relative to the source, reason)
    label_names: list[str]


def files_size(paths: Path | list[Path]) -> int:
    """Bytes on disk of a scan's file(s) (0 for any that cannot be stat'ed: the read will say why)."""
    total = 0
    for path in [paths] if isinstance(paths, Path) else paths:
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def rel(path: Path, root: Path) -> str:
    """Path relative to the source root (what manifests and quarantine record)."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def read_table(path: Path, required: list[str], root: Path) -> pd.DataFrame:
    """Read a CSV label/metadata table; a missing file or missing columns raise TableError."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises many types for corrupt CSVs
        raise TableError(rel(path, root), f"unreadable table: {err.__class__.__name__}: {err}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise TableError(
            rel(path, root), f"label table is missing required columns {missing}; has {list(df.columns)}"
        )
    return df


class TableError(ValueError):
    """A label or metadata table that cannot be used as a whole."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def parse_binary(value: str) -> int | None:
    """'0'/'1' (also '0.0', 'True') -> 0/1; '' or 'NA' -> -1 (unknown); anything else -> None (invalid)."""
    v = str(value).strip()
    if v in ("", "NA", "nan", "NaN", "-1"):
        return -1
    if v in ("1", "1.0", "True", "true"):
        return 1
    if v in ("0", "0.0", "False", "false"):
        return 0
    return None


def parse_label_row(
    row: pd.Series, columns: list[str], names: list[str]
) -> tuple[dict[str, int], str | None]:
    """Binary labels of one table row; returns (labels, error) with error naming the bad column."""
    labels: dict[str, int] = {}
    for col, name in zip(columns, names, strict=True):
        parsed = parse_binary(row[col])
        if parsed is None:
            return {}, f"column {col!r} has non-binary value {str(row[col])[:20]!r}"
        labels[name] = parsed
    return labels, None
