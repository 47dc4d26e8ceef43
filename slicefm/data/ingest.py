"""Ingestion: source dataset -> de-identified canonical volumes + validated manifests.

Writes, under the output location (local dir or s3://):
  volumes/<scan_id>.npy   int16 HU, canonical [z, y, x] (no headers, so no PHI travels further)
  masks/<scan_id>.npz     organ/lesion masks when the source has them (phantom data, segmentations)
  scans.parquet, lesions.parquet, quarantine.csv, dataset.json
One bad scan never stops the batch: it goes to quarantine.csv with the file and the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from slicefm import __version__
from slicefm.core.parallel import process_pool
from slicefm.core.store import Store, open_store, staged_output
from slicefm.data import pseudonym
from slicefm.data.adapters import detect_format, get_adapter
from slicefm.data.adapters.base import AdapterResult, LesionAnnotation, ScanCandidate
from slicefm.data.schemas import (
    LABEL_PREFIX,
    LesionsSchema,
    QuarantineSchema,
    ScansSchema,
    validate,
)
from slicefm.io.redact import redact_uids
from slicefm.io.volume import InvalidScanError, Volume

log = logging.getLogger(__name__)

AIR_HU = -1024
MAX_HU = 32767
# Gantry tilt is not resampled: it leaves tan(tilt) * z of shear, 5 mm over a 300 mm scan at 1 deg.
DEFAULT_MAX_TILT_DEG = 1.0  # config ingest.max_tilt_deg
TILT_TAG_TOLERANCE_DEG = 0.1  # GantryDetectorTilt is nominal: only a larger difference is worth a mention


# Work a fused pass does in the worker on each accepted scan, after its checks and int16 conversion:
# (scan_id, canonical HU volume: int16, or its exact float32 values when no volume is kept, the candidate,
# z spacing in mm). A module-level function (or functools.partial of one), so it can cross into the workers.
PerScanHook = Callable[[str, np.ndarray, ScanCandidate, float], None]


class NoUsableScansError(RuntimeError):
    """Every scan of the source was quarantined."""


@dataclass
class IngestResult:
    out_uri: str
    n_scans: int
    n_quarantined: int
    n_lesions: int
    cohort: str
    fmt: str


def label_slug(name: str) -> str:
    """'Arterial wall calcification' -> 'arterial_wall_calcification'."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def check_volume(vol: Volume, value_range: tuple[float, float] | None = None) -> None:
    """Reject volumes no later stage can use (raises InvalidScanError naming the problem).

    `value_range`: the volume's (min, max) when the caller has them (`round_in_place`), saving two passes.
    """
    hu = vol.hu
    if hu.ndim != 3:
        raise InvalidScanError(vol.source, f"expected a 3-D volume, got shape {hu.shape}")
    if hu.shape[0] < 2:
        raise InvalidScanError(vol.source, f"single-slice volume (shape {hu.shape}; need >= 2 slices)")
    # min and max are NaN or infinite exactly when some voxel is: one pass each, no mask of the whole volume
    # (counting the bad voxels only when there are some).
    lo, hi = value_range if value_range is not None else (float(hu.min()), float(hu.max()))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InvalidScanError(vol.source, f"{int((~np.isfinite(hu)).sum())} NaN/inf voxels")
    if hi - lo < 1.0:
        raise InvalidScanError(vol.source, f"constant volume (all voxels = {lo:.0f} HU)")
    if hi < -500:
        raise InvalidScanError(vol.source, f"no tissue above -500 HU (max {hi:.0f}): not a CT in HU?")
    if any(not np.isfinite(s) or s <= 0 for s in vol.spacing_mm):
        raise InvalidScanError(vol.source, f"invalid voxel spacing {vol.spacing_mm}")


def check_tilt(vol: Volume, max_tilt_deg: float) -> None:
    """Refuse a tilted-gantry series whose uncorrected shear would exceed what the config accepts."""
    if vol.tilt_deg > max_tilt_deg:
        raise InvalidScanError(
            vol.source,
            f"gantry tilt {vol.tilt_deg:.2f} deg exceeds max_tilt_deg {max_tilt_deg:g}; resample onto axial "
            "slices before ingestion or raise ingest.max_tilt_deg",
        )


