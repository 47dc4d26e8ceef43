"""Client CPU per byte-range GET of `S3Store.read_range`: boto3 `get_object` vs the fast path (cached presigned
URL through urllib3), side by side on the same reads.

    .venv/bin/python benchmarks/s3_range.py [--reads 2000] [--length 131072] [--repeats 3]

A moto S3 server runs on 127.0.0.1 in its own process (its CPU is not this process's), holding `--keys`
objects of `--object-mib` MiB of random bytes. Each repeat reads the same `--reads` random ranges of
`--length` bytes (the size of a 256 px two-window uint8 slice) through each path, in alternating order, after a
warm-up (clients, connection pool and presigned URLs set up). CPU time is this process's `time.process_time`
(user + system), so it includes the kernel's socket work; the median repeat is reported per path and the ratio.
moto closes the connection after every response, so both paths also pay a TCP connect per GET here.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid

from moto_s3 import s3_server

from slicefm.core.store import S3Store


def timed_reads(store: S3Store, reads: list[tuple[str, int]], length: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of reading each (key, offset) range once."""
    c0, w0 = time.process_time(), time.perf_counter()
    for key, start in reads:
        store.read_range(key, start, length)
    return time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reads", type=int, default=2000, help="range reads per path and repeat")
    p.add_argument("--length", type=int, default=131_072, help="bytes per read")
    p.add_argument("--keys", type=int, default=4, help="objects read from")
    p.add_argument("--object-mib", type=int, default=16, help="size of each object")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rng = random.Random(0)
    size = args.object_mib * 2**20
    load0 = os.getloadavg()[0]
    with s3_server() as url:
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        boto3_store = S3Store(bucket, "shards", fast_range_reads=False)
        fast_store = S3Store(bucket, "shards")
        boto3_store.client.create_bucket(Bucket=bucket)
        keys = [f"k{i}.npy" for i in range(args.keys)]
        for key in keys:
            boto3_store.write_bytes(key, rng.randbytes(size))
        reads = [(rng.choice(keys), rng.randrange(size - args.length)) for _ in range(args.reads)]
        key, start = reads[0]
        same = fast_store.read_range(key, start, args.length) == boto3_store.read_range(
            key, start, args.length
        )
        assert same, "the two paths returned different bytes"
        stores = {"boto3": boto3_store, "fast": fast_store}
        for store in stores.values():
            timed_reads(store, reads[:100], args.length)  # warm-up: clients, pool, presigned URLs
        cpu: dict[str, list[float]] = {name: [] for name in stores}
        wall: dict[str, list[float]] = {name: [] for name in stores}
        for r in range(args.repeats):
            for name in list(stores)[:: 1 if r % 2 == 0 else -1]:
                c, w = timed_reads(stores[name], reads, args.length)
                cpu[name].append(c / args.reads)
                wall[name].append(w / args.reads)
        c0 = time.process_time()
        for i in range(200):
            fast_store._ranges.url(bucket, f"shards/other-{i}.npy")
        presign_ms = (time.process_time() - c0) / 200 * 1e3
    print(
        f"{args.reads} range reads of {args.length} bytes from {args.keys} objects of {args.object_mib} MiB on "
        f"moto at {url}, median of {args.repeats} repeats; load {load0:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'path':6s} {'CPU ms/GET':>10s} {'wall ms/GET':>11s} {'GET/s per core':>14s}  CPU ms/GET per repeat"
    )
    med = {name: statistics.median(cpu[name]) * 1e3 for name in stores}
    for name in stores:
        per = " ".join(f"{c * 1e3:.3f}" for c in cpu[name])
        print(
            f"{name:6s} {med[name]:10.3f} {statistics.median(wall[name]) * 1e3:11.3f} {1e3 / med[name]:14.0f}  {per}"
        )
    print(f"boto3 / fast CPU per GET: {med['boto3'] / med['fast']:.2f}x; presign (once per key per 10 min): "
          f"{presign_ms:.3f} ms CPU")  # fmt: skip


if __name__ == "__main__":
    main()
