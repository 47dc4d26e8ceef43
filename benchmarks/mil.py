"""ABMIL cross-validation at CLEAR Task-1 scale: batched (packed instances, masked attention) vs one bag at a time.

Cohort: random embeddings shaped like CLEAR Task 1 (4,377 bags, ~150 slices x 2 windows concatenated,
d = 768, 8 labels), stored float16 as the extract stage writes them. The batched side is the real protocol
(`run_abmil_cv`, held-out test + 5-fold CV, early stopping disabled so every fold runs `--epochs`).
The bag-at-a-time side trains the same ABMIL with one forward/backward per bag (gradients accumulated over
the 128-bag batch) and predicts one bag at a time; it is TIMED on `--loop-batches` training batches and
`--loop-predict` predictions, then EXTRAPOLATED to the same number of folds, epochs, validation and test
passes. Prints both wall times, their ratio (target >= 10x) and the matmul GFLOP/s each side reaches, once
per `--threads` count: on a shared 2-core host, 2 threads can be slower than 1, and the loop's many small
ops suffer most when the second thread is descheduled.

    .venv/bin/python benchmarks/mil.py                      # full scale, 32 epochs (long on 2 CPU cores)
    .venv/bin/python benchmarks/mil.py --epochs 2 --threads 1
    .venv/bin/python benchmarks/mil.py --bags 600 --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time

import numpy as np
import torch

from slicefm.evaluate.config import AbmilConfig, EvaluateConfig
from slicefm.evaluate.protocols import run_abmil_cv
from slicefm.evaluate.train_head import class_pos_weight, masked_loss
from slicefm.mil.abmil import ABMIL

CLASSES = ["bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft_tissue", "pelvis"]


def make_cohort(n_bags: int, slices: int, d: int, rng: np.random.Generator):
    """Random float16 bags (2 windows x ~`slices` slices each), ~20 % positives per label, 1-3 bags a patient."""
    bags = []
    for _ in range(n_bags):
        n = int(rng.integers(int(0.7 * slices), int(1.3 * slices) + 1))
        bags.append(rng.standard_normal((2 * n, d), dtype=np.float32).astype(np.float16))
    labels = (rng.random((n_bags, len(CLASSES))) < 0.2).astype(np.int64)
    patients = [f"p{i // 2}" for i in range(n_bags)]
    return bags, labels, patients


def train_flops(n: int, d: int, hidden: int) -> float:
    """Matmul FLOPs of one training pass over n instances: embedding forward + weight gradient (the input
    needs no gradient), attention V forward + input and weight gradients. The rest is O(n * hidden)."""
    return n * (4 * d * hidden + 6 * hidden * hidden)


def predict_flops(n: int, d: int, hidden: int) -> float:
    return n * (2 * d * hidden + 2 * hidden * hidden)


def time_loop(bags, labels, cfg: AbmilConfig, n_batches: int, n_predict: int) -> tuple[float, float]:
    """Seconds per 128-bag training batch and per predicted bag, one bag per forward pass."""
    torch.manual_seed(0)
    model = ABMIL(bags[0].shape[1], labels.shape[1], cfg.hidden, cfg.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    pos_weight = class_pos_weight(labels)
    y = torch.from_numpy(labels.astype(np.float32))
    model.train()
    t0 = time.perf_counter()
    for b in range(n_batches):
        opt.zero_grad(set_to_none=True)
        idx = range(b * cfg.batch_size, (b + 1) * cfg.batch_size)
        for i in idx:
            logits, _ = model(torch.from_numpy(bags[i]).float()[None])
            (masked_loss(logits, y[i : i + 1], "bce", pos_weight) / cfg.batch_size).backward()
        opt.step()
    per_batch = (time.perf_counter() - t0) / n_batches
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n_predict):
            model(torch.from_numpy(bags[i]).float()[None])
    return per_batch, (time.perf_counter() - t0) / n_predict


def compare(bags, labels, patients, args: argparse.Namespace, threads: int) -> None:
    """Both sides at one torch thread count, printed side by side."""
    torch.set_num_threads(threads)
    load0 = os.getloadavg()[0]
    cfg = EvaluateConfig(abmil=AbmilConfig(epochs=args.epochs, patience=args.epochs + 1))
    cfg.splits.n_folds = args.folds
    d, hid, cap = args.dim, cfg.abmil.hidden, cfg.abmil.max_instances or 1 << 62
    n_inst = np.asarray([b.shape[0] for b in bags])
    t0 = time.perf_counter()
    res = run_abmil_cv(bags, labels, patients, CLASSES, cfg, seed=args.seed)
    batched = time.perf_counter() - t0

    per_batch, per_bag = time_loop(
        bags, labels, cfg.abmil, args.loop_batches, min(args.loop_predict, args.bags)
    )
    loop, flops = 0.0, 0.0
    for f in res.folds:
        n_train, n_val, n_test = f.train_index.size, f.val_index.size, f.test_index.size
        train_batches = math.ceil(n_train / cfg.abmil.batch_size)
        # Per fold: every epoch trains and predicts the validation set; then validation and test are scored.
        loop += args.epochs * (train_batches * per_batch + n_val * per_bag) + (n_val + n_test) * per_bag
        val_inst, test_inst = n_inst[f.val_index].sum(), n_inst[f.test_index].sum()
        flops += args.epochs * (
            train_flops(np.minimum(n_inst[f.train_index], cap).sum(), d, hid)
            + predict_flops(val_inst, d, hid)
        )
        flops += predict_flops(val_inst + test_inst, d, hid)
    timed_train = n_inst[: args.loop_batches * cfg.abmil.batch_size]
    loop_gflops = train_flops(np.minimum(timed_train, cap).sum(), d, hid) / (per_batch * args.loop_batches)
    fold = res.folds[0]
    print(f"\n[torch threads = {threads}; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}]")
    print(f"batched: {args.folds} folds x {args.epochs} epochs ({res.splits.mode}; fold 0 train/val/test "
          f"{fold.train_index.size}/{fold.val_index.size}/{fold.test_index.size}) measured {batched:.1f} s, "
          f"{flops / batched / 1e9:.0f} GFLOP/s of matmul work")  # fmt: skip
    print(f"bag-at-a-time: timed {args.loop_batches} training batches ({per_batch:.2f} s each, "
          f"{loop_gflops / 1e9:.0f} GFLOP/s) and {min(args.loop_predict, args.bags)} predictions "
          f"({per_bag * 1e3:.1f} ms each); EXTRAPOLATED to the same CV: {loop:.1f} s")  # fmt: skip
    print(f"ratio bag-at-a-time / batched = {loop / batched:.1f}x (target >= 10x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=4377)
    ap.add_argument("--slices", type=int, default=150, help="mean slices per window (2 windows per bag)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--loop-batches", type=int, default=3, help="training batches timed for the loop")
    ap.add_argument("--loop-predict", type=int, default=256, help="bags predicted for the loop timing")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="one comparison per count")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    bags, labels, patients = make_cohort(args.bags, args.slices, args.dim, rng)
    n_inst = np.mean([b.shape[0] for b in bags])
    print(f"cohort: {args.bags} bags, mean {n_inst:.0f} instances, d={args.dim}, {len(CLASSES)} labels "
          f"({time.perf_counter() - t0:.1f} s to generate); {os.cpu_count()} CPUs")  # fmt: skip
    for threads in args.threads:
        compare(bags, labels, patients, args, threads)


if __name__ == "__main__":
    main()
