"""Raw decode vs the full ingest + preprocess path, side by side on the same series.

raw decode  = reading every series into HU arrays (slicefm.io.dicom.read_dicom_series / read_nifti), nothing else;
full path   = `slicefm ingest` (decode, checks, pseudonymise, canonical volumes, manifests) followed by
              `slicefm preprocess` (body crop, resize, windows, shards, slices.parquet);
fused       = both in one pass (`slicefm ingest --preprocess-out`, the pipeline's ingest-preprocess step):
              one pool, each scan decoded once and preprocessed from memory, no canonical volumes.
Both use the same number of worker processes. The phantom's organ/lesion masks are removed first: hospital
archives carry none, and mask resampling is not part of the CT path being measured. Prints slices/s for each,
each stage's share of the full path's time, and full/raw and fused/raw (target >= 0.8). The fused pass runs
twice per repeat when the C resize kernel is built: with it, and with its Pillow fallback
(SLICEFM_RESIZE_KERNEL=pillow, the same output bytes), side by side.

    .venv/bin/python benchmarks/preprocess.py --n-scans 8 --size 512 --workers 2
    .venv/bin/python benchmarks/preprocess.py --realistic [--lengths 300 400 500 600] [--formats dicom rle j2k nifti]

--realistic: real-size series (default 4 series of 300-600 slices at 512 x 512) written as uncompressed DICOM,
RLE Lossless DICOM, JPEG 2000 Lossless DICOM (pylibjpeg-openjpeg) and .nii.gz, each format timed side by side
with its own raw decode in one run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np

from slicefm.data.ingest import ingest
from slicefm.io.dicom import read_dicom_series, scan_dicom_tree
from slicefm.io.nifti import read_nifti
from slicefm.phantom.dataset import generate_dataset
from slicefm.preprocess.config import PreprocessConfig
from slicefm.preprocess.fused import ingest_and_preprocess
from slicefm.preprocess.resize import resize_kernel
from slicefm.preprocess.stage import run_preprocess

KEY = b"benchmark-key-0123456789"


def _decode_dicom(files: list[Path]) -> int:
    return read_dicom_series(files).hu.shape[0]


def _decode_nifti(path: Path) -> int:
    return read_nifti(path).hu.shape[0]


def raw_decode(root: Path, workers: int, fmt: str = "dicom") -> tuple[int, float]:
    """Slices and seconds to decode every series of `root` into HU arrays with `workers` processes, the largest
    series first (as ingest orders them: the comparison is then per slice, not a scheduling difference)."""
    t0 = time.perf_counter()
    if fmt == "nifti":
        fn, groups = _decode_nifti, sorted(root.rglob("*.nii.gz"), key=lambda p: -p.stat().st_size)
    else:
        series = [sorted(f) for f in scan_dicom_tree(root).series.values()]
        fn, groups = _decode_dicom, sorted(series, key=lambda f: -sum(p.stat().st_size for p in f))
    with ProcessPoolExecutor(workers) as pool:
        n = sum(pool.map(fn, groups))
    return n, time.perf_counter() - t0


def full_path(root: Path, out: Path, workers: int, size: int, fmt: str = "dicom") -> tuple[int, float, float]:
    """Slices, total seconds, and the ingest part of them."""
    t0 = time.perf_counter()
    ingest(root, str(out / "ingest"), KEY, fmt, "bench", workers)
    t_ingest = time.perf_counter() - t0
    cfg = PreprocessConfig(size=size, workers=workers)
    res = run_preprocess(str(out / "ingest"), str(out / "pre"), cfg, resume=False)
    return res.n_slices, time.perf_counter() - t0, t_ingest


def fused_path(root: Path, out: Path, workers: int, size: int, fmt: str = "dicom") -> tuple[int, float]:
    """Slices and seconds of the fused ingest + preprocess pass."""
    t0 = time.perf_counter()
    cfg = PreprocessConfig(size=size, workers=workers)
    res = ingest_and_preprocess(root, str(out / "ingest"), str(out / "pre"), KEY, cfg, fmt, "bench", workers)
    return res.preprocess.n_slices, time.perf_counter() - t0


def _transcode_j2k(args: tuple[Path, Path]) -> None:
    """One uncompressed DICOM file -> JPEG 2000 Lossless (pylibjpeg-openjpeg encoder)."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    src, dst = args
    ds = pydicom.dcmread(src)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)


