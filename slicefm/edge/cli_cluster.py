"""The cluster verbs of the `slicefm` CLI tree: `trainjob render|submit` (a Kubeflow Trainer TrainJob from a
laptop or CI) and `pretrain-worker` (one torchrun rank of pretraining, what a TrainJob's pods run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def cmd_trainjob(args: argparse.Namespace) -> int:
    from slicefm.edge.trainjob import TrainJobConfig, build_trainjob, run_trainjob, to_yaml

    settings = yaml.safe_load(args.settings.read_text()) if args.settings else {}
    cfg = TrainJobConfig.model_validate(settings or {})
    config_yaml = args.config.read_text()
    if args.trainjob_verb == "render":
        sys.stdout.write(to_yaml(build_trainjob(cfg, args.name, args.preprocessed, args.out, config_yaml)))
        return 0
    run_trainjob(
        cfg, name=args.name, preprocessed_uri=args.preprocessed, out_uri=args.out, config_yaml=config_yaml
    )
    return 0


def cmd_pretrain_worker(args: argparse.Namespace) -> int:
    from slicefm.edge.launch import run_worker

    run_worker(args.preprocessed, args.out, args.config, resume=not args.no_resume)
    return 0


def add_cluster_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `trainjob` and `pretrain-worker` to the top-level `slicefm` parser."""
    group = subparsers.add_parser("trainjob", help="multi-node pretraining as a Kubeflow Trainer TrainJob")
    verbs = group.add_subparsers(dest="trainjob_verb", required=True)
    for verb, help_ in (
        ("render", "print the TrainJob manifest"),
        ("submit", "create the TrainJob, wait for it, explain a failure from its pods"),
    ):
        s = verbs.add_parser(verb, help=help_)
        s.add_argument("--name", required=True, help="TrainJob name (lower-case DNS label)")
        s.add_argument("--preprocessed", required=True, help="preprocess output, s3://...")
        s.add_argument("--out", required=True, help="pretraining output, s3://...")
        s.add_argument("--config", required=True, type=Path, help="pipeline or pretrain config YAML")
        s.add_argument("--settings", type=Path, help="YAML of TrainJobConfig fields (cluster settings)")
        s.set_defaults(func=cmd_trainjob)

    s = subparsers.add_parser(
        "pretrain-worker",
        help="one torchrun rank of pretraining (what a TrainJob's pods run: torchrun -m slicefm pretrain-worker)",
    )
    s.add_argument("--preprocessed", required=True, help="preprocess output (local dir or s3://)")
    s.add_argument("--out", required=True, help="output location (local dir or s3://)")
    s.add_argument("--config", required=True, type=Path, help="YAML with a pretrain: section")
    s.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    s.set_defaults(func=cmd_pretrain_worker)