def _tilt_warning(res: _Loaded, max_tilt_deg: float) -> str:
    """Log text for a kept tilted series (quoting GantryDetectorTilt when the header says otherwise)."""
    text = f"gantry tilt {res.tilt_deg:.2f} deg kept without shear correction (max_tilt_deg {max_tilt_deg:g})"
    tag = res.gantry_tilt_tag
    if tag is not None and abs(abs(tag) - res.tilt_deg) > TILT_TAG_TOLERANCE_DEG:
        text += f"; the header's GantryDetectorTilt says {tag:g} deg"
    return text


_INT16_CHUNK_SLICES = 8


def round_in_place(hu: np.ndarray) -> tuple[float, float] | None:
    """Round and clip a writable float volume in place (the canonical int16 values, still float), a few slices
    at a time, and return the (min, max) of its values before rounding, taken from each chunk while it is in
    cache: one pass over the volume instead of three. None, and `hu` untouched, when it is not a writable
    float array. A chunk holding NaN or inf stops the pass there, so `check_volume` still counts every bad voxel.
    """
    if not (hu.dtype.kind == "f" and hu.flags.writeable and hu.ndim >= 1 and hu.size):
        return None
    lo, hi = np.inf, -np.inf
    for i in range(0, hu.shape[0], _INT16_CHUNK_SLICES):
        chunk = hu[i : i + _INT16_CHUNK_SLICES]
        lo, hi = np.minimum(lo, chunk.min()), np.maximum(hi, chunk.max())  # NaN propagates
        if not (np.isfinite(lo) and np.isfinite(hi)):
            break
        np.rint(chunk, out=chunk)
        np.clip(chunk, AIR_HU, MAX_HU, out=chunk)
    return float(lo), float(hi)


def _to_int16(hu: np.ndarray, cast: bool = True, rounded: bool = False) -> np.ndarray:
    """Rounded, clipped int16 HU (the canonical volume). Rounds and clips `hu` in place when it is a writable
    float array (the reader's own volume, used once; `rounded`: `round_in_place` already did), then casts a
    few slices at a time: no full-size temporaries (measured ~8x faster than whole-volume temporaries on a
    300 x 512 x 512 volume). `cast=False` stops there and returns `hu`
    itself: the same values in float32, for a consumer that does not need int16 (the fused preprocess pass)."""
    if hu.dtype.kind == "f" and hu.flags.writeable and hu.ndim >= 1:
        if not rounded:
            round_in_place(hu)
        if not cast:
            return hu
        out = np.empty(hu.shape, dtype=np.int16)
        for i in range(0, hu.shape[0], _INT16_CHUNK_SLICES):
            out[i : i + _INT16_CHUNK_SLICES] = hu[i : i + _INT16_CHUNK_SLICES]
        return out
    rounded_hu = np.clip(np.rint(hu), AIR_HU, MAX_HU)
    return rounded_hu.astype(np.int16) if cast else rounded_hu.astype(np.float32)


@dataclass
class _Loaded:
    """What a worker sends back for one candidate (picklable)."""

    index: int
    ok: bool
    reason: str = ""
    scan_id: str = ""
    source: str = ""
    patient_ref: str = ""
    shape: tuple[int, int, int] = (0, 0, 0)
    spacing_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scanner: str = ""
    tilt_deg: float = 0.0
    gantry_tilt_tag: float | None = None


