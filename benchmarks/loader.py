"""Per-core throughput of each pretraining method's training loader vs what one H100 needs.

    .venv/bin/python benchmarks/loader.py [--quick] [--size 256] [--n-scans 4] [--slices 300]

What is timed is the training loop's own data path, in one process on one core (torch and OpenMP at one
thread): the method's dataset (`SliceDataset` / `SlabDataset`, label-guided for DALE-CT) through
`EpochBatchSampler` + `make_loader` (collate), then the method's `views` (what `forward` runs before the
model): MoCo-v3 two 224 px random-resized crops + flips + brightness / contrast / blur; LECL the same plus
lesion-centred momentum-encoder crops; DALE-CT (LeJEPA + 2S aux) 2 x 256 global + 8 x 144 local crops across
12 mm slabs, label-guided centres and organ / abnormality aux targets per crop and per token cell.
Each method reads its shards from local disk and from S3 (a moto server on 127.0.0.1 in its own process,
started and stopped here); source `s3-boto3` reads the same bucket through boto3's `get_object` per range
(`fast_range_reads=False`) instead of `S3Store`'s presigned fast path. Rates per core use this process's CPU
time, so the S3 server's own work (not on a training node's cores) is left out; wall-clock rates are printed
beside them.

Data: a phantom cohort (`slicefm.phantom`) at `--size` px, `--slices` slices per scan (~1 mm apart, like
DALE-CT's 1 mm resampling, so a 12 mm slab holds ~10-12 slices), ingested and preprocessed by the project:
HU windows (uint8, 2 channels) for MoCo / LECL, DALE-CT's z-score (float16, 1 channel) for DALE-CT.

The required per-core rates are derived below from the issue's FLOP figures (printed with the arithmetic).
Two ratios per method: the CPU path (read + collate + views on the same core) and the device path (views on
the accelerator, so a loader core only reads and collates; the device's own time is not measured here).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per loader process, set before torch loads

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from moto_s3 import s3_server  # noqa: E402

from slicefm.core.store import open_store  # noqa: E402
from slicefm.data.ingest import ingest  # noqa: E402
from slicefm.phantom.generate import generate_cohort  # noqa: E402
from slicefm.phantom.writers.masks import write_masks  # noqa: E402
from slicefm.phantom.writers.plain import nifti_dir_names, write_nifti_dir  # noqa: E402
from slicefm.preprocess.config import PreprocessConfig  # noqa: E402
from slicefm.preprocess.stage import run_preprocess  # noqa: E402
from slicefm.train.config import PretrainConfig  # noqa: E402
from slicefm.train.data import EpochBatchSampler, load_index, make_loader  # noqa: E402
from slicefm.train.distributed import DistContext  # noqa: E402
from slicefm.train.loop import step_generators  # noqa: E402
from slicefm.train.methods import build_method  # noqa: E402

# --- required rates: the FLOP model, recomputed -----------------------------------------------------
H100_BF16_TFLOPS = 989.0  # dense bf16 peak, H100 SXM
UTILISATION = 0.40
CORES_PER_GPU = (12, 16)  # a GPU node's CPU cores per GPU; 12 is the harder case for the loader


def vit_forward_gflop(depth: int, width: int, img: int, patch: int, chans: int = 1) -> float:
    """Forward GFLOP of one image through a ViT (2 FLOP per multiply-add): per block 24 n d^2 for the qkv,
    projection and 4x MLP matmuls plus 4 n^2 d for the attention scores and mixing; the patch embedding."""
    n = (img // patch) ** 2 + 1
    blocks = depth * (24 * n * width**2 + 4 * n**2 * width)
    embed = 2 * (n - 1) * patch * patch * chans * width
    return (blocks + embed) / 1e9


@dataclass
class Requirement:
    name: str
    unit: str
    gflop_per_item: float
    derivation: str

    @property
    def per_gpu(self) -> float:
        return H100_BF16_TFLOPS * 1e3 * UTILISATION / self.gflop_per_item

    @property
    def per_core(self) -> float:
        """What one loader core must deliver on a 12-core-per-GPU node (the stricter end)."""
        return self.per_gpu / CORES_PER_GPU[0]


def requirements() -> dict[str, Requirement]:
    b = vit_forward_gflop(12, 768, 224, 16, 2)  # ViT-B/16 at 224, two HU windows
    moco = 2 * (3 * b) + 2 * b  # two views: query forward + backward (3x forward), momentum-key forward
    g = vit_forward_gflop(24, 1024, 256, 14, 1)  # ViT-L/14 at 256 (18 x 18 patches), one z-score channel
    loc = vit_forward_gflop(24, 1024, 144, 14, 1)  # 10 x 10 patches
    dale = 3 * (2 * g + 8 * loc)  # every crop through forward + backward (no teacher)
    moco_text = (
        f"ViT-B/16 @224 forward {b:.1f} GFLOP; per slice 2 views x (3 fwd+bwd + 1 key fwd) = {moco:.0f} GFLOP"
    )
    dale_text = (
        f"ViT-L/14 forward @256 {g:.0f} GFLOP, @144 {loc:.1f} GFLOP; per sample 3 x (2 x {g:.0f} + 8 x "
        f"{loc:.1f}) = {dale / 1e3:.2f} TFLOP"
    )
    return {
        "moco": Requirement("MoCo-v3", "slices", moco, moco_text),
        "lecl": Requirement("LECL", "slices", moco, moco_text + " (LECL: same encoders and views)"),
        "dale": Requirement("DALE-CT", "samples", dale, dale_text),
    }


def print_requirements(reqs: dict[str, Requirement]) -> None:
    sustained = H100_BF16_TFLOPS * UTILISATION
    print(
        f"required rates: H100 bf16 peak {H100_BF16_TFLOPS:g} TFLOP/s x {UTILISATION:.0%} = {sustained:.0f}"
    )
    for key in ("moco", "dale"):
        r = reqs[key]
        lo, hi = r.per_gpu / CORES_PER_GPU[1], r.per_gpu / CORES_PER_GPU[0]
        print(f"  {r.name}: {r.derivation}")
        print(
            f"    -> {sustained:.0f} TFLOP/s / {r.gflop_per_item:.0f} GFLOP = {r.per_gpu:.0f} {r.unit}/s per GPU; "
            f"/ {CORES_PER_GPU[1]}..{CORES_PER_GPU[0]} cores = {lo:.1f}..{hi:.1f} {r.unit}/s per core; "
            f"required (12 cores): {r.per_core:.1f}, goal 1.5x = {1.5 * r.per_core:.1f}"
        )


# --- data -------------------------------------------------------------------------------------------------
def make_data(root: Path, n_scans: int, size: int, n_slices: int, workers: int) -> tuple[str, str]:
    """Phantom NIfTI cohort with masks -> ingest -> preprocess twice; returns (windows, z-score) outputs."""
    src = root / "src"
    scans = generate_cohort(n_scans, seed=7, shape_xy=size, n_slices=n_slices)
    write_nifti_dir(scans, src, seed=7)
    write_masks(scans, src, refs=nifti_dir_names(scans, 7))
    del scans
    ingest(src, str(root / "ingest"), b"loader-benchmark-key-0123456789", "nifti", "bench", workers)
    windows, zscore = str(root / "pre_windows"), str(root / "pre_zscore")
    run_preprocess(str(root / "ingest"), windows, PreprocessConfig(size=size, workers=workers))
    run_preprocess(
        str(root / "ingest"), zscore, PreprocessConfig(size=size, workers=workers, normalisation="zscore")
    )
    shutil.rmtree(src)
    return windows, zscore


def upload(local: str, url: str) -> str:
    """Copy a preprocess output into a fresh bucket on the S3 server through the project's Store."""
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
    src, dst = open_store(local), open_store(f"s3://{bucket}/{Path(local).name}")
    for key in src.list():
        dst.write_bytes(key, src.read_bytes(key))
    return dst.uri("")


