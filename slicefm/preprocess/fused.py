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
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slicefm.core.resume import record_identity
from slicefm.core.store import open_store
from slicefm.data.adapters.base import ScanCandidate
from slicefm.data.ingest import DEFAULT_MAX_TILT_DEG, IngestResult, ingest
from slicefm.preprocess.config import PreprocessConfig
from slicefm.preprocess.stage import (
    PreprocessResult,
    _read_masks,
    finish_preprocess,
    preprocess_identity,
    preprocess_scan,
)

log = logging.getLogger(__name__)


@dataclass
class FusedResult:
    ingest: IngestResult
    preprocess: PreprocessResult


def _preprocess_loaded(
    out_uri: str, cfg_json: str, scan_id: str, hu16: np.ndarray, cand: ScanCandidate, spacing_z_mm: float
) -> int:
    """The per-scan hook run in ingest's worker: preprocess the scan just read. Returns its slice count."""
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    n = hu16.shape[0]
    # The lesions ingest keeps (key slice inside the volume; the others go to its quarantine), as the
    # preprocess stage would read them from lesions.parquet.
    lesions = [
        {
            "key_slice": les.key_slice,
            "x0": float(les.box_xyxy[0]),
            "y0": float(les.box_xyxy[1]),
            "x1": float(les.box_xyxy[2]),
            "y1": float(les.box_xyxy[3]),
            "lesion_type": les.lesion_type,
        }
        for les in cand.lesions
        if 0 <= les.key_slice < n
    ]
    masks = None
    if cand.mask_file is not None and Path(cand.mask_file).exists():
        masks = _read_masks(Path(cand.mask_file).read_bytes())
    rows = preprocess_scan(scan_id, spacing_z_mm, hu16, lesions, masks, open_store(out_uri), cfg)
    return len(rows)


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
    scan_ids = sorted((ing.extra or {}).keys())
    pre = finish_preprocess(in_store, out, cfg, scan_ids)
    return FusedResult(ing, pre)


__all__ = ["ingest_and_preprocess", "FusedResult"]