def _load_and_store(
    index: int,
    cand: ScanCandidate,
    scan_key_fn_args: tuple[bytes, str],
    out_uri: str,
    max_tilt_deg: float = DEFAULT_MAX_TILT_DEG,
    per_scan: PerScanHook | None = None,
    keep_volume: bool = True,
) -> _Loaded:
    """Read one candidate, check it, write its canonical volume (unless not `keep_volume`), then run
    `per_scan` on the in-memory int16 volume (runs in a worker process)."""
    key, cohort = scan_key_fn_args
    try:
        vol = cand.load()
        # Rounds the reader's own volume in place (it is used once) and yields its range for the checks.
        value_range = round_in_place(vol.hu)
        check_volume(vol, value_range)
        check_tilt(vol, max_tilt_deg)
    except InvalidScanError as err:
        return _Loaded(index, False, err.reason, source=cand.source)
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:
        # Readers translate the failures they know; anything else still only costs this scan.
        return _Loaded(index, False, f"unreadable: {err.__class__.__name__}: {err}", source=cand.source)
    patient_ref = (
        cand.patient_ref or vol.identifiers.get("PatientID") or vol.identifiers.get("StudyInstanceUID")
    )
    patient_ref = patient_ref or cand.ref
    scan_id = pseudonym.scan_pseudonym(key, cohort, cand.ref)
    store = open_store(out_uri)
    # Consumes vol.hu (rounded in place). A hook that does not need the int16 volume gets the same values
    # as float32 (what preprocessing would cast them to), without the int16 copy.
    hu = _to_int16(vol.hu, cast=keep_volume or per_scan is None, rounded=value_range is not None)
    if keep_volume:
        store.write_npy(f"volumes/{scan_id}.npy", hu)
    if cand.mask_file is not None and Path(cand.mask_file).exists():
        store.write_bytes(f"masks/{scan_id}.npz", Path(cand.mask_file).read_bytes())
    scanner = " ".join(str(vol.info.get(k, "")) for k in ("Manufacturer", "ManufacturerModelName")).strip()
    if per_scan is not None:
        per_scan(scan_id, hu, cand, float(vol.spacing_mm[0]))
    return _Loaded(
        index,
        True,
        scan_id=scan_id,
        source=cand.source,
        patient_ref=str(patient_ref),
        shape=vol.shape,
        spacing_mm=tuple(float(s) for s in vol.spacing_mm),  # type: ignore[arg-type]
        scanner=scanner,
        tilt_deg=float(vol.tilt_deg),
        gantry_tilt_tag=float(tag) if (tag := vol.info.get("GantryDetectorTilt")) is not None else None,
    )


