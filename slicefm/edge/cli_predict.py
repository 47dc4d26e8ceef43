"""`slicefm predict`: apply a registered (or pulled) model to new CT and write the predictions table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("slicefm")

PREVIEW_ROWS = 10


def _model_dir(args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    """The local model directory: --model-dir as given (verified against its MANIFEST.json when it has one), or
    --model pulled from the registry into $SLICEFM_HOME/models/<name>/<version> (reused when already there)."""
    from slicefm.edge.cli_models import _tracking_uri
    from slicefm.edge.state import state_dir
    from slicefm.edge.tracking.models import (
        MANIFEST_NAME,
        MANIFEST_TAG,
        ModelIntegrityError,
        parse_spec,
        pull_model,
        resolve_version,
        verify_manifest,
    )

    if args.model_dir:
        root = Path(args.model_dir)
        if (root / MANIFEST_NAME).is_file():
            verify_manifest(root, label=str(root))
        return root, {}
    uri = _tracking_uri(args.tracking_uri)
    spec = parse_spec(args.model)
    mv = resolve_version(spec, uri)
    dest = state_dir() / "models" / mv.name / str(mv.version)
    if dest.is_dir():
        try:
            verify_manifest(
                dest, (mv.tags or {}).get(MANIFEST_TAG), label=f"{mv.name}:{mv.version}"
            )
            log.info("using %s:%s pulled earlier to %s", mv.name, mv.version, dest)
        except ModelIntegrityError as err:
            log.warning("re-pulling %s:%s: %s", mv.name, mv.version, err)
            pull_model(f"{mv.name}:{mv.version}", dest, uri, overwrite=True)
    else:
        pull_model(f"{mv.name}:{mv.version}", dest, uri)
    return dest, {"name": mv.name, "version": str(mv.version), "spec": str(spec)}


def cmd_predict(args: argparse.Namespace) -> int:
    from slicefm.data.pseudonym import load_key
    from slicefm.edge.tracking.models import ModelIntegrityError, ModelRegistryError
    from slicefm.edge.tracking.preflight import TrackingError
    from slicefm.predict.bundle import LINEAGE_FILE, ModelBundleError, load_bundle
    from slicefm.predict.run import PredictError, run_predict, source_kind

    try:
        root, ref = _model_dir(args)
        bundle = load_bundle(root, require_encoder_version=bool(ref) or (root / LINEAGE_FILE).is_file())
        key = load_key() if source_kind(Path(args.source)) == "raw" else None
        res = run_predict(
            bundle, args.source, args.out, key, fmt=args.format, cohort=args.cohort, workers=args.workers,
            max_tilt_deg=args.max_tilt_deg, batch_size=args.batch_size, precision=args.precision,
            overwrite=args.force, model_ref=ref or {"dir": str(root)}, work_dir=args.work_dir,
            progress=not args.no_progress,
        )  # fmt: skip
    except (ModelBundleError, PredictError, ModelRegistryError, ModelIntegrityError, TrackingError) as err:
        log.error("%s", err)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    model = f"{ref['name']}:{ref['version']}" if ref else str(root)
    print(
        f"predicted {res.n_scans} scans ({res.n_slices} slices) with {model} ({bundle.task}, {bundle.protocol}) "
        f"in {res.seconds:.1f} s: {res.scans_per_s:.2f} scans/s, {res.slices_per_s:.1f} slices/s"
    )
    cols = ["scan_id", *[c for c in res.table.columns if c.startswith(("p_", "label_")) or c == "predicted"]]
    print(res.table[cols].head(PREVIEW_ROWS).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(res.table) > PREVIEW_ROWS:
        print(f"... {len(res.table) - PREVIEW_ROWS} more rows")
    print(f"table:  {res.out_dir / 'predictions.csv'} (and predictions.parquet, predictions_by_fold.parquet)")
    if bundle.has_attention:
        print(f"plots:  {res.out_dir / 'attention'}/<scan_id>.png (attention over slices)")
    print(f"report: {res.out_dir / 'report.html'}")
    if res.n_quarantined:
        print(
            f"{res.n_quarantined} inputs quarantined: see {res.out_dir / 'quarantine.csv'} for what and why"
        )
    return 0


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `predict` verb to the top-level `slicefm` parser."""
    s = subparsers.add_parser(
        "predict",
        help="apply a trained model to new CT: predictions table, attention plots, report",
        description="Ingest (same readers, pseudonymisation and quarantine rules), preprocess exactly as the "
        "model's lineage records, embed with the model's encoder and apply its fold heads (mean of the folds). "
        "Writes predictions.parquet/.csv (one row per scan), predictions_by_fold.parquet, attention/<scan>.png "
        "(ABMIL heads), quarantine.csv, predict.json and report.html into --out, which appears whole or not at all.",
    )
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model", metavar="NAME[@ALIAS|:VERSION]", help="a registered head model (pulled and cached)"
    )
    which.add_argument("--model-dir", help="a pulled head model (`slicefm models pull`); works offline")
    s.add_argument(
        "--source",
        required=True,
        help="DICOM tree / NIfTI dir / a cohort layout, or an ingest or preprocess output",
    )
    s.add_argument(
        "--format",
        default="auto",
        choices=["auto", "dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"],
    )
    s.add_argument(
        "--cohort", help="cohort name for the pseudonyms (default: from the layout, as ingest does)"
    )
    s.add_argument("--out", required=True, help="output directory (created; see --force)")
    s.add_argument(
        "--force", action="store_true", help="replace --out if it exists (only once the new one is complete)"
    )
    s.add_argument("--batch-size", type=int, default=64, help="slices per encoder batch")
    s.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on a GPU"
    )
    s.add_argument("--workers", type=int, default=1, help="ingest worker processes")
    s.add_argument("--max-tilt-deg", type=float, default=1.0, help="quarantine gantry tilts above this")
    s.add_argument(
        "--work-dir", help="where the ingested volumes go meanwhile (default: the system temp dir)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument(
        "--tracking-uri", help="MLflow registry URI for --model (default: MLFLOW_TRACKING_URI, else local)"
    )
    s.set_defaults(func=cmd_predict)