def realistic_data(
    root: Path, lengths: list[int], size: int, formats: list[str], workers: int
) -> dict[str, Path]:
    """One phantom scan per length (`size` px), written in each of `formats`; returns format -> folder."""
    from slicefm.phantom.generate import generate_cohort
    from slicefm.phantom.writers.dicom import write_dicom_series
    from slicefm.phantom.writers.nifti import write_nifti

    dirs = {f: root / f for f in formats}
    plain = root / "dicom"
    had_plain = plain.exists()  # an earlier run's uncompressed series: reused, never deleted
    for i, n in enumerate(lengths):
        scan = generate_cohort(1, seed=100 + i, shape_xy=size, n_slices=n)[0]
        rng = np.random.default_rng(i)
        if ("dicom" in formats or "j2k" in formats) and not had_plain:
            write_dicom_series(scan, plain / f"series{i}", rng)
        if "rle" in formats:
            write_dicom_series(scan, dirs["rle"] / f"series{i}", rng, compress=True)
        if "nifti" in formats:
            dirs["nifti"].mkdir(parents=True, exist_ok=True)
            write_nifti(scan, dirs["nifti"] / f"scan{i}.nii.gz")
    if "j2k" in formats:
        jobs = [(f, dirs["j2k"] / f.relative_to(plain)) for f in sorted(plain.rglob("*.dcm"))]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_transcode_j2k, jobs, chunksize=16))
        if "dicom" not in formats and not had_plain:
            shutil.rmtree(plain)
    return dirs


def _with_kernel(kernel: str, fn, *args):
    """`fn(*args)` with SLICEFM_RESIZE_KERNEL=`kernel` (worker processes inherit it: the pools start inside)."""
    with mock.patch.dict(os.environ, SLICEFM_RESIZE_KERNEL=kernel):
        return fn(*args)