def ingest(
    source: Path,
    out_uri: str,
    key: bytes,
    fmt: str = "auto",
    cohort: str | None = None,
    workers: int = 1,
    data_version: str | None = None,
    max_tilt_deg: float = DEFAULT_MAX_TILT_DEG,
    *,
    per_scan: PerScanHook | None = None,
    keep_volumes: bool = True,
) -> IngestResult:
    """Ingest one dataset. Raises NoUsableScansError (after writing quarantine.csv) when nothing is usable.

    DICOM series tilted by more than `max_tilt_deg` are quarantined (see check_tilt); milder tilts are kept
    with their angle in scans.parquet and a warning. A new local output appears whole or not at all
    (staged_output): a failure half-way leaves nothing behind.

    `per_scan` runs in the workers on each accepted scan's int16 volume (the fused ingest + preprocess pass,
    `slicefm.preprocess.fused`). `keep_volumes=False`
    writes no canonical volumes (scans.parquet's `volume` is then empty and dataset.json says so).
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"ingestion source {source} does not exist")
    with staged_output(out_uri) as work_uri:
        result, no_usable = _ingest(
            source, work_uri, key, fmt, cohort, workers, data_version, max_tilt_deg, per_scan, keep_volumes
        )
    out = open_store(out_uri)
    if no_usable is not None:
        raise NoUsableScansError(f"{no_usable} (see {out.uri('quarantine.csv')})")
    result.out_uri = out.uri("")
    return result


def _ingest(
    source: Path,
    out_uri: str,
    key: bytes,
    fmt: str,
    cohort: str | None,
    workers: int,
    data_version: str | None,
    max_tilt_deg: float,
    per_scan: PerScanHook | None = None,
    keep_volumes: bool = True,
) -> tuple[IngestResult, str | None]:
    """ingest() into `out_uri`; also the NoUsableScansError message when every scan was quarantined."""
    fmt = detect_format(source) if fmt == "auto" else fmt
    # The worker pool starts before discovery, so a forkserver's imports overlap the scan of the source tree.
    with process_pool(workers, _preload(per_scan)) if workers > 1 else contextlib.nullcontext() as pool:
        adapter_result: AdapterResult = get_adapter(fmt)(source, cohort)
        cohort = adapter_result.cohort
        log.info(
            "ingest %s (%s, cohort %s): %d candidate scans", source, fmt, cohort, len(adapter_result.candidates)
        )
        loaded = _load_all(
            adapter_result.candidates, key, cohort, out_uri, max_tilt_deg, per_scan, keep_volumes, pool
        )
    store = open_store(out_uri)
    quarantine = [(redact_uids(f, key), redact_uids(r, key)) for f, r in adapter_result.rejected]
    rows, lesion_rows = [], []
    for res in loaded:
        cand = adapter_result.candidates[res.index]
        if not res.ok:
            entry = (redact_uids(res.source, key), redact_uids(res.reason, key))
            quarantine.append(entry)
            log.warning("quarantined %s: %s", *entry)
            continue
        if res.tilt_deg > 0:
            log.warning("%s: %s", redact_uids(res.source, key), _tilt_warning(res, max_tilt_deg))
        scan_id = res.scan_id
        row = {
            "scan_id": scan_id,
            "patient_id": pseudonym.patient_pseudonym(key, cohort, res.patient_ref),
            "cohort": cohort,
            "format": cand.fmt or fmt,
            "source": redact_uids(cand.source, key),
            "volume": f"volumes/{scan_id}.npy" if keep_volumes else "",
            "modality": "CT",
            "n_slices": res.shape[0],
            "height": res.shape[1],
            "width": res.shape[2],
            "spacing_z_mm": res.spacing_mm[0],
            "spacing_y_mm": res.spacing_mm[1],
            "spacing_x_mm": res.spacing_mm[2],
            "split": cand.split,
            "scanner": res.scanner,
            "tilt_deg": res.tilt_deg,
        }
        for name in adapter_result.label_names:
            row[LABEL_PREFIX + label_slug(name)] = int(cand.labels.get(name, -1))
        rows.append(row)
        for i, les in enumerate(cand.lesions):
            if not in_volume(les, res.shape[0]):
                quarantine.append(
                    (cand.source, f"lesion {i}: key slice {les.key_slice} outside 0..{res.shape[0] - 1}")
                )
                continue
            lesion_rows.append({"scan_id": scan_id, "lesion_index": i, **lesion_record(les)})

    label_cols = [LABEL_PREFIX + label_slug(n) for n in adapter_result.label_names]
    scans = pd.DataFrame(rows, columns=list(ScansSchema.to_schema().columns)[:-1] + label_cols)
    scans = scans.sort_values("scan_id").reset_index(drop=True)
    lesions = pd.DataFrame(lesion_rows, columns=list(LesionsSchema.to_schema().columns))
    quarantine_df = pd.DataFrame(quarantine, columns=["file", "reason"])
    write_manifests(store, scans, lesions, quarantine_df)
    for name in ("organ_classes.json", "finding_classes.json"):  # class names of the copied masks
        if (source / "masks" / name).exists():
            store.write_bytes(f"masks/{name}", (source / "masks" / name).read_bytes())
    summary = {
        "source_format": fmt,
        "cohort": cohort,
        "data_version": data_version,
        "slicefm_version": __version__,
        "pseudonym_key_fingerprint": pseudonym.key_fingerprint(key),
        "n_scans": len(scans),
        "n_patients": int(scans["patient_id"].nunique()) if len(scans) else 0,
        "n_slices": int(scans["n_slices"].sum()) if len(scans) else 0,
        "n_lesions": len(lesions),
        "n_quarantined": len(quarantine_df),
        "labels": label_cols,
        "splits": scans["split"].value_counts().to_dict() if len(scans) else {},
        "n_scans_by_format": scans["format"].value_counts().to_dict() if len(scans) else {},
        "volumes": keep_volumes,
    }
    store.write_bytes("dataset.json", json.dumps(summary, indent=2, sort_keys=True).encode())
    log.info(
        "ingested %d scans %s, %d lesions; %d quarantined",
        len(scans),
        summary["n_scans_by_format"],
        len(lesions),
        len(quarantine_df),
    )
    if len(scans) == 0:
        reasons = quarantine_df["reason"].value_counts().head(5).to_dict()
        no_usable = (
            f"no usable scan in {source}: {len(quarantine_df)} inputs quarantined; most common reasons: {reasons}"
        )
    else:
        no_usable = None
    return IngestResult(store.uri(""), len(scans), len(quarantine_df), len(lesions), cohort, fmt), no_usable


def in_volume(les: LesionAnnotation, n_slices: int) -> bool:
    """Whether a lesion's key slice lies in its scan (ingest quarantines the others)."""
    return 0 <= les.key_slice < n_slices


