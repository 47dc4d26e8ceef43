"""Embedding extraction end to end vs the bare encoder forward, side by side in one run.

end to end   = `slicefm.embed.extract.run_extract` on a preprocess-layout output: uint8 stacks read through the
               store by DataLoader workers (or in-process with --workers 0), scaled to float, one 3-channel
               input per window, batched across scans, float16 .npy files per scan and window, the index;
bare forward = the same encoder on an in-memory float tensor [batch, in_chans, H, W], same batch size, same
               precision (bf16 autocast on CUDA, fp32 on CPU), `torch.inference_mode`, the same number of images.

The input is synthetic (random uint8 stacks, 2 windows) written in exactly the layout `run_preprocess` writes
(shards/shard-000/<scan>.npy [n, C, H, W], slices.parquet validated by SlicesSchema, preprocess.json):
throughput does not depend on pixel values. Slices/s counts slices (each slice = one image per window).
Prints the best of `--repeats` for each side and the ratio end-to-end / bare (target >= 0.9).

    .venv/bin/python benchmarks/extract.py                       # CPU: vit_tiny_patch16_224 at 112 px
    .venv/bin/python benchmarks/extract.py --workers 0 1 2 --slices 2048
    .venv/bin/python benchmarks/extract.py --encoder vit_small_patch16_224 --size 224 --batch 256  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slicefm.core.shards import stack_key
from slicefm.core.store import open_store
from slicefm.data.schemas import SlicesSchema, validate
from slicefm.embed.config import ExtractConfig
from slicefm.embed.extract import run_extract
from slicefm.embed.sources import resolve_encoder
from slicefm.models.encoders import Encoder

WINDOWS = ["abdomen", "lung"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} CPUs)"


def write_preprocessed(root: str, n_slices: int, per_scan: int, size: int, seed: int = 0) -> int:
    """Random uint8 stacks [n, 2, size, size] + slices.parquet + preprocess.json, as run_preprocess lays them out."""
    store, rng = open_store(root), np.random.default_rng(seed)
    frames, start, scan = [], 0, 0
    while start < n_slices:
        n = min(per_scan, n_slices - start)
        scan_id = f"S{rng.integers(0, 2**63):016x}"
        key = stack_key(scan_id, 0)
        store.write_npy(key, rng.integers(0, 256, size=(n, len(WINDOWS), size, size), dtype=np.uint8))
        z_mm = np.arange(n, dtype=np.float64) * 1.5
        frames.append(
            pd.DataFrame(
                {
                    "scan_id": scan_id, "slice_index": np.arange(n), "z_mm": z_mm, "slab_id": (z_mm // 12).astype(int),
                    "shard": 0, "stack": key, "row": np.arange(n), "is_key_slice": False, "lesion_boxes": "[]",
                }
            )
        )  # fmt: skip
        start, scan = start + n, scan + 1
    slices = validate(pd.concat(frames, ignore_index=True), SlicesSchema, "slices.parquet")
    store.write_parquet("slices.parquet", slices)
    store.write_json(
        "preprocess.json",
        {
            "config": {"size": size, "windows": WINDOWS, "synthetic": True},
            "channels": WINDOWS,
            "dtype": "uint8",
            "layout": "[slice, channel, H, W]",
            "n_scans": scan,
            "n_slices": len(slices),
            "source": "benchmarks/extract.py (random stacks)",
        },
    )
    return scan


def bare_forward(encoder: Encoder, n_images: int, batch: int, in_chans: int, size: int, bf16: bool) -> float:
    """Seconds for n_images through the encoder from an in-memory tensor, in batches of `batch`."""
    device = next(encoder.parameters()).device
    x = torch.rand(batch, in_chans, size, size, device=device)
    sizes = [batch] * (n_images // batch) + ([n_images % batch] if n_images % batch else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for b in sizes:
            encoder(x[:b])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def end_to_end(pre: str, out: str, encoder: Encoder, info, cfg: ExtractConfig) -> tuple[float, float]:  # noqa: ANN001
    """(wall seconds of the whole run_extract call, run_extract's own timing of the embedding loop)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_extract(pre, out, encoder, info, cfg)
    return time.perf_counter() - t0, res.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=None, help="timm name (default: vit_small_patch16_224 on CUDA, "
                    "vit_tiny_patch16_224 on CPU)")  # fmt: skip
    ap.add_argument("--size", type=int, default=None, help="slice size = encoder input (224 CUDA, 112 CPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (256 CUDA, 64 CPU)")
    ap.add_argument("--slices", type=int, default=None, help="slices in the input (16384 CUDA, 1024 CPU)")
    ap.add_argument("--per-scan", type=int, default=150, help="slices per synthetic scan")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader workers, one run each")
    ap.add_argument("--chunk", type=int, default=64, help="extract.chunk_slices")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--workdir", default=None, help="where the synthetic input goes (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu":  # hide CUDA before it is initialised: run_extract uses it whenever visible
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device visible")
    args.encoder = args.encoder or ("vit_small_patch16_224" if cuda else "vit_tiny_patch16_224")
    args.size = args.size or (224 if cuda else 112)
    args.batch = args.batch or (256 if cuda else 64)
    args.slices = args.slices or (16384 if cuda else 1024)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")

    cfg = ExtractConfig(encoder=f"random:{args.encoder}", img_size=args.size, batch_size=args.batch,
                        chunk_slices=args.chunk, precision="auto")  # fmt: skip
    encoder, info = resolve_encoder(cfg, None, n_channels=len(WINDOWS), slice_size=args.size)
    bf16 = cuda  # precision "auto": bf16 autocast on CUDA, fp32 on CPU (as run_extract decides)
    n_images = args.slices * len(WINDOWS)
    tmp = tempfile.mkdtemp(prefix="slicefm-bench-extract-", dir=args.workdir)
    try:
        pre, warm = f"{tmp}/pre", f"{tmp}/warm"
        t0 = time.perf_counter()
        n_scans = write_preprocessed(pre, args.slices, args.per_scan, args.size)
        write_preprocessed(warm, min(args.slices, 2 * args.batch), args.per_scan, args.size, seed=1)
        print(f"input: {n_scans} synthetic scans, {args.slices} slices x {len(WINDOWS)} windows of "
              f"{args.size}x{args.size} uint8 ({time.perf_counter() - t0:.1f} s to write)")  # fmt: skip
        print(f"device: {device_name(device)}; torch threads {torch.get_num_threads()}; encoder "
              f"{args.encoder} ({info.embed_dim}-d, {info.in_chans} in-chans per window), batch {args.batch}, "
              f"precision {'bf16 autocast' if bf16 else 'fp32'}, chunk {args.chunk} slices")  # fmt: skip

        encoder = encoder.to(device).eval()
        bare_forward(encoder, 2 * args.batch, args.batch, info.in_chans, args.size, bf16)  # warm-up
        bare_runs: list[float] = []
        runs: dict[int, list[tuple[float, float]]] = {w: [] for w in args.workers}
        for w in args.workers:  # warm-up: first DataLoader/forkserver start, file cache, allocator
            end_to_end(warm, f"{tmp}/out", encoder, info, cfg.model_copy(update={"workers": w}))
        for _ in range(args.repeats):  # interleaved so a burst of load on the shared host hits both sides
            bare_runs.append(bare_forward(encoder, n_images, args.batch, info.in_chans, args.size, bf16))
            for w in args.workers:
                runs[w].append(
                    end_to_end(pre, f"{tmp}/out", encoder, info, cfg.model_copy(update={"workers": w}))
                )
        bare = np.asarray(bare_runs)
        print(f"bare forward            {args.slices / bare.min():8.1f} slices/s ({n_images / bare.min():.1f} "
              f"images/s), best of {args.repeats}")  # fmt: skip
        for w in args.workers:
            wall, inner = np.asarray(runs[w]).T
            # Paired ratios (each end-to-end run against the bare run just before it) are robust to slow
            # drifts in the host's load; the best-of ratio compares the two quietest moments.
            paired = np.median(bare / wall)
            print(f"end to end, workers={w}  {args.slices / wall.min():8.1f} slices/s   ratio best/best "
                  f"{bare.min() / wall.min():.2f}, median paired {paired:.2f} (target >= 0.90); embedding loop "
                  f"alone {args.slices / inner.min():.1f} slices/s")  # fmt: skip
        print(json.dumps({"load_average": os.getloadavg()}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
