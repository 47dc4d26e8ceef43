"""`slicefm predict`: new CT (raw DICOM / NIfTI, or an ingest or preprocess output) -> per-scan predictions.

Raw data goes through the pipeline's own ingest (readers, pseudonymisation, quarantine rules). Each usable
scan is then preprocessed with exactly the preprocessing the model records, embedded and scored
(`slicefm.predict.scoring`) in one pass, without writing its stack anywhere. A scan that fails any step is
quarantined with the reason; the others are still predicted. The output directory appears whole when
everything is written (built as a hidden sibling, then renamed), or not at all.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from slicefm import __version__
from slicefm.core.store import Store, open_store, replace_dir
from slicefm.data.ingest import DEFAULT_MAX_TILT_DEG, NoUsableScansError, ingest, read_scans
from slicefm.data.schemas import QuarantineSchema, validate
from slicefm.predict.bundle import ModelBundle, preprocess_differences
from slicefm.predict.report import write_attention_plot, write_report
from slicefm.predict.scoring import inference_device, score_stack
from slicefm.preprocess.config import PreprocessConfig
from slicefm.preprocess.stage import preprocess_volume, require_volumes

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.parquet"
PREDICTIONS_CSV = "predictions.csv"
BY_FOLD = "predictions_by_fold.parquet"
QUARANTINE = "quarantine.csv"
SUMMARY = "predict.json"
REPORT = "report.html"


class PredictError(RuntimeError):
    """Nothing can be predicted: the data does not fit the model, or no scan is usable."""


@dataclass
class PredictResult:
    out_dir: Path
    n_scans: int
    n_quarantined: int
    n_slices: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def scans_per_s(self) -> float:
        return self.n_scans / self.seconds if self.seconds > 0 else 0.0

    @property
    def slices_per_s(self) -> float:
        return self.n_slices / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Scan:
    """One scan to predict: where its pixels come from and what the table says about it."""

    scan_id: str
    patient_id: str
    source: str
    spacing_z_mm: float
    load: Callable[[], tuple[np.ndarray, bool]]  # () -> (array, whether it is already a preprocessed stack)


def source_kind(source: Path) -> str:
    """ "preprocessed" (a preprocess output), "ingested" (an ingest output) or "raw" (a dataset to ingest)."""
    if (source / "preprocess.json").is_file():
        return "preprocessed"
    if (source / "scans.parquet").is_file() and (source / "dataset.json").is_file():
        return "ingested"
    return "raw"


def run_predict(
    bundle: ModelBundle,
    source: str | Path,
    out: str | Path,
    key: bytes | None = None,
    *,
    fmt: str = "auto",
    cohort: str | None = None,
    workers: int = 1,
    max_tilt_deg: float = DEFAULT_MAX_TILT_DEG,
    batch_size: int = 64,
    precision: str = "auto",
    overwrite: bool = False,
    model_ref: dict[str, Any] | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> PredictResult:
    """Predict every usable scan under `source` into the directory `out` (see the module docstring).

    `key`: the pseudonymisation key, needed only to ingest raw data; pseudonyms also depend on the `cohort`
    (default: named by the source's layout, e.g. its directory name). `model_ref`: what the caller knows about
    where the model came from (registry name and version), recorded in predict.json and the report."""
    source, out = Path(source), Path(out).expanduser().absolute()
    if not source.exists():
        raise FileNotFoundError(f"predict source {source} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; remove it or predict with --force")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    kind = source_kind(source)
    with tempfile.TemporaryDirectory(prefix="slicefm-predict-", dir=work_dir) as work:
        scans, quarantine = _scans(
            bundle, source, kind, Path(work), key, fmt, cohort, workers, max_tilt_deg, timings
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            rows, by_fold, n_slices = _predict_all(
                bundle, scans, staging, quarantine, batch_size, precision, timings, progress
            )
            if not rows:
                reasons = "; ".join(f"{f}: {r}" for f, r in quarantine[:5])
                raise PredictError(
                    f"no scan under {source} could be predicted ({len(quarantine)} quarantined: {reasons})"
                )
            seconds = time.perf_counter() - t0
            table = _write_outputs(
                bundle, staging, rows, by_fold, quarantine, n_slices, seconds, timings, kind, model_ref
            )
            replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info(
        "predicted %d scans (%d slices) in %.1f s, %d quarantined -> %s", len(rows), n_slices, seconds,
        len(quarantine), out,
    )  # fmt: skip
    return PredictResult(out, len(rows), len(quarantine), n_slices, seconds, timings, table)


# -- where the scans come from ------------------------------------------------------------------------------
def _scans(
    bundle: ModelBundle,
    source: Path,
    kind: str,
    work: Path,
    key: bytes | None,
    fmt: str,
    cohort: str | None,
    workers: int,
    max_tilt_deg: float,
    timings: dict[str, float],
) -> tuple[list[_Scan], list[tuple[str, str]]]:
    if kind == "preprocessed":
        return _preprocessed_scans(bundle, open_store(source)), []
    if kind == "raw":
        if key is None:
            raise PredictError("ingesting raw data needs the pseudonymisation key (see `slicefm key show`)")
        t = time.perf_counter()
        try:
            ingest(source, str(work / "ingest"), key, fmt, cohort, workers=workers, max_tilt_deg=max_tilt_deg)
        except NoUsableScansError as err:
            raise PredictError(str(err).replace(str(work / "ingest"), "the ingest step")) from err
        timings["ingest_s"] = time.perf_counter() - t
        store = open_store(str(work / "ingest"))
    else:
        store = open_store(source)
    return _ingested_scans(store), _quarantine_of(store)


def _quarantine_of(store: Store) -> list[tuple[str, str]]:
    if not store.exists(QUARANTINE):
        return []
    table = pd.read_csv(io.BytesIO(store.read_bytes(QUARANTINE)), dtype=str, keep_default_na=False)
    return list(zip(table["file"], table["reason"], strict=True))


def _ingested_scans(store: Store) -> list[_Scan]:
    def loader(volume: str) -> Callable[[], tuple[np.ndarray, bool]]:
        return lambda: (store.read_npy(volume, mmap=True), False)

    scans = read_scans(store)
    try:
        require_volumes(scans, store)
    except ValueError as err:
        raise PredictError(f"{err}; or give the raw data or the preprocess output as --source") from err
    return [
        _Scan(
            str(r["scan_id"]),
            str(r["patient_id"]),
            str(r["source"]),
            float(r["spacing_z_mm"]),
            loader(str(r["volume"])),
        )
        for r in scans.to_dict("records")
    ]


def _preprocessed_scans(bundle: ModelBundle, store: Store) -> list[_Scan]:
    """A preprocess output is used only when its preprocessing is the model's (else PredictError)."""
    data_cfg = PreprocessConfig.model_validate(store.read_json("preprocess.json")["config"])
    if diff := preprocess_differences(bundle.preprocess, data_cfg):
        raise PredictError(
            f"{store.uri('')} was preprocessed differently from what the model expects: {'; '.join(diff)}. "
            "Predict from the raw data or the ingest output instead: predict then preprocesses as the model did"
        )
    scans = read_scans(store).set_index("scan_id")
    slices = store.read_parquet("slices.parquet", columns=["scan_id", "stack", "row"])
    out = []
    for scan_id, rows in slices.groupby("scan_id", sort=True):
        row = scans.loc[scan_id]
        stack_key, order = str(rows["stack"].iloc[0]), np.sort(rows["row"].to_numpy())

        def load(k: str = stack_key, o: np.ndarray = order) -> tuple[np.ndarray, bool]:
            return store.read_npy(k)[o], True

        out.append(
            _Scan(str(scan_id), str(row["patient_id"]), str(row["source"]), float(row["spacing_z_mm"]), load)
        )
    return out


# -- scoring -------------------------------------------------------------------------------------------------
def _predict_all(
    bundle: ModelBundle,
    scans: list[_Scan],
    out: Path,
    quarantine: list[tuple[str, str]],
    batch_size: int,
    precision: str,
    timings: dict[str, float],
    progress: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    device, bf16 = inference_device(precision)
    rows: list[dict[str, Any]] = []
    by_fold: list[dict[str, Any]] = []
    n_slices = 0
    timings.setdefault("preprocess_s", 0.0)
    timings.setdefault("embed_and_score_s", 0.0)
    timings.setdefault("plots_s", 0.0)
    for scan in tqdm(scans, desc="predict", unit="scan", disable=not progress):
        try:
            t = time.perf_counter()
            array, is_stack = scan.load()
            stack = array if is_stack else preprocess_volume(np.asarray(array), bundle.preprocess)[0]
            t1 = time.perf_counter()
            scores = score_stack(bundle, stack, batch_size, device, bf16)
            t2 = time.perf_counter()
        except (ValueError, RuntimeError, OSError, MemoryError) as err:
            quarantine.append((scan.source, f"predict: {err}"))
            log.warning("quarantined %s: %s", scan.source, err)
            continue
        timings["preprocess_s"] += t1 - t
        timings["embed_and_score_s"] += t2 - t1
        n = int(stack.shape[0])
        n_slices += n
        rows.append(_row(bundle, scan, n, scores))
        for fold, probs in zip(bundle.folds, scores.by_fold, strict=True):
            by_fold.append({"scan_id": scan.scan_id, "fold": fold.fold,
                            **{f"p_{c}": float(p) for c, p in zip(bundle.class_names, probs, strict=True)}})  # fmt: skip
        if scores.attention is not None:
            t3 = time.perf_counter()
            z = np.arange(n, dtype=np.float64) * scan.spacing_z_mm
            write_attention_plot(bundle, scan.scan_id, scores, z, out / "attention")
            timings["plots_s"] += time.perf_counter() - t3
    return rows, by_fold, n_slices


def _row(bundle: ModelBundle, scan: _Scan, n: int, scores: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "scan_id": scan.scan_id,
        "patient_id": scan.patient_id,
        "source": scan.source,
        "n_slices": n,
    }
    row |= {f"p_{c}": float(p) for c, p in zip(bundle.class_names, scores.probabilities, strict=True)}
    row |= {f"label_{c}": int(v) for c, v in zip(bundle.class_names, scores.labels, strict=True)}
    if bundle.loss == "ce":  # exclusive classes: the most probable one
        row["predicted"] = bundle.class_names[int(np.argmax(scores.probabilities))]
    return row


# -- outputs -------------------------------------------------------------------------------------------------
def _write_outputs(
    bundle: ModelBundle,
    out: Path,
    rows: list[dict[str, Any]],
    by_fold: list[dict[str, Any]],
    quarantine: list[tuple[str, str]],
    n_slices: int,
    seconds: float,
    timings: dict[str, float],
    kind: str,
    model_ref: dict[str, Any] | None,
) -> pd.DataFrame:
    table = pd.DataFrame(rows).sort_values("scan_id").reset_index(drop=True)
    table.to_parquet(out / PREDICTIONS, index=False)
    table.to_csv(out / PREDICTIONS_CSV, index=False)
    pd.DataFrame(by_fold).sort_values(["scan_id", "fold"]).to_parquet(out / BY_FOLD, index=False)
    q = validate(pd.DataFrame(quarantine, columns=["file", "reason"]), QuarantineSchema, QUARANTINE)
    q.to_csv(out / QUARANTINE, index=False)
    summary = {
        "slicefm_version": __version__,
        "model": {**(model_ref or {}), **bundle.describe()},
        "source_kind": kind,
        "n_scans": len(rows),
        "n_quarantined": len(quarantine),
        "n_slices": n_slices,
        "seconds": round(seconds, 3),
        "scans_per_s": round(len(rows) / seconds, 4) if seconds > 0 else None,
        "slices_per_s": round(n_slices / seconds, 2) if seconds > 0 else None,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_report(bundle, out, table, q, summary)
    return table
