"""Can this encoder, at this resolution and budget, see the cohort's lesions at all? A supervised ceiling.

Issue 4 asks the pretrained encoder to beat the same architecture with random weights on lesion location.
When it does not, this separates "the self-supervised objective does not learn lesions" from "this encoder
cannot detect them here": the encoder is trained DIRECTLY on per-slice typed lesion presence (BCE over the 8
DeepLesion types, balanced batches: half the slices show a lesion, AdamW one-cycle, random horizontal flips,
one window per image chosen at random as in CLEAR's per-window input) on one preprocessed cohort, then scored
on another. With `--cells` every patch token / feature-map cell is also supervised with the lesion types it
covers (segmentation-strength supervision, like DALE-CT's 2S patch term) and the slice score is the max over
cells.

Printed figures:
- slice presence AUROC (max type probability) and per-type slice AUROC. The per-type slice figure is mostly
  ANATOMY ("this slice shows liver": lesions of a type only occur where their organ is), so it overstates
  detection;
- SCAN-level per-type AUROC: the max over a scan's slices (and windows) of the type's probability against the
  scan's lesion-location label. Every scan shows every organ, so this is what lesion location needs: 0.5 =
  the encoder cannot find that lesion type in a scan even when trained on the labels.

    .venv/bin/python benchmarks/supervised_ceiling.py --train PRE_P --eval PRE_A --encoder vit_tiny_test \\
        [--cells] [--windows abdomen lung] [--steps 1500] [--batch 32] [--eval-scans 160] [--device cuda] \\
        [--export DIR]

`--export DIR` writes the trained encoder like the pretrain stage does, so the product's own stages show what
the lesion-location protocol makes of a supervised detector (its ceiling for "pretrained beats random"):
`slicefm extract --preprocessed PRE_A --out E --encoder DIR` (and `--random-baseline` into R), then
`slicefm evaluate --embeddings E R --out EV`.

No asserts; prints the figures (record them in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from lesion_signal import N_LESION_TYPES
from sklearn.metrics import roc_auc_score

from slicefm.models.encoders import create_encoder
from slicefm.preprocess.shards import StackReader
from slicefm.ssl.views import cell_class_counts
from slicefm.tracking.store import open_store
from slicefm.train.data import LESION_NAMES, lesion_type_lookup, to_float, typed_lesion_mask
from slicefm.train.export import export_encoder


@dataclass
class Cohort:
    images: np.ndarray  # [N, n_windows, H, W] uint8 (or float16 z-scores)
    types: np.ndarray  # [N, 8] 0/1: lesion types each slice shows
    typed: np.ndarray  # [N, H, W] uint8 lesion-type map (0 = none)
    scan_of: np.ndarray  # [N] index into `scans`
    scans: pd.DataFrame  # one row per scan with its label_location_* columns
    channels: list[str]  # the preprocess output's windows (in stack order)


def load_cohort(uri: str, windows: list[str], max_scans: int | None) -> Cohort:
    """The first `max_scans` scans of a preprocess output: slices of `windows`, lesion types and type maps."""
    pre = open_store(uri)
    channels = pre.read_json("preprocess.json")["channels"]
    missing = [w for w in windows if w not in channels]
    if missing:
        raise SystemExit(f"{uri}: no {missing} window (has {channels})")
    c = [channels.index(w) for w in windows]
    scans = pre.read_parquet("scans.parquet").head(max_scans).reset_index(drop=True)
    stacks = pre.read_parquet("slices.parquet").groupby("scan_id")["stack"].first()
    type_of = lesion_type_lookup(pre.read_parquet("lesions.parquet"))
    reader = StackReader(pre)
    images, typed, types, scan_of = [], [], [], []
    for i, scan_id in enumerate(scans["scan_id"]):
        images.append(reader.read_stack(stacks[scan_id])[:, c])
        with np.load(io.BytesIO(pre.read_bytes(f"masks/{scan_id}.npz"))) as npz:
            typed.append(typed_lesion_mask(npz["lesion"], type_of.get(scan_id)))
        types.append(cell_targets(typed[-1], 1)[:, 0])  # the whole slice as one cell
        scan_of.append(np.full(len(images[-1]), i))
    return Cohort(
        np.concatenate(images),
        np.concatenate(types),
        np.concatenate(typed),
        np.concatenate(scan_of),
        scans,
        channels,
    )


def cell_targets(typed: np.ndarray, grid: int) -> np.ndarray:
    """Type maps [B, S, S] -> [B, grid*grid, 8]: 1 where the cell covers any pixel of that lesion type
    (the same cell partition as the 2S aux targets of pretraining)."""
    if typed.shape[-1] % grid:
        raise SystemExit(f"image size {typed.shape[-1]} is not divisible by the encoder's token grid {grid}")
    counts = cell_class_counts(torch.from_numpy(typed), N_LESION_TYPES + 1, grid)[..., 1:]  # drop "no lesion"
    return (counts > 0).numpy().astype(np.float32)


def parse_override(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value read as YAML, like `encoder.overrides` in a config), for timm kwargs."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--overrides: expected key=value, got {item!r}")
    return key, yaml.safe_load(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="preprocess output to train on (the pretraining cohort)")
    p.add_argument("--eval", required=True, help="preprocess output to score on (the evaluated cohort)")
    p.add_argument("--encoder", default="vit_tiny_test", help="timm or slicefm registry name")
    p.add_argument("--overrides", default="", help="timm overrides, e.g. 'global_pool=max,output_stride=8'")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--windows", nargs="+", default=["abdomen"])
    p.add_argument("--cells", action="store_true", help="also supervise every patch token / cell")
    p.add_argument("--cell-pos-weight", type=float, default=20.0)
    p.add_argument("--eval-scans", type=int, default=160)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", help="write the trained encoder here (pretrain-stage export layout)")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    tr, ev = load_cohort(a.train, a.windows, None), load_cohort(a.eval, a.windows, a.eval_scans)
    pos, neg = np.flatnonzero(tr.types.max(1) > 0), np.flatnonzero(tr.types.max(1) == 0)
    if not len(pos) or not len(neg):
        raise SystemExit(f"{a.train}: needs slices with and without lesions")
    print(f"train {len(tr.images)} slices ({len(pos)} with a lesion), eval {len(ev.images)}; {a.windows}")

    overrides = dict(parse_override(kv) for kv in a.overrides.split(",") if kv)
    enc = create_encoder(a.encoder, tr.images.shape[-1], 1, **overrides).to(a.device)
    head = torch.nn.Linear(enc.embed_dim, N_LESION_TYPES).to(a.device)
    params = [*enc.parameters(), *head.parameters()]
    print(
        f"{a.encoder} {overrides}: {sum(q.numel() for q in params) / 1e6:.2f} M parameters, device {a.device}"
    )
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.steps, pct_start=0.05)
    cell_w = torch.tensor(a.cell_pos_weight, device=a.device)

    def slice_logits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled, tokens = enc.forward_tokens(x)
        if not a.cells:
            return head(pooled), None
        if tokens is None:
            raise SystemExit(f"{a.encoder} has no patch tokens / feature map for --cells")
        cells = head(tokens)  # [B, N, 8]
        return torch.maximum(head(pooled), cells.amax(dim=1)), cells

    t_train = time.perf_counter()
    for step in range(a.steps):
        idx = np.concatenate([rng.choice(pos, a.batch // 2), rng.choice(neg, a.batch - a.batch // 2)])
        window = rng.integers(0, len(a.windows), len(idx))
        flip = rng.random(len(idx)) < 0.5
        images = tr.images[idx, window][:, None]
        typed = tr.typed[idx]
        images[flip], typed[flip] = images[flip][..., ::-1], typed[flip][..., ::-1]
        x = torch.from_numpy(to_float(images)).to(a.device)
        logits, cells = slice_logits(x)
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(tr.types[idx]).to(a.device))
        if cells is not None:
            target = torch.from_numpy(cell_targets(typed, int(round(cells.shape[1] ** 0.5)))).to(a.device)
            loss = loss + F.binary_cross_entropy_with_logits(cells, target, pos_weight=cell_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, a.steps // 6) == 0 or step == a.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    train_s = time.perf_counter() - t_train

    enc.eval()
    if a.export:
        encoder_cfg = {"name": a.encoder, "img_size": int(tr.images.shape[-1]), "overrides": overrides}
        meta = {"method": "supervised_ceiling", "channels": tr.channels, "input_channels": "per_window",
                "input_dtype": str(tr.images.dtype), "config": {"encoder": encoder_cfg}, "steps": a.steps}  # fmt: skip
        export_encoder(enc.cpu(), a.export, meta)
        enc.to(a.device)
        print(f"exported the supervised encoder to {a.export}")
    prob = np.zeros((len(a.windows), len(ev.images), N_LESION_TYPES), np.float32)
    with torch.no_grad():
        for w in range(len(a.windows)):
            for i in range(0, len(ev.images), 256):
                x = torch.from_numpy(to_float(ev.images[i : i + 256, w : w + 1])).to(a.device)
                prob[w, i : i + 256] = torch.sigmoid(slice_logits(x)[0]).cpu().numpy()
    slice_prob = prob[0]  # first window for the slice figures
    present = ev.types.max(1) > 0
    print(
        f"slice lesion presence AUROC (max type probability): {roc_auc_score(present, slice_prob.max(1)):.3f}"
    )
    per_type = {
        name: roc_auc_score(ev.types[:, k], slice_prob[:, k])
        for k, name in enumerate(LESION_NAMES)
        if 0 < ev.types[:, k].sum() < len(ev.types)
    }
    print("slice per-type AUROC (mostly anatomy): " + ", ".join(f"{n} {v:.3f}" for n, v in per_type.items()))
    scan_max = pd.DataFrame(prob.max(0)).groupby(ev.scan_of).max().to_numpy()  # [n_scans, 8]
    per_scan = {}
    for k, name in enumerate(LESION_NAMES):
        label = ev.scans[f"label_location_{name}"].to_numpy()
        if 0 < label.sum() < len(label):
            per_scan[name] = roc_auc_score(label, scan_max[:, k])
    print("SCAN-level per-type AUROC (max over slices and windows): "
          + ", ".join(f"{n} {v:.3f}" for n, v in per_scan.items()))  # fmt: skip
    print(
        f"scan-level macro {np.mean(list(per_scan.values())):.3f}; slice per-type macro "
        f"{np.mean(list(per_type.values())):.3f}; training {train_s:.0f} s, total {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
