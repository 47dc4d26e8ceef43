"""`slicefm <verb>`: the one CLI tree. A verb per pipeline stage, plus data, key, config, pipeline, models (the
registry) and cluster (trainjob, pretrain-worker) commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from slicefm.config import PipelineConfig, dump_config, load_config

log = logging.getLogger("slicefm")


def _config(path: str | None) -> PipelineConfig:
    return load_config(path) if path else PipelineConfig()  # type: ignore[return-value]


def _key() -> bytes:
    """The pseudonymisation key by slicefm.data.pseudonym's rule (never created here: see `slicefm key init`)."""
    from slicefm.data.pseudonym import load_key

    return load_key()


def cmd_ingest(args: argparse.Namespace) -> int:
    from slicefm.data.ingest import NoUsableScansError
    from slicefm.edge.stages import ingest_preprocess_stage, ingest_stage

    cfg = _config(args.config)
    if args.format:
        cfg.data.format = args.format
    if args.cohort:
        cfg.data.cohort = args.cohort
    if args.workers:
        cfg.ingest.workers = args.workers
    if args.max_tilt_deg is not None:
        cfg.ingest.max_tilt_deg = args.max_tilt_deg
    if args.keep_volumes:
        cfg.ingest.keep_volumes = True
    try:
        if args.preprocess_out:
            fused = ingest_preprocess_stage(cfg, args.source, args.out, args.preprocess_out, _key())
            res, pre = fused.ingest, fused.preprocess
        else:
            res, pre = ingest_stage(cfg, args.source, args.out, _key()), None
    except NoUsableScansError as err:
        log.error("%s", err)
        return 2
    print(
        f"ingested {res.n_scans} scans ({res.fmt}, cohort {res.cohort}), {res.n_lesions} lesions, "
        f"{res.n_quarantined} quarantined -> {res.out_uri}"
    )
    if pre is not None:
        print(f"preprocessed in the same pass: {pre.n_slices} slices, channels {pre.channels} -> {pre.out_uri}")
    if res.n_quarantined:
        print(f"  see {res.out_uri.rstrip('/')}/quarantine.csv for what was not used and why")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from slicefm.edge.stages import preprocess_stage
    from slicefm.preprocess.stage import MissingVolumesError

    cfg = _config(args.config)
    try:
        res = preprocess_stage(cfg, args.scans, args.out)
    except MissingVolumesError as err:
        log.error("%s", err)
        return 2
    print(
        f"preprocessed {res.n_scans} scans ({res.n_skipped} already done), {res.n_slices} slices, "
        f"channels {res.channels} -> {res.out_uri}"
    )
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from slicefm.edge.stages import pretrain_stage

    cfg = _config(args.config)
    res = pretrain_stage(cfg, args.preprocessed, args.out, resume=not args.no_resume)
    print(
        f"pretrained {cfg.pretrain.method} / {cfg.pretrain.encoder.name}: {res.steps} steps, loss "
        f"{res.loss_first:.4f} -> {res.loss_last:.4f}, {res.slices_per_s:.1f} slices/s -> {res.encoder_uri}"
    )
    return 0


def cmd_supervised_ceiling(args: argparse.Namespace) -> int:
    from slicefm.edge.stages import supervised_ceiling_stage

    cfg = _config(args.config)
    res = supervised_ceiling_stage(cfg, args.preprocessed, args.out)
    print(
        f"supervised ceiling {cfg.pretrain.encoder.name} on {len(res.classes)} classes: {res.steps} steps, loss "
        f"{res.loss_first:.4f} -> {res.loss_last:.4f} ({res.n_slices} slices, {res.train_s:.0f} s) -> {args.out}\n"
        f"embed it with `slicefm extract --encoder {args.out} ...`: its set is labelled 'supervised'"
    )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from slicefm.edge.stages import extract_stage

    cfg = _config(args.config)
    if args.encoder_spec:
        cfg.extract.encoder = args.encoder_spec
    if args.weights:
        cfg.extract.weights = args.weights
    res = extract_stage(
        cfg, args.preprocessed, args.out, args.encoder, shard_index=args.shard, n_shards=args.n_shards,
        random_baseline=args.random_baseline,
    )  # fmt: skip
    print(
        f"extracted {res.label} embeddings ({res.embed_dim}-d, windows {res.windows}) of {res.n_scans} scans "
        f"({res.n_skipped} already done), {res.n_slices} slices at {res.slices_per_s:.0f} slices/s -> {res.out_uri}"
    )
    return 0


