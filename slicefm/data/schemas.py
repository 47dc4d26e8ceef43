"""pandera schemas for the files stages hand each other (validated on write and on read)."""

from __future__ import annotations

from typing import Optional

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

FORMATS = ("dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc")
SPLITS = ("train", "val", "test", "")
LABEL_PREFIX = "label_"


class SchemaValidationError(ValueError):
    """A table that does not match its schema; the message lists every failing column/check."""


class ScansSchema(pa.DataFrameModel):
    """scans.parquet: one row per usable scan. IDs are keyed-hash pseudonyms, never source identifiers."""

    scan_id: Series[str] = pa.Field(unique=True, str_matches=r"^S[0-9a-f]{16}$")
    patient_id: Series[str] = pa.Field(str_matches=r"^P[0-9a-f]{16}$")
    cohort: Series[str]
    format: Series[str] = pa.Field(isin=list(FORMATS))
    source: Series[str]  # path relative to the ingestion source root
    volume: Series[str]  # key of the canonical int16 HU volume (volumes/<scan_id>.npy) in the ingest output
    modality: Series[str] = pa.Field(eq="CT")
    n_slices: Series[int] = pa.Field(ge=2)
    height: Series[int] = pa.Field(gt=0)
    width: Series[int] = pa.Field(gt=0)
    spacing_z_mm: Series[float] = pa.Field(gt=0, le=20)
    spacing_y_mm: Series[float] = pa.Field(gt=0, le=10)
    spacing_x_mm: Series[float] = pa.Field(gt=0, le=10)
    split: Series[str] = pa.Field(isin=list(SPLITS))
    scanner: Series[str]
    # Gantry tilt (deg) measured from DICOM slice positions, not resampled; 0.0 for other formats.
    # Optional so that manifests written before it existed still read.
    tilt_deg: Optional[Series[float]] = pa.Field(ge=0, lt=90)  # noqa: UP045
    # Targets: any number of label_<name> columns; 1 present, 0 absent, -1 unknown.
    labels: Optional[Series[int]] = pa.Field(alias=rf"^{LABEL_PREFIX}.+", regex=True, isin=[-1, 0, 1])  # noqa: UP045

    class Config:
        coerce = True
        strict = True


class LesionsSchema(pa.DataFrameModel):
    """lesions.parquet: key-slice lesion annotations in the canonical volume frame (pixels)."""

    scan_id: Series[str] = pa.Field(str_matches=r"^S[0-9a-f]{16}$")
    lesion_index: Series[int] = pa.Field(ge=0)
    key_slice: Series[int] = pa.Field(ge=0)
    x0: Series[float] = pa.Field(ge=0)
    y0: Series[float] = pa.Field(ge=0)
    x1: Series[float] = pa.Field(ge=0)
    y1: Series[float] = pa.Field(ge=0)
    lesion_type: Series[int] = pa.Field(ge=-1, le=8)  # DeepLesion coarse type 1-8, -1 unknown
    lesion_name: Series[str]

    @pa.dataframe_check
    def boxes_are_ordered(cls, df: pd.DataFrame) -> Series[bool]:
        return (df["x1"] >= df["x0"]) & (df["y1"] >= df["y0"])

    class Config:
        coerce = True
        strict = True


class QuarantineSchema(pa.DataFrameModel):
    """quarantine.csv: every input that was not used, and why."""

    file: Series[str]
    reason: Series[str] = pa.Field(str_length={"min_value": 1})

    class Config:
        coerce = True
        strict = True


class SlicesSchema(pa.DataFrameModel):
    """slices.parquet: one row per preprocessed slice (row `row` of stack `stack` in shard `shard`)."""

    scan_id: Series[str] = pa.Field(str_matches=r"^S[0-9a-f]{16}$")
    slice_index: Series[int] = pa.Field(ge=0)
    z_mm: Series[float]
    slab_id: Series[int] = pa.Field(ge=0)
    shard: Series[int] = pa.Field(ge=0)
    stack: Series[str]
    row: Series[int] = pa.Field(ge=0)
    is_key_slice: Series[bool]
    # JSON list of [x0, y0, x1, y1, lesion_type] in the output (cropped + resized) frame; "[]" when none.
    lesion_boxes: Series[str]

    class Config:
        coerce = True
        strict = True


def validate(df: pd.DataFrame, schema: type[pa.DataFrameModel], what: str) -> pd.DataFrame:
    """Validate lazily and raise one readable error listing every failure."""
    try:
        return schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases[["column", "check", "failure_case"]].drop_duplicates().head(20)
        raise SchemaValidationError(
            f"{what} does not match {schema.__name__}:\n{cases.to_string(index=False)}"
        ) from None


def label_columns(df: pd.DataFrame) -> list[str]:
    """The label_<name> target columns of a scans table, in table order."""
    return [c for c in df.columns if c.startswith(LABEL_PREFIX)]