def compare(data: Path, work: Path, fmt: str, workers: int, out_size: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` raw decode, full path and fused pass (with the C resize kernel and, side by side, with
    its Pillow fallback) on one folder, each repeat side by side; also the median of each repeat's own
    fused/raw ratio (less sensitive to a noisy neighbour than the ratio of the bests)."""
    reader_fmt = "nifti" if fmt == "nifti" else "dicom"
    raw_decode(data, workers, reader_fmt)  # warm the page cache so both paths read from memory
    best: dict[str, float] = {"raw": 0.0, "full": 0.0, "ingest": 0.0, "fused": 0.0, "pillow": 0.0, "slices": 0}
    paired: dict[str, list[float]] = {"fused": [], "pillow": []}
    kernels = {"fused": "c", "pillow": "pillow"} if resize_kernel() is not None else {"fused": "pillow"}
    for r in range(repeats):
        n_raw, t_raw = raw_decode(data, workers, reader_fmt)
        n_full, t_full, t_ingest = full_path(data, work / f"{fmt}{r}", workers, out_size, reader_fmt)
        shutil.rmtree(work / f"{fmt}{r}")
        for name, kernel in kernels.items():
            n_fused, t_fused = _with_kernel(kernel, fused_path, data, work / f"{fmt}{r}f", workers, out_size, reader_fmt)
            shutil.rmtree(work / f"{fmt}{r}f")
            assert n_raw == n_full == n_fused, (n_raw, n_full, n_fused)
            best[name] = max(best[name], n_fused / t_fused)
            paired[name].append(t_raw / t_fused)
        if n_full / t_full > best["full"]:
            best.update(full=n_full / t_full, ingest=n_full / t_ingest, t_full=t_full, t_ingest=t_ingest)
        best["raw"] = max(best["raw"], n_raw / t_raw)
        best["slices"] = n_raw
    best.update({f"median_{k}": float(np.median(v)) if v else float("nan") for k, v in paired.items()})
    return best


def breakdown(data: Path, fmt: str, out_size: int, work: Path) -> dict[str, float]:
    """ms per slice of each step of the fused pass, one process, one thread, every series of `data`: where the
    time beyond a bare decode goes."""
    from slicefm.core.store import open_store
    from slicefm.data.ingest import _to_int16, check_volume, round_in_place
    from slicefm.preprocess import stage

    cfg = PreprocessConfig(size=out_size, workers=1)
    steps = dict.fromkeys(("decode", "round+checks", "crop box", "resize+windows", "write"), 0.0)
    n_total = 0
    if fmt == "nifti":
        loads = [lambda p=p: read_nifti(p) for p in sorted(data.rglob("*.nii.gz"))]
    else:
        loads = [lambda f=sorted(f): read_dicom_series(f) for f in scan_dicom_tree(data).series.values()]
    store = open_store(work / "breakdown")
    for load in loads:
        t = time.perf_counter()
        vol = load()
        t, steps["decode"] = time.perf_counter(), steps["decode"] + time.perf_counter() - t
        value_range = round_in_place(vol.hu)
        check_volume(vol, value_range)
        hu = _to_int16(vol.hu, cast=False, rounded=True)
        t, steps["round+checks"] = time.perf_counter(), steps["round+checks"] + time.perf_counter() - t
        box = stage.crop_box_for(hu, cfg)
        t, steps["crop box"] = time.perf_counter(), steps["crop box"] + time.perf_counter() - t
        stack = np.empty((hu.shape[0], 2, out_size, out_size), np.uint8)
        for i in range(0, hu.shape[0], stage._CHUNK_SLICES):
            stage._preprocess_slices(hu[i : i + stage._CHUNK_SLICES], box, cfg, stack[i : i + stage._CHUNK_SLICES])
        steps["resize+windows"] += time.perf_counter() - t
        t = time.perf_counter()
        store.write_npy("stack.npy", stack)
        steps["write"] += time.perf_counter() - t
        n_total += hu.shape[0]
    return {k: v / n_total * 1e3 for k, v in steps.items()}


def report(label: str, b: dict[str, float]) -> None:
    t_pre = b["t_full"] - b["t_ingest"]
    t_decode = b["slices"] / b["raw"]
    pillow = f"{b['pillow']:9.1f} {b['pillow'] / b['raw']:7.2f} {b['median_pillow']:7.2f}" if b["pillow"] else " " * 25
    print(
        f"{label:10s} {int(b['slices']):6d} {b['raw']:9.1f} {b['ingest']:9.1f} {b['full']:9.1f} "
        f"{b['full'] / b['raw']:7.2f} {b['fused']:9.1f} {b['fused'] / b['raw']:7.2f} {b['median_fused']:7.2f} {pillow}"
        f"   ingest {b['t_ingest'] / b['t_full']:4.0%} (a bare decode: "
        f"{t_decode / b['t_full']:4.0%} of the total), preprocess {t_pre / b['t_full']:4.0%}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-scans", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="phantom matrix size (real CT: 512)")
    p.add_argument("--out-size", type=int, default=256, help="preprocess output size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--realistic", action="store_true", help="real-size series in four formats")
    p.add_argument("--lengths", type=int, nargs="+", default=[300, 400, 500, 600])
    p.add_argument("--breakdown", action="store_true", help="also ms/slice of each fused step, one thread")
    p.add_argument("--data", type=Path, help="keep the --realistic series here (reused when present)")
    p.add_argument("--formats", nargs="+", default=["dicom", "rle", "j2k", "nifti"],
                   choices=["dicom", "rle", "j2k", "nifti"])  # fmt: skip
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    header = (
        f"{'format':10s} {'slices':>6s} {'raw/s':>9s} {'ingest/s':>9s} {'full/s':>9s} {'ratio':>7s} "
        f"{'fused/s':>9s} {'ratio':>7s} {'median':>7s} {'pillow/s':>9s} {'ratio':>7s} {'median':>7s}"
        "   share of the full path's time"
    )
    print(f"resize kernel: {'C (slicefm.preprocess._bilinear)' if resize_kernel() else 'Pillow (C kernel not built)'}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.realistic:
            t0 = time.perf_counter()
            data_root = args.data or Path(tmp) / "data"
            missing = [f for f in args.formats if not (data_root / f).exists()]
            dirs = {f: data_root / f for f in args.formats}
            if missing:
                realistic_data(data_root, args.lengths, args.size, missing, args.workers)
            print(
                f"{len(args.lengths)} series of {args.lengths} slices at {args.size}x{args.size} written in "
                f"{time.perf_counter() - t0:.0f} s; {args.workers} workers, output {args.out_size}px, "
                f"best of {args.repeats}"
            )
            print(header)
            for fmt in args.formats:
                report(fmt, compare(dirs[fmt], Path(tmp), fmt, args.workers, args.out_size, args.repeats))
            if args.breakdown:
                print("\nms per slice, one process (fused steps; decode = the reader, as raw decode):")
                for fmt in args.formats:
                    reader_fmt = "nifti" if fmt == "nifti" else "dicom"
                    for kernel in ("c", "pillow") if resize_kernel() is not None else ("pillow",):
                        ms = _with_kernel(kernel, breakdown, dirs[fmt], reader_fmt, args.out_size, Path(tmp))
                        extra = sum(v for k, v in ms.items() if k != "decode")
                        cells = "  ".join(f"{k} {v:.2f}" for k, v in ms.items())
                        label = f"{fmt} ({kernel})"
                        print(f"{label:16s} {cells}  | beyond decode {extra:.2f} ({ms['decode'] / (ms['decode'] + extra):.2f})")
            return
        data = Path(tmp) / "dicom"
        generate_dataset(data, args.n_scans, "dicom", seed=1, shape_xy=args.size)
        shutil.rmtree(data / "masks")
        print(
            f"{args.n_scans} phantom series at {args.size}x{args.size}, {args.workers} workers, "
            f"output {args.out_size}px, best of {args.repeats}"
        )
        print(header)
        report("dicom", compare(data, Path(tmp), "dicom", args.workers, args.out_size, args.repeats))


if __name__ == "__main__":
    main()
