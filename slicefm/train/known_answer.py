"""A known-answer check of the self-supervised machinery: does pretraining learn a factor we planted?

Synthetic "scans" (no anatomy): every slice shows one bright ellipse on a noisy background, with hidden
factors per scan that the views' augmentations preserve: its orientation (cos 2 theta, unchanged by
horizontal flips), elongation and size. Position and brightness are nuisances (crops and intensity jitter
remove them by design), and the orientation is not linear in the pixels, so random weights, whose CLS is
about a random linear map of the pixels, cannot read it; a learned representation can. The
slices are written in the preprocess output layout, pretrained on through the real pretraining stage
(views, loss, loop, export), then a held-out set of scans is embedded by the exported encoder and by the
same architecture with its initial random weights, and a ridge probe (fit on half of the held-out scans,
scored on the other half) measures how much of each factor the embeddings hold (R^2).

    result = run_known_answer(cfg, workdir)   # KnownAnswerResult: R^2 per factor, pretrained vs random

Used by the test suite (LeJEPA and MoCo-v3 must beat random weights, LeJEPA with lambda 0 must collapse)
and runnable on any install as a sanity check of a new backbone or recipe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.preprocessing import StandardScaler

from slicefm.core.shards import stack_key
from slicefm.core.store import open_store
from slicefm.models.encoders import Encoder, create_encoder
from slicefm.models.export_format import load_encoder
from slicefm.train.checkpoint import LATEST_KEY
from slicefm.train.collapse import effective_rank
from slicefm.train.config import PretrainConfig
from slicefm.train.stage import run_pretrain

logger = logging.getLogger(__name__)

FACTORS = ("orientation", "elongation", "size")
SLICE_MM = 3.0  # 4 slices per 12 mm slab


def shapes_volume(
    factors: dict[str, float], n_slices: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """[n_slices, 1, size, size] uint8: an ellipse (orientation, elongation and size from `factors`) on a
    noisy background, at a position drawn per slice; the noise changes from slice to slice."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    theta = 0.5 * np.arccos(factors["orientation"])  # cos(2 theta) survives horizontal flips
    a = factors["size"] * size  # semi-major axis, px
    b = a / factors["elongation"]
    out = np.empty((n_slices, 1, size, size), np.uint8)
    for k in range(n_slices):
        cy, cx = rng.uniform(0.35, 0.65, size=2) * size
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = np.clip((1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * b + 0.5, 0.0, 1.0)
        image = 0.15 + 0.05 * rng.standard_normal((size, size)) + 0.5 * inside
        out[k, 0] = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return out


def draw_factors(rng: np.random.Generator) -> dict[str, float]:
    """The hidden factors of one scan: none of them changes under the views' crops, flips or jitter
    (crops rescale the size, by the same factor for every view of a slice)."""
    return {
        "orientation": float(np.cos(2.0 * rng.uniform(0.0, np.pi))),
        "elongation": float(rng.uniform(1.3, 3.0)),
        "size": float(rng.uniform(0.15, 0.3)),
    }


def write_shapes_dataset(
    uri: str, n_scans: int, slices_per_scan: int = 4, size: int = 32, seed: int = 0
) -> pd.DataFrame:
    """Write a preprocess-layout dataset of synthetic scans; returns the factors per scan."""
    store = open_store(uri)
    rng = np.random.default_rng(seed)
    rows, slice_rows = [], []
    for s in range(n_scans):
        scan_id = f"K{seed:03d}{s:05d}"
        factors = draw_factors(rng)
        key = stack_key(scan_id, 0)
        store.write_npy(key, shapes_volume(factors, slices_per_scan, size, rng))
        rows.append({"scan_id": scan_id, "patient_id": scan_id, "split": "train", **factors})
        z = np.arange(slices_per_scan) * SLICE_MM
        for k in range(slices_per_scan):
            slice_rows.append(
                {
                    "scan_id": scan_id, "slice_index": k, "z_mm": float(z[k]), "slab_id": int(z[k] // 12.0),
                    "shard": 0, "stack": key, "row": k, "is_key_slice": False, "lesion_boxes": "[]",
                }
            )  # fmt: skip
    scans = pd.DataFrame(rows)
    store.write_parquet("scans.parquet", scans)
    store.write_parquet("slices.parquet", pd.DataFrame(slice_rows))
    store.write_json(
        "preprocess.json",
        {
            "channels": ["synthetic"], "dtype": "uint8", "layout": "[slice, channel, H, W]",
            "n_scans": n_scans, "n_slices": len(slice_rows), "source": f"known-answer shapes, seed {seed}",
        },
    )  # fmt: skip
    return scans


@torch.no_grad()
def embed_scans(encoder: Encoder, uri: str, scans: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Every slice of `scans` -> (embeddings [N, D], scan index [N]) with the encoder in eval mode."""
    store = open_store(uri)
    encoder.eval()
    embs, owner = [], []
    for i, scan_id in enumerate(scans["scan_id"]):
        stack = torch.from_numpy(store.read_npy(stack_key(scan_id, 0)).astype(np.float32) / 255.0)
        embs.append(encoder(stack).double().numpy())
        owner.append(np.full(len(stack), i))
    return np.concatenate(embs), np.concatenate(owner)


def probe_r2(emb: np.ndarray, owner: np.ndarray, scans: pd.DataFrame) -> dict[str, float]:
    """Ridge probe per factor, fit on the slices of the first half of the scans, R^2 on the second half."""
    n_fit = len(scans) // 2
    fit, test = owner < n_fit, owner >= n_fit
    scaler = StandardScaler().fit(emb[fit])
    x_fit, x_test = scaler.transform(emb[fit]), scaler.transform(emb[test])
    out = {}
    for factor in FACTORS:
        y = scans[factor].to_numpy()[owner]
        model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x_fit, y[fit])
        out[factor] = float(r2_score(y[test], model.predict(x_test)))
    return out


@dataclass
class KnownAnswerResult:
    pretrained: dict[str, float]  # R^2 per factor
    random: dict[str, float]
    eff_rank: float  # backbone, held-out slices
    eff_rank_random: float
    proj_eff_rank: float  # projector output, last collapse check of the run
    sigreg_collapse: float | None  # LeJEPA: last collapse check's scale-free SIGReg
    losses: list[float] = field(default_factory=list)

    def margin(self) -> float:
        """Mean over factors of R^2(pretrained) - R^2(random)."""
        return float(np.mean([self.pretrained[f] - self.random[f] for f in FACTORS]))


def run_known_answer(
    cfg: PretrainConfig, workdir: str | Path, n_train: int = 512, n_eval: int = 128, size: int = 32
) -> KnownAnswerResult:
    """Pretrain `cfg` on synthetic shapes and probe held-out scans, pretrained vs initial weights."""
    work = Path(workdir)
    train_uri, eval_uri, out_uri = str(work / "train"), str(work / "eval"), str(work / "encoder")
    write_shapes_dataset(train_uri, n_train, size=size, seed=1)
    held = write_shapes_dataset(eval_uri, n_eval, size=size, seed=2)
    torch.manual_seed(cfg.seed)
    random_encoder = create_encoder(cfg.encoder.name, cfg.encoder.img_size, 1, **cfg.encoder.overrides)
    result = run_pretrain(train_uri, out_uri, cfg, resume=False)
    encoder, _ = load_encoder(out_uri)
    emb, owner = embed_scans(encoder, eval_uri, held)
    emb_r, owner_r = embed_scans(random_encoder, eval_uri, held)
    checkpoint = torch.load(work / "encoder" / LATEST_KEY, weights_only=False)
    out = KnownAnswerResult(
        pretrained=probe_r2(emb, owner, held),
        random=probe_r2(emb_r, owner_r, held),
        eff_rank=effective_rank(torch.from_numpy(emb)),
        eff_rank_random=effective_rank(torch.from_numpy(emb_r)),
        proj_eff_rank=result.collapse["proj_eff_rank"],
        sigreg_collapse=result.collapse.get("sigreg_collapse"),
        losses=list(checkpoint["losses"]),
    )
    logger.info(
        "known answer (%s): R^2 pretrained %s vs random %s; effective rank %.1f vs %.1f",
        cfg.method, out.pretrained, out.random, out.eff_rank, out.eff_rank_random,
    )  # fmt: skip
    return out
