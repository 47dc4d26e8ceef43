"""ABMIL cross-validation at CLEAR Task-1 scale: batched (padded + masked) vs one bag at a time.

Cohort: random embeddings shaped like CLEAR Task 1 (4,377 bags, ~150 slices x 2 windows concatenated,
d = 768, 8 labels), stored float16 as the extract stage writes them. The batched side is the real protocol
(`run_abmil_cv`, held-out test + 5-fold CV, early stopping disabled so every fold runs `--epochs`).
The bag-at-a-time side trains the same ABMIL with one forward/backward per bag (gradients accumulated over
the 128-bag batch) and predicts one bag at a time; it is TIMED on `--loop-batches` training batches and
`--loop-predict` predictions, then EXTRAPOLATED to the same number of folds, epochs, validation and test
passes. Prints both wall times and their ratio (target >= 10x).

    .venv/bin/python benchmarks/mil.py                      # full scale (long on 2 CPU cores)
    .venv/bin/python benchmarks/mil.py --bags 600 --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import math
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=4377)
    ap.add_argument("--slices", type=int, default=150, help="mean slices per window (2 windows per bag)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--loop-batches", type=int, default=3, help="training batches timed for the loop")
    ap.add_argument("--loop-predict", type=int, default=256, help="bags predicted for the loop timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    bags, labels, patients = make_cohort(args.bags, args.slices, args.dim, rng)
    n_inst = np.mean([b.shape[0] for b in bags])
    print(f"cohort: {args.bags} bags, mean {n_inst:.0f} instances, d={args.dim}, {len(CLASSES)} labels "
          f"({time.perf_counter() - t0:.1f} s to generate); torch threads = {args.threads}")  # fmt: skip

    cfg = EvaluateConfig(abmil=AbmilConfig(epochs=args.epochs, patience=args.epochs + 1))
    cfg.splits.n_folds = args.folds
    t0 = time.perf_counter()
    res = run_abmil_cv(bags, labels, patients, CLASSES, cfg, seed=args.seed)
    batched = time.perf_counter() - t0
    fold = res.folds[0]
    n_train, n_val, n_test = fold.train_index.size, fold.val_index.size, fold.test_index.size
    print(f"batched: {args.folds} folds x {args.epochs} epochs ({res.splits.mode}; train/val/test "
          f"{n_train}/{n_val}/{n_test}) measured {batched:.1f} s")  # fmt: skip

    per_batch, per_bag = time_loop(
        bags, labels, cfg.abmil, args.loop_batches, min(args.loop_predict, args.bags)
    )
    train_batches = math.ceil(n_train / cfg.abmil.batch_size)
    # Per fold: every epoch trains and predicts the validation set; then validation and test are scored once.
    per_fold = args.epochs * (train_batches * per_batch + n_val * per_bag) + (n_val + n_test) * per_bag
    loop = args.folds * per_fold
    print(f"bag-at-a-time: timed {args.loop_batches} training batches ({per_batch:.2f} s each) and "
          f"{min(args.loop_predict, args.bags)} predictions ({per_bag * 1e3:.1f} ms each); "
          f"EXTRAPOLATED to the same CV: {loop:.1f} s")  # fmt: skip
    print(f"ratio bag-at-a-time / batched = {loop / batched:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