# --- measurement ------------------------------------------------------------------------------------------
def method_config(method: str, size: int, quick: bool) -> PretrainConfig:
    """The method's views at the issue's sizes (quick: scaled to the data); a tiny encoder (it is not run)."""
    crop = 224 if not quick else size * 7 // 8
    data: dict = {
        "method": "lejepa" if method == "dale" else method,
        "encoder": {"name": "vit_tiny_test", "img_size": crop},
        "moco": {"proj_dim": 32, "mlp_dim": 64},
        "lecl": {"lesion_lambda": 0.0},  # CLEAR's best lambda: lesion crops only, no key bank to refresh
        "loader": {"workers": 0},
    }
    if method == "dale":
        glob, loc = (256, 144) if not quick else (size, size // 2 + (size // 2) % 16)
        data["encoder"]["img_size"] = glob
        data["lejepa"] = {"global_size": glob, "local_size": loc, "n_global": 2, "n_local": 8, "proj_dim": 32,
                          "proj_hidden": 64}  # fmt: skip
        data["aux"] = {"mode": "2S"}
    return PretrainConfig.model_validate(data)


@dataclass
class Timing:
    items: int
    read_cpu: float
    views_cpu: float
    read_wall: float
    views_wall: float

    def rate(self, part: str, clock: str = "cpu") -> float:
        t = {"read": 0.0, "views": 0.0, "total": 0.0}
        r, v = getattr(self, f"read_{clock}"), getattr(self, f"views_{clock}")
        t.update(read=r, views=v, total=r + v)
        return self.items / t[part] if t[part] > 0 else float("inf")


def measure(
    method_name: str, uri: str, batch: int, n_batches: int, quick: bool, size: int, **s3_options: bool
) -> Timing:
    """Read + collate and views of `n_batches` batches (after one warm-up batch), in this process."""
    cfg = method_config(method_name, size, quick)
    index = load_index(open_store(uri, **s3_options), exclude_splits=())
    method = build_method(cfg, index, DistContext())
    timing = Timing(0, 0.0, 0.0, 0.0, 0.0)
    epoch, done = 0, -1
    while done < n_batches:
        sampler = EpochBatchSampler(
            len(method.dataset), batch, 0, 1, cfg.seed, epoch, redirect=method.redirect()
        )
        it = iter(make_loader(method.dataset, sampler, 0, False))
        while done < n_batches:
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                data = next(it)
            except StopIteration:
                epoch += 1
                break
            c1, w1 = time.process_time(), time.perf_counter()
            rng, gen = step_generators(cfg.seed, 0, done + 1)
            with torch.no_grad():
                method.views(data, rng, gen)
            c2, w2 = time.process_time(), time.perf_counter()
            done += 1
            if done == 0:
                continue  # warm-up: caches, first allocations
            timing.items += batch
            timing.read_cpu += c1 - c0
            timing.views_cpu += c2 - c1
            timing.read_wall += w1 - w0
            timing.views_wall += w2 - w1
    return timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run (2 scans at 64 px, 2 batches)")
    p.add_argument("--size", type=int, default=256, help="phantom and preprocess size (px)")
    p.add_argument("--n-scans", type=int, default=4)
    p.add_argument("--slices", type=int, default=300, help="slices per phantom scan (~1 mm apart)")
    p.add_argument("--batches", type=int, default=6, help="timed batches per method and source")
    p.add_argument("--methods", nargs="+", default=["moco", "lecl", "dale"], choices=["moco", "lecl", "dale"])
    p.add_argument("--sources", nargs="+", default=["local", "s3"], choices=["local", "s3", "s3-boto3"])
    args = p.parse_args()
    if args.quick:
        args.size, args.n_scans, args.slices, args.batches = 64, 2, 60, 2
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    reqs = requirements()
    print_requirements(reqs)
    batch_of = {"moco": 64, "lecl": 64, "dale": 16} if not args.quick else {"moco": 8, "lecl": 8, "dale": 4}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        windows, zscore = make_data(Path(tmp), args.n_scans, args.size, args.slices, 2)
        print(
            f"data: {args.n_scans} phantom scans x {args.slices} slices at {args.size} px, ingested + preprocessed "
            f"in {time.perf_counter() - t0:.0f} s; 1 core (torch threads {torch.get_num_threads()}), "
            f"{args.batches} timed batches after 1 warm-up"
        )
        header = (
            f"{'method':8s} {'source':8s} {'batch':>5s} {'read/s':>8s} {'views/s':>8s} {'CPU path/s':>10s} "
            f"{'wall/s':>7s} {'need/s':>7s} {'CPU path x':>10s} {'device path x':>13s}"
        )
        print(header)
        remote_sources = {"s3", "s3-boto3"} & set(args.sources)
        with s3_server() if remote_sources else _nothing() as url:
            remote = {}
            if url is not None:
                remote = {"windows": upload(windows, url), "zscore": upload(zscore, url)}
            for name in args.methods:
                for source in args.sources:
                    kind = "zscore" if name == "dale" else "windows"
                    uri = (zscore if kind == "zscore" else windows) if source == "local" else remote[kind]
                    opts = {"fast_range_reads": False} if source == "s3-boto3" else {}
                    t = measure(name, uri, batch_of[name], args.batches, args.quick, args.size, **opts)
                    need = reqs[name].per_core
                    print(
                        f"{name:8s} {source:8s} {batch_of[name]:5d} {t.rate('read'):8.1f} {t.rate('views'):8.1f} "
                        f"{t.rate('total'):10.1f} {t.rate('total', 'wall'):7.1f} {need:7.1f} "
                        f"{t.rate('total') / need:10.2f} {t.rate('read') / need:13.2f}",
                        flush=True,
                    )
    print(
        "read/s: dataset + collate per core; views/s: the method's views on this CPU core; CPU path: both on one "
        "core (CPU time; wall/s the same by the wall clock, S3 waits included); x = rate / required (goal 1.5)"
    )


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