def cmd_merge_extracts(args: argparse.Namespace) -> int:
    from slicefm.embed.extract import merge_extracts

    print(f"merged {len(args.parts)} extraction parts -> {merge_extracts(args.parts, args.out)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from slicefm.edge.stages import evaluate_stage

    cfg = _config(args.config)
    res = evaluate_stage(cfg, args.embeddings, args.out, splits_uri=args.splits)
    print(res.comparison.text())
    print(f"report: {res.out_uri.rstrip('/')}/report.md (and report.html, results.json, plots)")
    return 0


def cmd_external(args: argparse.Namespace) -> int:
    from slicefm.edge.stages import external_stage

    cfg = _config(args.config)
    res = external_stage(cfg, args.source_eval, args.embeddings, args.out)
    print(res.headline_table(cfg.evaluate.headline_metric))
    print(f"report: {res.out_uri.rstrip('/')}/report.md")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from slicefm.phantom.dataset import generate_dataset

    out = generate_dataset(
        Path(args.out), args.n_scans, args.format, seed=args.seed, shape_xy=args.size, profile=args.profile
    )
    print(
        f"wrote {args.n_scans} phantom scans ({args.format}, profile {args.profile}, seed {args.seed}) -> {out}"
    )
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from slicefm.edge.pipeline_data import ensure_demo_data

    cfg = _config(args.config)
    if args.out:
        print(f"demo dataset at {ensure_demo_data(cfg.data, Path(args.out), force=args.force)}")
        return 0
    # Every cohort at its configured source (what data.dvc tracks under data/).
    for data in cfg.data_sources():
        print(f"demo dataset at {ensure_demo_data(data, Path(data.source), force=args.force)}")
    return 0


def cmd_key_init(args: argparse.Namespace) -> int:
    from slicefm.data.pseudonym import KEY_ENV, create_key, key_file_path, key_fingerprint, load_key

    if os.environ.get(KEY_ENV):
        print(
            f"${KEY_ENV} is set: it is the key (fingerprint {key_fingerprint(load_key())}); no file written"
        )
        return 0
    path = key_file_path()
    if path.exists():
        print(f"pseudonymisation key already at {path} (fingerprint {key_fingerprint(load_key())})")
        return 0 if args.if_missing else 1
    key = create_key(path)
    print(f"created a new pseudonymisation key at {path} (fingerprint {key_fingerprint(key)})")
    print("  back it up with your data: re-ingesting with another key gives every patient new IDs")
    return 0


def cmd_key_show(args: argparse.Namespace) -> int:
    from slicefm.data.pseudonym import key_fingerprint, key_origin, load_key

    print(f"pseudonymisation key from {key_origin()}: fingerprint {key_fingerprint(load_key())}")
    return 0


def cmd_config_default(args: argparse.Namespace) -> int:
    text = "# slicefm default configuration (every key; unknown keys are rejected)\n" + dump_config(
        PipelineConfig()
    )
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slicefm", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser(
        "ingest", help="ingest a dataset: canonical volumes + scans/lesions/quarantine manifests"
    )
    s.add_argument(
        "--source", required=True, help="dataset root (DICOM tree, NIfTI dir or a cohort's published layout)"
    )
    s.add_argument(
        "--format", choices=["auto", "dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"]
    )
    s.add_argument("--out", required=True, help="output directory or s3:// URI")
    s.add_argument("--cohort", help="cohort name (default: from the layout)")
    s.add_argument("--workers", type=int)
    s.add_argument("--max-tilt-deg", type=float, help="quarantine gantry tilts above this (default 1.0)")
    s.add_argument(
        "--preprocess-out",
        help="also preprocess, in the same pass over each scan (decoded once), into this directory or s3:// URI "
        "(the preprocess section of --config); the ingest output then holds no canonical volumes unless "
        "--keep-volumes",
    )
    s.add_argument(
        "--keep-volumes", action="store_true",
        help="with --preprocess-out: write the canonical volumes too (what `slicefm preprocess` reads)",
    )  # fmt: skip
    s.add_argument("--config", help="pipeline YAML (data/ingest/preprocess sections)")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("preprocess", help="windows, body crop, resize, tiles, slabs -> slice stacks")
    s.add_argument("--scans", required=True, help="ingest output (directory or s3://)")
    s.add_argument("--out", required=True, help="output directory or s3:// URI")
    s.add_argument("--config", help="pipeline YAML (preprocess section)")
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("pretrain", help="self-supervised pretraining (MoCo-v3, LECL, LeJEPA) -> encoder")
    s.add_argument("--preprocessed", required=True, help="preprocess output (directory or s3://)")
    s.add_argument("--out", required=True, help="output directory or s3:// URI (checkpoints + encoder)")
    s.add_argument("--config", help="pipeline YAML (pretrain section); presets in pipelines/configs/")
    s.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser(
        "supervised-ceiling",
        help="the pretraining architecture trained on the cohort's lesion / finding labels (a ceiling)",
    )
    s.add_argument("--preprocessed", required=True, help="preprocess output of the pretraining cohort")
    s.add_argument("--out", required=True, help="output directory or s3:// URI (encoder files)")
    s.add_argument("--config", help="pipeline YAML (pretrain.encoder and supervised_ceiling sections)")
    s.set_defaults(func=cmd_supervised_ceiling)

    s = sub.add_parser("extract", help="frozen encoder -> per-slice embeddings (per window / 5-cut tile)")
    s.add_argument("--preprocessed", required=True, help="preprocess output (directory or s3://)")
    s.add_argument("--out", required=True, help="output directory or s3:// URI")
    s.add_argument(
        "--encoder", help="pretrain output holding encoder.safetensors/json (for encoder: pretrained)"
    )
    s.add_argument(
        "--encoder-spec",
        help="override extract.encoder: pretrained | random:<timm> | timm:<timm> | models:/<name>@<alias> | URI",
    )
    s.add_argument("--weights", help="state dict (path or s3://) for --encoder-spec timm:<name>")
    s.add_argument(
        "--random-baseline", action="store_true", help="the encoder's architecture, random weights"
    )
    s.add_argument("--shard", type=int, default=0, help="this task's shard (0-based)")
    s.add_argument("--n-shards", type=int, default=1)
    s.add_argument("--config", help="pipeline YAML (extract section)")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("merge-extracts", help="join sharded extraction outputs into one index")
    s.add_argument("parts", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_merge_extracts)

    s = sub.add_parser("evaluate", help="cross-validated ABMIL / linear probes on embeddings -> report")
    s.add_argument("--embeddings", nargs="+", required=True, help="extract outputs (compared side by side)")
    s.add_argument("--out", required=True)
    s.add_argument("--splits", help="an earlier evaluate output whose splits/<task>.json are reused")
    s.add_argument("--config", help="pipeline YAML (evaluate section)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("external", help="cohort A's heads on cohort B (frozen) vs retrained on B")
    s.add_argument("--source-eval", required=True, help="evaluate output of cohort A (its heads)")
    s.add_argument("--embeddings", nargs="+", required=True, help="extract outputs of cohort B")
    s.add_argument("--out", required=True)
    s.add_argument("--config", help="pipeline YAML (evaluate + external sections)")
    s.set_defaults(func=cmd_external)

    data = sub.add_parser("data", help="phantom CT data").add_subparsers(dest="data_verb", required=True)
    s = data.add_parser("phantom", help="write synthetic CT scans in a real format/layout")
    s.add_argument("--n-scans", type=int, default=20)
    s.add_argument("--out", required=True)
    s.add_argument(
        "--format", default="dicom", choices=["dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"]
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=128, help="in-plane matrix size (px)")
    s.add_argument("--profile", default="default", choices=["default", "shifted"])
    s.set_defaults(func=cmd_phantom)
    s = data.add_parser("demo", help="(re)create the DVC-tracked demo dataset from the config's data section")
    s.add_argument("--config")
    s.add_argument("--out")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_demo_data)

    key = sub.add_parser(
        "key",
        help="the pseudonymisation key",
        description="The key comes from $SLICEFM_PSEUDONYM_KEY, else the file $SLICEFM_PSEUDONYM_KEY_FILE, "
        "else $XDG_CONFIG_HOME/slicefm/pseudonym.key (~/.config/slicefm/pseudonym.key).",
    ).add_subparsers(dest="key_verb", required=True)
    s = key.add_parser("init", help="create the key file where the rule says it lives")
    s.add_argument("--if-missing", action="store_true", help="succeed quietly when a key already exists")
    s.set_defaults(func=cmd_key_init)
    s = key.add_parser("show", help="where the key comes from and its fingerprint (never the key)")
    s.set_defaults(func=cmd_key_show)

    cfg = sub.add_parser("config", help="configuration files").add_subparsers(
        dest="config_verb", required=True
    )
    s = cfg.add_parser("default", help="print (or --out write) the full default config")
    s.add_argument("--out")
    s.set_defaults(func=cmd_config_default)

    from slicefm.edge.cli_cluster import add_cluster_parsers
    from slicefm.edge.cli_models import add_models_parser
    from slicefm.edge.cli_pipeline import add_pipeline_parsers
    from slicefm.edge.cli_predict import add_predict_parser

    add_pipeline_parsers(sub)
    add_predict_parser(sub)
    add_models_parser(sub)
    add_cluster_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from slicefm.data.pseudonym import KeyMismatchError, MissingKeyError

    try:
        return int(args.func(args) or 0)
    except (MissingKeyError, KeyMismatchError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
