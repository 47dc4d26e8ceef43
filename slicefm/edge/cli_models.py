"""`slicefm models list|pull`: browse the model registry and fetch a verified model version."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime

log = logging.getLogger("slicefm")


def _tracking_uri(explicit: str | None) -> str:
    """Resolve the URI (flag, MLFLOW_TRACKING_URI, project sqlite) and fail fast when a server is down:
    MLflow's own client would retry for minutes before reporting it."""
    from slicefm.edge.tracking.mlflow_runs import resolve_tracking_uri
    from slicefm.edge.tracking.preflight import check_tracking_server

    uri = resolve_tracking_uri(explicit)
    check_tracking_server(uri)
    return uri


def cmd_models_list(args: argparse.Namespace) -> int:
    from slicefm.edge.tracking.models import list_models
    from slicefm.edge.tracking.preflight import TrackingError

    try:
        rows = list_models(_tracking_uri(args.tracking_uri))
    except TrackingError as err:
        log.error("%s", err)
        return 1
    if args.json:
        json.dump([{**r.__dict__, "aliases": list(r.aliases)} for r in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("no registered models")
        return 0
    table = [("NAME", "VERSION", "ALIASES", "KIND", "CREATED (UTC)", "LINEAGE")]
    for r in rows:
        created = datetime.fromtimestamp(r.created_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
        lineage = " ".join(f"{k}={v}" for k, v in sorted(r.lineage.items()))
        table.append((r.name, r.version, ",".join(r.aliases) or "-", r.kind or "-", created, lineage))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from slicefm.edge.tracking.models import ModelIntegrityError, ModelRegistryError, pull_model
    from slicefm.edge.tracking.preflight import TrackingError

    try:
        res = pull_model(args.spec, args.dest, _tracking_uri(args.tracking_uri), overwrite=args.force)
    except (TrackingError, ModelRegistryError, ModelIntegrityError, FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 1
    print(f"pulled {res.name}:{res.version} ({args.spec}) -> {res.path}: {len(res.files)} files verified")
    for key, value in sorted(res.lineage.items()):
        print(f"  {key}: {value}")
    return 0


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `models` verb group to the top-level `slicefm` parser."""
    group = subparsers.add_parser("models", help="the MLflow model registry: list, pull")
    verbs = group.add_subparsers(dest="models_verb", required=True)
    uri_help = "MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else $SLICEFM_HOME/mlflow.db, else ./.slicefm/mlflow.db)"

    s = verbs.add_parser("list", help="every registered model version with aliases and lineage")
    s.add_argument("--tracking-uri", help=uri_help)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_models_list)

    s = verbs.add_parser("pull", help="download a model version and verify it against its MANIFEST.json")
    s.add_argument("spec", metavar="NAME[@ALIAS|:VERSION]", help="model; the latest version when bare")
    s.add_argument("--dest", required=True, help="directory to create with the model's files")
    s.add_argument("--force", action="store_true", help="replace --dest if it exists")
    s.add_argument("--tracking-uri", help=uri_help)
    s.set_defaults(func=cmd_models_pull)
