"""Typed configuration of a cohort's raw data (where it comes from) and of its ingestion."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slicefm.core.config import Strict


class DataConfig(Strict):
    """Where the raw dataset comes from."""

    source: str = "data/demo"  # local path (DVC-tracked) of the dataset to ingest
    format: Literal["auto", "dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"] = "auto"
    cohort: str | None = None
    # Generated with the phantom generator when `source` is missing (the demo dataset is reproducible).
    phantom_if_missing: bool = True
    phantom_scans: int = Field(40, ge=2)
    phantom_format: Literal["dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"] = "dicom"
    phantom_profile: Literal["default", "shifted"] = "default"
    phantom_seed: int = 0
    phantom_size: int = Field(128, ge=32)


class IngestConfig(Strict):
    workers: int = Field(2, ge=1)
    # Tilted-gantry series are kept unresampled up to this tilt (deg) and quarantined above it.
    max_tilt_deg: float = Field(1.0, ge=0, lt=90)
    # The fused ingest + preprocess pass (the pipeline's data step, `slicefm ingest --preprocess-out`) also
    # writes the canonical int16 volumes (~0.5 MB per 512 px slice), so `slicefm preprocess` can later re-run
    # alone on its ingest output. `slicefm ingest` alone always writes them.
    keep_volumes: bool = False