def lesion_record(les: LesionAnnotation) -> dict:
    """A lesion's lesions.parquet fields (without scan_id and lesion_index), as preprocessing reads them."""
    x0, y0, x1, y1 = (float(v) for v in les.box_xyxy)
    return {
        "key_slice": les.key_slice, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
        "lesion_type": les.lesion_type, "lesion_name": les.lesion_name,
    }  # fmt: skip


def _preload(per_scan: PerScanHook | None) -> tuple[str, ...]:
    """Modules the workers' server imports once: ingest's (no torch), and a per-scan hook's module."""
    hook_module = getattr(getattr(per_scan, "func", per_scan), "__module__", None)
    return (__name__,) if hook_module is None else (__name__, hook_module)


def _load_all(
    cands: list[ScanCandidate],
    key: bytes,
    cohort: str,
    out_uri: str,
    max_tilt_deg: float,
    per_scan: PerScanHook | None = None,
    keep_volumes: bool = True,
    pool: ProcessPoolExecutor | None = None,
) -> list[_Loaded]:
    """Every candidate through `_load_and_store`: in `pool` when given (and there are several), else here."""
    args = (key, cohort)
    extra = {"per_scan": per_scan, "keep_volume": keep_volumes}
    if pool is None or len(cands) <= 1:
        return [
            _load_and_store(i, c, args, out_uri, max_tilt_deg, **extra)
            for i, c in enumerate(tqdm(cands, desc="ingest", unit="scan"))
        ]
    # Largest first (longest-processing-time order): the last scans to finish are small ones, so the workers
    # end together instead of one reading a big series alone at the end.
    order = sorted(range(len(cands)), key=lambda i: -cands[i].size_bytes)
    futures = {i: pool.submit(_load_and_store, i, cands[i], args, out_uri, max_tilt_deg, **extra) for i in order}
    done = [futures[i].result() for i in tqdm(order, desc="ingest", unit="scan")]
    return sorted(done, key=lambda res: res.index)


def write_manifests(
    store: Store, scans: pd.DataFrame, lesions: pd.DataFrame, quarantine: pd.DataFrame
) -> None:
    """Validate and write the three tables (each write is atomic)."""
    scans = validate(scans, ScansSchema, "scans.parquet")
    lesions = validate(lesions, LesionsSchema, "lesions.parquet")
    quarantine = validate(quarantine, QuarantineSchema, "quarantine.csv")
    store.write_parquet("scans.parquet", scans)
    store.write_parquet("lesions.parquet", lesions)
    store.write_bytes("quarantine.csv", quarantine.to_csv(index=False).encode())


def read_scans(store: Store) -> pd.DataFrame:
    """scans.parquet, validated on read."""
    return validate(store.read_parquet("scans.parquet"), ScansSchema, store.uri("scans.parquet"))


def read_lesions(store: Store) -> pd.DataFrame:
    return validate(store.read_parquet("lesions.parquet"), LesionsSchema, store.uri("lesions.parquet"))
