"""Raw decode vs the full ingest + preprocess path, side by side on the same DICOM series.

raw decode  = reading every series into HU arrays (slicefm.io.dicom.read_dicom_series), nothing else;
full path   = `slicefm ingest` (decode, checks, pseudonymise, canonical volumes, manifests) followed by
              `slicefm preprocess` (body crop, resize, windows, shards, slices.parquet).
Both use the same number of worker processes. The phantom's organ/lesion masks are removed first: hospital
archives carry none, and mask resampling is not part of the CT path being measured. Prints slices/s for each and full/raw (target >= 0.8).

    .venv/bin/python benchmarks/preprocess.py --n-scans 8 --size 512 --workers 2
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from slicefm.data.ingest import ingest
from slicefm.io.dicom import read_dicom_series, scan_dicom_tree
from slicefm.phantom.dataset import generate_dataset
from slicefm.preprocess.config import PreprocessConfig
from slicefm.preprocess.stage import run_preprocess


def _decode(files: list[Path]) -> int:
    return read_dicom_series(files).hu.shape[0]


def raw_decode(root: Path, workers: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    tree = scan_dicom_tree(root)
    groups = [sorted(f) for f in tree.series.values()]
    with ProcessPoolExecutor(workers) as pool:
        n = sum(pool.map(_decode, groups))
    return n, time.perf_counter() - t0


def full_path(root: Path, out: Path, workers: int, size: int) -> tuple[int, float, float]:
    """Slices, total seconds, and the ingest part of them."""
    t0 = time.perf_counter()
    ingest(root, str(out / "ingest"), b"benchmark-key-0123456789", "dicom", "bench", workers)
    t_ingest = time.perf_counter() - t0
    cfg = PreprocessConfig(size=size, workers=workers)
    res = run_preprocess(str(out / "ingest"), str(out / "pre"), cfg, resume=False)
    return res.n_slices, time.perf_counter() - t0, t_ingest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-scans", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="phantom matrix size (real CT: 512)")
    p.add_argument("--out-size", type=int, default=256, help="preprocess output size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "dicom"
        generate_dataset(data, args.n_scans, "dicom", seed=1, shape_xy=args.size)
        shutil.rmtree(data / "masks")
        raw_decode(data, args.workers)  # warm the page cache so both paths read from memory
        best_raw, best_full, best_ingest = 0.0, 0.0, 0.0
        for r in range(args.repeats):
            n_raw, t_raw = raw_decode(data, args.workers)
            n_full, t_full, t_ingest = full_path(data, Path(tmp) / f"run{r}", args.workers, args.out_size)
            assert n_raw == n_full, (n_raw, n_full)
            best_raw, best_full = max(best_raw, n_raw / t_raw), max(best_full, n_full / t_full)
            best_ingest = max(best_ingest, n_full / t_ingest)
        print(
            f"{args.n_scans} series, {n_raw} slices of {args.size}x{args.size}, {args.workers} workers, "
            f"output {args.out_size}px, best of {args.repeats}"
        )
        print(f"raw decode          {best_raw:8.1f} slices/s")
        print(f"  ingest alone      {best_ingest:8.1f} slices/s")
        print(f"ingest + preprocess {best_full:8.1f} slices/s")
        print(f"ratio full/raw      {best_full / best_raw:8.2f}   (target >= 0.80)")


if __name__ == "__main__":
    main()
