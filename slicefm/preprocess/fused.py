"""Ingest and preprocess in one pass: each scan is decoded once and preprocessed from memory.

The two stages stay runnable alone (`slicefm ingest`, `slicefm preprocess`); this runs both when the pipeline
wants both. Each worker reads a scan, checks it, converts it to int16 HU (ingest's steps, unchanged) and hands
the in-memory volume straight to `preprocess_scan`: no canonical volume is written and read back unless
`keep_volumes`, and one process pool (started once) serves both stages. The outputs are those of the two
stages run one after the other (same stacks, indexes and manifests; tested byte for byte), except that
without `keep_volumes` the ingest output holds manifests only (`volume` empty, dataset.json
``"volumes": false``), so `slicefm preprocess` refuses it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slicefm.core.resume import record_identity
from slicefm.core.store import open_store
from slicefm.data.adapters.base import ScanCandidate
from slicefm.data.ingest import DEFAULT_MAX_TILT_DEG, IngestResult, in_volume, ingest, lesion_record
from slicefm.preprocess.config import PreprocessConfig
from slicefm.preprocess.stage import (
    PreprocessResult,
    finish_preprocess,
    masks_from_npz,
    preprocess_identity,
    preprocess_scan,
)


@dataclass
class FusedResult:
    ingest: IngestResult
    preprocess: PreprocessResult


def _preprocess_loaded(
    out_uri: str, cfg_json: str, scan_id: str, hu: np.ndarray, cand: ScanCandidate, spacing_z_mm: float
) -> None:
    """The per-scan hook run in ingest's worker: preprocess the scan just read."""
    # The lesions ingest keeps, as the preprocess stage would read them from lesions.parquet.
    lesions = [lesion_record(les) for les in cand.lesions if in_volume(les, hu.shape[0])]
    masks = None
    if cand.mask_file is not None and Path(cand.mask_file).exists():
        masks = masks_from_npz(Path(cand.mask_file).read_bytes())
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    preprocess_scan(scan_id, spacing_z_mm, hu, lesions, masks, open_store(out_uri), cfg)


def ingest_and_preprocess(
    source: Path,
    ingest_uri: str,
    preprocess_uri: str,
    key: bytes,
    cfg: PreprocessConfig,
    fmt: str = "auto",
    cohort: str | None = None,
    workers: int = 1,
    data_version: str | None = None,
    max_tilt_deg: float = DEFAULT_MAX_TILT_DEG,
    keep_volumes: bool = False,
) -> FusedResult:
    """`ingest` into `ingest_uri` and `run_preprocess` into `preprocess_uri` in one pass over each scan.

    Raises what `ingest` raises (NoUsableScansError when every scan is quarantined). Every scan is
    preprocessed (no resume: the pass decodes every scan anyway); the preprocess output then records the
    identity a later `slicefm preprocess` of the same ingest output would, so that re-run resumes.
    """
    out = open_store(preprocess_uri)
    hook = functools.partial(_preprocess_loaded, out.uri(""), cfg.model_dump_json())
    ing = ingest(
        Path(source), ingest_uri, key, fmt, cohort, workers, data_version, max_tilt_deg,
        per_scan=hook, keep_volumes=keep_volumes,
    )  # fmt: skip
    in_store = open_store(ing.out_uri)
    record_identity(out, "preprocess", preprocess_identity(in_store, cfg))
    return FusedResult(ing, finish_preprocess(in_store, out, cfg))


__all__ = ["ingest_and_preprocess", "FusedResult"]
