"""Can this encoder, at this resolution and budget, see the cohort's lesions at all? A supervised ceiling.

Issue 4 asks the pretrained encoder to beat the same architecture with random weights on lesion location.
When it does not, this separates "the self-supervised objective does not learn lesions" from "this encoder
cannot detect them here": the encoder is trained DIRECTLY on per-slice typed lesion presence (BCE over the 8
DeepLesion types, balanced batches: half the slices show a lesion, AdamW one-cycle, random horizontal flips,
one window per image chosen at random as in CLEAR's per-window input) on one preprocessed cohort, then scored
on another. With `--cells` every patch token / feature-map cell is also supervised with the lesion types it
covers (segmentation-strength supervision, like DALE-CT's 2S patch term) and the slice score is the max over
cells.

`--target findings` (issue 15) trains on the CHEST FINDINGS instead: the preprocess output's masks/<scan>.npz
"finding" label maps, classes named by masks/finding_classes.json (class 0 "none"); a slice is positive for
finding c when its map contains c. Balanced batches then mean half the slices show some finding, and the scan
figures use the scans' label_finding_* columns. The chest-findings task reads the lung window only, so train
it with `--windows lung`.

Printed figures:
- slice presence AUROC (max type probability) and per-type slice AUROC. The per-type slice figure is mostly
  ANATOMY ("this slice shows liver": lesions of a type only occur where their organ is), so it overstates
  detection;
- SCAN-level per-type AUROC: the max over a scan's slices (and windows) of the type's probability against the
  scan's lesion-location label. Every scan shows every organ, so this is what lesion location needs: 0.5 =
  the encoder cannot find that lesion type in a scan even when trained on the labels.

    .venv/bin/python benchmarks/supervised_ceiling.py --train PRE_P --eval PRE_A --encoder vit_tiny_test \\
        [--target lesions|findings] [--cells] [--windows abdomen lung] [--steps 1500] [--batch 32] \\
        [--eval-scans 160] [--device cuda] [--export DIR]

`--export DIR` writes the trained encoder like the pretrain stage does, so the product's own stages show what
the lesion-location protocol makes of a supervised detector (its ceiling for "pretrained beats random"):
`slicefm extract --preprocessed PRE_A --out E --encoder DIR` (and `--random-baseline` into R), then
`slicefm evaluate --embeddings E R --out EV`. Extract labels an exported encoder by its directory's name, so
export to a directory named `supervised` (e.g. `--export OUT/supervised`): evaluate treats the set named
"supervised" as the ceiling in its summary. The export records the training cohort's pseudonymisation key
fingerprint (`data_key_fingerprint`), as the pretrain stage's does.

No asserts; prints the figures (record them in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from lesion_signal import N_LESION_TYPES
from sklearn.metrics import roc_auc_score

from slicefm.core.shards import StackReader
from slicefm.core.store import open_store
from slicefm.models.encoders import create_encoder
from slicefm.models.export_format import export_encoder
from slicefm.ssl.views import cell_class_counts
from slicefm.train.data import LESION_NAMES, lesion_type_lookup, to_float, typed_lesion_mask

# --target -> the scans.parquet column prefix of its scan-level labels
TARGETS = {"lesions": "label_location_", "findings": "label_finding_"}


@dataclass
class Cohort:
    images: np.ndarray  # [N, n_windows, H, W] uint8 (or float16 z-scores)
    types: np.ndarray  # [N, K] 0/1: classes (lesion types / chest findings) each slice shows
    typed: np.ndarray  # [N, H, W] uint8 class map (0 = none)
    scan_of: np.ndarray  # [N] index into `scans`
    scans: pd.DataFrame  # one row per scan with its label_location_* / label_finding_* columns
    channels: list[str]  # the preprocess output's windows (in stack order)
    classes: list[str]  # the K class names (class map value k + 1)
    key_fingerprint: str | None  # pseudonymisation key of the data (preprocess.json)


def load_cohort(uri: str, windows: list[str], max_scans: int | None, target: str = "lesions") -> Cohort:
    """The first `max_scans` scans of a preprocess output: slices of `windows`, per-slice classes and class
    maps (`target` "lesions": DeepLesion types from the lesion masks; "findings": the chest finding maps)."""
    pre = open_store(uri)
    info = pre.read_json("preprocess.json")
    channels = info["channels"]
    missing = [w for w in windows if w not in channels]
    if missing:
        raise SystemExit(f"{uri}: no {missing} window (has {channels})")
    c = [channels.index(w) for w in windows]
    scans = pre.read_parquet("scans.parquet").head(max_scans).reset_index(drop=True)
    stacks = pre.read_parquet("slices.parquet").groupby("scan_id")["stack"].first()
    if target == "findings":
        if not pre.exists("masks/finding_classes.json"):
            raise SystemExit(f"{uri}: no masks/finding_classes.json (no chest finding maps)")
        names = pre.read_json("masks/finding_classes.json")
        if not names or names[0] != "none":
            raise SystemExit(f"{uri}: masks/finding_classes.json should start with 'none', got {names[:1]}")
        classes, type_of = list(names[1:]), {}
    else:
        classes, type_of = list(LESION_NAMES), lesion_type_lookup(pre.read_parquet("lesions.parquet"))
    reader = StackReader(pre)
    images, typed, types, scan_of = [], [], [], []
    for i, scan_id in enumerate(scans["scan_id"]):
        images.append(reader.read_stack(stacks[scan_id])[:, c])
        with np.load(io.BytesIO(pre.read_bytes(f"masks/{scan_id}.npz"))) as npz:
            if target == "findings":
                typed.append(np.asarray(npz["finding"], np.uint8))
            else:
                typed.append(typed_lesion_mask(npz["lesion"], type_of.get(scan_id)))
        if typed[-1].shape[0] != images[-1].shape[0]:
            raise SystemExit(
                f"{uri}: scan {scan_id} has {len(images[-1])} slices but {len(typed[-1])} mask slices"
            )
        types.append(cell_targets(typed[-1], 1, len(classes))[:, 0])  # the whole slice as one cell
        scan_of.append(np.full(len(images[-1]), i))
    return Cohort(
        np.concatenate(images),
        np.concatenate(types),
        np.concatenate(typed),
        np.concatenate(scan_of),
        scans,
        channels,
        classes,
        info.get("pseudonym_key_fingerprint"),
    )


def cell_targets(typed: np.ndarray, grid: int, n_classes: int = N_LESION_TYPES) -> np.ndarray:
    """Class maps [B, S, S] -> [B, grid*grid, K]: 1 where the cell covers any pixel of that class (the same
    cell partition as the 2S aux targets of pretraining)."""
    if typed.shape[-1] % grid:
        raise SystemExit(f"image size {typed.shape[-1]} is not divisible by the encoder's token grid {grid}")
    if int(typed.max(initial=0)) > n_classes:
        raise SystemExit(f"class map value {int(typed.max())} beyond the {n_classes} classes")
    counts = cell_class_counts(torch.from_numpy(typed), n_classes + 1, grid)[..., 1:]  # drop class 0 ("none")
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
    p.add_argument("--target", choices=sorted(TARGETS), default="lesions",
                   help="per-slice labels to train on: typed lesions, or the chest finding maps")  # fmt: skip
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
    tr = load_cohort(a.train, a.windows, None, a.target)
    ev = load_cohort(a.eval, a.windows, a.eval_scans, a.target)
    if ev.classes != tr.classes:
        raise SystemExit(f"{a.eval}'s classes {ev.classes} differ from {a.train}'s {tr.classes}")
    names, n_classes, what = tr.classes, len(tr.classes), a.target.removesuffix("s")
    pos, neg = np.flatnonzero(tr.types.max(1) > 0), np.flatnonzero(tr.types.max(1) == 0)
    if not len(pos) or not len(neg):
        raise SystemExit(f"{a.train}: needs slices with and without a {what}")
    print(f"train {len(tr.images)} slices ({len(pos)} with a {what}), eval {len(ev.images)}; {a.windows}")
    print(
        "train slices per class: "
        + ", ".join(f"{n} {int(k)}" for n, k in zip(names, tr.types.sum(0), strict=True))
    )

    overrides = dict(parse_override(kv) for kv in a.overrides.split(",") if kv)
    enc = create_encoder(a.encoder, tr.images.shape[-1], 1, **overrides).to(a.device)
    head = torch.nn.Linear(enc.embed_dim, n_classes).to(a.device)
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
        cells = head(tokens)  # [B, N, K]
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
            grid = int(round(cells.shape[1] ** 0.5))
            target = torch.from_numpy(cell_targets(typed, grid, n_classes)).to(a.device)
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
                "input_dtype": str(tr.images.dtype), "config": {"encoder": encoder_cfg}, "steps": a.steps,
                "target": a.target, "classes": names, "windows": a.windows, "train_data": a.train,
                "data_key_fingerprint": tr.key_fingerprint}  # fmt: skip
        export_encoder(enc.cpu(), a.export, meta)
        enc.to(a.device)
        label = Path(a.export.rstrip("/")).name
        print(
            f"exported the supervised encoder to {a.export} (slicefm extract labels its embeddings {label!r})"
        )
    prob = np.zeros((len(a.windows), len(ev.images), n_classes), np.float32)
    with torch.no_grad():
        for w in range(len(a.windows)):
            for i in range(0, len(ev.images), 256):
                x = torch.from_numpy(to_float(ev.images[i : i + 256, w : w + 1])).to(a.device)
                prob[w, i : i + 256] = torch.sigmoid(slice_logits(x)[0]).cpu().numpy()
    slice_prob = prob[0]  # first window for the slice figures
    present = ev.types.max(1) > 0
    print(
        f"slice {what} presence AUROC (max class probability): {roc_auc_score(present, slice_prob.max(1)):.3f}"
    )
    per_type = {
        name: roc_auc_score(ev.types[:, k], slice_prob[:, k])
        for k, name in enumerate(names)
        if 0 < ev.types[:, k].sum() < len(ev.types)
    }
    print("slice per-type AUROC (mostly anatomy): " + ", ".join(f"{n} {v:.3f}" for n, v in per_type.items()))
    scan_max = pd.DataFrame(prob.max(0)).groupby(ev.scan_of).max().to_numpy()  # [n_scans, K]
    per_scan = {}
    for k, name in enumerate(names):
        column = f"{TARGETS[a.target]}{name}"
        if column not in ev.scans:
            continue  # no scan-level label for this class
        label = ev.scans[column].to_numpy()
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
