"""Can this encoder, at this resolution and budget, see the cohort's lesions at all? A supervised ceiling.

Issue 4 asks the pretrained encoder to beat the same architecture with random weights on lesion location.
When it does not, this separates "the self-supervised objective does not learn lesions" from "this encoder
cannot detect them here": the encoder is trained DIRECTLY on per-slice typed lesion presence (BCE over the 8
DeepLesion types, balanced batches: half the slices show a lesion, AdamW one-cycle, random horizontal flips)
on one preprocessed cohort, then scored on another: slice presence AUROC (max type probability) and
per-type AUROC. If even this stays near 0.5, no pretraining of this encoder will carry lesion signal.

    .venv/bin/python benchmarks/supervised_ceiling.py --train PRE_P --eval PRE_A --encoder vit_tiny_test \\
        [--steps 1500] [--batch 32] [--window abdomen] [--eval-scans 160] [--device cuda]

No asserts; prints the figures (record them in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from lesion_signal import N_LESION_TYPES, lesion_types_per_slice
from sklearn.metrics import roc_auc_score

from slicefm.models.encoders import create_encoder
from slicefm.preprocess.shards import StackReader
from slicefm.tracking.store import open_store
from slicefm.train.data import LESION_NAMES, to_float


def load_cohort(uri: str, window: str, max_scans: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One window's slices [N, 1, H, W] float32 and their lesion types [N, 8] of the first `max_scans` scans."""
    pre = open_store(uri)
    channels = pre.read_json("preprocess.json")["channels"]
    if window not in channels:
        raise SystemExit(f"{uri}: no {window!r} window (has {channels})")
    slices = pre.read_parquet("slices.parquet")
    scan_ids = pre.read_parquet("scans.parquet")["scan_id"].tolist()[:max_scans]
    types = lesion_types_per_slice(pre, scan_ids, pre.read_parquet("lesions.parquet"))
    stacks = slices.groupby("scan_id")["stack"].first()
    reader, c = StackReader(pre), channels.index(window)
    images = [to_float(reader.read_stack(stacks[s])[:, c : c + 1]) for s in scan_ids]
    return np.concatenate(images), np.concatenate([types[s] for s in scan_ids])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="preprocess output to train on (the pretraining cohort)")
    p.add_argument("--eval", required=True, help="preprocess output to score on (the evaluated cohort)")
    p.add_argument("--encoder", default="vit_tiny_test", help="timm or slicefm registry name")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--window", default="abdomen")
    p.add_argument("--eval-scans", type=int, default=160)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    x_tr, y_tr = load_cohort(a.train, a.window, None)
    x_ev, y_ev = load_cohort(a.eval, a.window, a.eval_scans)
    pos, neg = np.flatnonzero(y_tr.max(1) > 0), np.flatnonzero(y_tr.max(1) == 0)
    if not len(pos) or not len(neg):
        raise SystemExit(f"{a.train}: needs slices with and without lesions")
    print(f"train {len(x_tr)} slices ({len(pos)} with a lesion), eval {len(x_ev)}; {x_tr.shape[-1]} px")

    enc = create_encoder(a.encoder, x_tr.shape[-1], 1).to(a.device)
    head = torch.nn.Linear(enc.embed_dim, N_LESION_TYPES).to(a.device)
    params = [*enc.parameters(), *head.parameters()]
    print(f"{a.encoder}: {sum(q.numel() for q in params) / 1e6:.2f} M parameters, device {a.device}")
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.steps, pct_start=0.05)
    t_train = time.perf_counter()
    for step in range(a.steps):
        idx = np.concatenate([rng.choice(pos, a.batch // 2), rng.choice(neg, a.batch - a.batch // 2)])
        x = torch.from_numpy(x_tr[idx]).to(a.device)
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(a.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.binary_cross_entropy_with_logits(head(enc(x)), torch.from_numpy(y_tr[idx]).to(a.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, a.steps // 6) == 0 or step == a.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    train_s = time.perf_counter() - t_train

    enc.eval()
    with torch.no_grad():
        prob = torch.cat(
            [torch.sigmoid(head(enc(torch.from_numpy(x_ev[i : i + 256]).to(a.device)))).cpu()
             for i in range(0, len(x_ev), 256)]
        ).numpy()  # fmt: skip
    present = y_ev.max(1) > 0
    print(f"slice lesion presence AUROC (max type probability): {roc_auc_score(present, prob.max(1)):.3f}")
    per_type = {}
    for k, name in enumerate(LESION_NAMES):
        if 0 < y_ev[:, k].sum() < len(y_ev):
            per_type[name] = roc_auc_score(y_ev[:, k], prob[:, k])
    print("per-type AUROC: " + ", ".join(f"{n} {v:.3f}" for n, v in per_type.items()))
    print(
        f"macro {np.mean(list(per_type.values())):.3f}; training {train_s:.0f} s, total {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
