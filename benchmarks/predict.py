"""`slicefm predict` throughput on raw DICOM series, with where the time goes, beside a bare DICOM decode.

predict = `slicefm.predict.run.run_predict` on a phantom DICOM tree: ingest (decode, checks, pseudonyms, the
          canonical int16 volume), then per scan preprocess (crop, resize, windows), encoder forward of every
          slice of every window (float16 rounding as extract stores it), the fold heads, one attention plot;
decode  = `read_dicom_series` of the same series into HU arrays (the floor any reader pays).

The model directory is built here: an encoder of the given timm architecture and ABMIL fold heads, both with
random weights (throughput does not depend on weight values; no prediction of this model means anything),
saved in the layout a registered head has, with the given preprocessing recorded. Prints scans/s, slices/s,
each step's share and the ratio predict / decode.

    .venv/bin/python benchmarks/predict.py                                      # the demo's encoder at 64 px
    .venv/bin/python benchmarks/predict.py --encoder vit_base_patch16_224 --img 224 --size 224   # CLEAR-sized
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from slicefm.data.adapters.dicom_tree import series_candidates
from slicefm.evaluate.train_head import HeadSpec, build_head
from slicefm.models.encoders import create_encoder
from slicefm.models.export_format import export_encoder
from slicefm.phantom.dataset import generate_dataset
from slicefm.predict.bundle import load_bundle
from slicefm.predict.run import run_predict
from slicefm.preprocess.config import PreprocessConfig

CLASSES = ["location_abdomen", "location_chest", "location_liver"]


def write_model(root: Path, encoder: str, img: int, size: int, folds: int) -> Path:
    """Random-weight encoder (per-window input) + `folds` random ABMIL heads in a registered head's layout."""
    torch.manual_seed(0)
    enc = create_encoder(encoder, img, 1)
    export_encoder(enc, str(root / "encoder"), {"method": "benchmark", "input_channels": "per_window"})
    pre = PreprocessConfig(size=size)
    sha = hashlib.sha256((root / "encoder" / "encoder.safetensors").read_bytes()).hexdigest()
    spec = HeadSpec("abmil", enc.embed_dim, len(CLASSES))
    for k in range(folds):
        save_file(build_head(spec).state_dict(), str(root / f"fold-{k}.safetensors"))
        meta = {
            "spec": spec.to_dict(), "class_names": CLASSES, "thresholds": [0.5] * len(CLASSES), "best_step": 0,
            "best_score": 0.0, "windows": ["abdomen", "lung"], "task": "benchmark",
            "embeddings": {"name": enc.name, "input_channels": "per_window", "weights_sha256": sha},
            "preprocess": pre.model_dump(mode="json"),
        }  # fmt: skip
        (root / f"fold-{k}.json").write_text(json.dumps(meta))
    return root


def decode_rate(source: Path) -> tuple[float, int]:
    """Slices/s of a bare DICOM decode of every series under `source` (one process)."""
    cands, _ = series_candidates(source)
    t, n = time.perf_counter(), 0
    for c in cands:
        n += int(c.load().hu.shape[0])
    return n / (time.perf_counter() - t), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=4)
    p.add_argument("--xy", type=int, default=512, help="in-plane matrix of the DICOM series")
    p.add_argument("--encoder", default="vit_tiny_test")
    p.add_argument("--img", type=int, default=64, help="encoder input size")
    p.add_argument("--size", type=int, default=64, help="preprocess output size")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--source", help="an existing DICOM tree (default: phantoms generated in a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="slicefm-bench-predict-") as tmp:
        root = Path(tmp)
        source = Path(args.source) if args.source else generate_dataset(root / "raw", args.scans, "dicom", seed=21, shape_xy=args.xy)
        model = write_model(root / "model", args.encoder, args.img, args.size, args.folds)
        bundle = load_bundle(model)
        decode, n = decode_rate(source)
        res = run_predict(bundle, source, root / "out", b"b" * 32, progress=False)
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    print(f"input: {res.n_scans} DICOM series, {n} slices of {args.xy}x{args.xy}; model: {args.encoder} at "
          f"{args.img} px, preprocess size {args.size}, {args.folds} ABMIL fold heads, 2 windows")  # fmt: skip
    print(f"bare decode: {decode:.1f} slices/s")
    print(f"predict:     {res.scans_per_s:.3f} scans/s, {res.slices_per_s:.1f} slices/s "
          f"({res.seconds:.1f} s; ratio to decode {res.slices_per_s / decode:.2f})")  # fmt: skip
    for step, seconds in res.timings.items():
        print(f"  {step:<18} {seconds:7.1f} s  {100 * seconds / res.seconds:5.1f} %")


if __name__ == "__main__":
    main()
