"""The supervised ceiling: the pretraining architecture trained directly on the pretraining cohort's labels.

It answers "can an encoder of this size, at this resolution and budget, see what the evaluated tasks ask at
all?". Its embeddings go through the same extract and evaluate stages as the pretrained and random-weight
ones (as the set named `SUPERVISED_LABEL`), so every task's summary shows pretrained and random beside a
ceiling of the same protocol: when even the supervised encoder stays near chance (lesion location on a small
CPU cohort), "pretrained does not beat random" says nothing about the self-supervised objective.

Training: per-slice multi-label BCE over the cohort's classes (the 8 DeepLesion types from the lesion masks,
and the chest findings from the finding maps), half of every batch showing at least one class, random
horizontal flips, AdamW with a one-cycle schedule. `cells` also supervises every patch token / feature-map cell
with the classes it covers (segmentation-strength supervision like DALE-CT's 2S patch term) and scores a slice
by the max of its pooled and cell logits. Per-window input (CLEAR) feeds one random window per image.

Memory: the training scans' slices (uint8) and per-cell targets are held in memory; cap `max_scans` on
large cohorts.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slicefm.core.shards import StackReader
from slicefm.core.store import open_store
from slicefm.models.encoders import Encoder, create_encoder
from slicefm.models.export_format import export_encoder
from slicefm.ssl.views import cell_class_counts
from slicefm.train.config import PretrainConfig, SupervisedCeilingConfig
from slicefm.train.data import LESION_NAMES, lesion_type_lookup, load_index, to_float, typed_lesion_mask
from slicefm.train.loop import MetricsCallback

logger = logging.getLogger(__name__)

METHOD = "supervised_ceiling"  # encoder.json `method` of a supervised-ceiling export
SUPERVISED_LABEL = "supervised"  # the embedding set's label: evaluate reads it as the ceiling


@dataclass
class LabelledSlices:
    """The training slices of a preprocess output with their per-slice and per-cell class targets."""

    images: np.ndarray  # [N, C, S, S] uint8 windows (or float16 z-scores), S = the encoder's img_size
    slice_targets: np.ndarray  # [N, K] float32: the slice shows class k
    cell_targets: np.ndarray  # [N, G*G, K] bool: token cell covers class k (G = the encoder's token grid)
    classes: list[str]  # K names: lesion_<type> then finding_<name>
    channels: list[str]
    key_fingerprint: str | None


@dataclass
class SupervisedResult:
    """What the supervised-ceiling stage did (written to supervised_result.json beside the encoder)."""

    steps: int
    loss_first: float
    loss_last: float
    n_slices: int
    n_positive_slices: int
    classes: list[str]
    train_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cell_targets(class_map: torch.Tensor, grid: int, n_classes: int) -> torch.Tensor:
    """Class maps [B, S, S] (0 = none, k = class k-1) -> [B, grid*grid, n_classes] bool: the cell covers any
    pixel of the class (the cell partition of the 2S auxiliary targets)."""
    if class_map.shape[-1] % grid:
        raise ValueError(f"map size {class_map.shape[-1]} is not divisible by the token grid {grid}")
    if int(class_map.max()) > n_classes:
        raise ValueError(f"class map value {int(class_map.max())} beyond the {n_classes} classes")
    return cell_class_counts(class_map, n_classes + 1, grid)[..., 1:] > 0


def hflip_cells(cells: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-cell targets [B, grid*grid, K] of images -> those of the horizontally flipped images."""
    return cells.view(cells.shape[0], grid, grid, -1).flip(2).reshape(cells.shape)


def token_grid(encoder: Encoder, in_chans: int) -> int:
    """The side of the encoder's patch-token grid at its img_size (1 when it has no spatial tokens)."""
    with torch.no_grad():
        _, tokens = encoder.forward_tokens(torch.zeros(1, in_chans, encoder.img_size, encoder.img_size))
    if tokens is None:
        return 1
    grid = round(tokens.shape[1] ** 0.5)
    if grid * grid != tokens.shape[1]:
        raise ValueError(f"{encoder.name}: {tokens.shape[1]} patch tokens do not form a square grid")
    return grid


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[B, C, S, S] -> [B, C, size, size] (no-op at the same size)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(
        x, size=(size, size), mode=mode, **({} if mode == "nearest" else {"antialias": True})
    )


def load_labelled_slices(
    uri: str, targets: list[str], img_size: int, grid: int, max_scans: int | None = None
) -> LabelledSlices:
    """The training scans of a preprocess output (test splits excluded, as for pretraining) with targets
    from the masks: "lesions" (DeepLesion types of lesions.parquet) and/or "findings" (the finding maps)."""
    store = open_store(uri)
    index = load_index(store, typed_lesions=False)
    scan_ids = list(dict.fromkeys(index.slices["scan_id"]))[:max_scans]
    missing = [s for s in scan_ids if s not in index.scans_with_masks]
    if missing:
        raise ValueError(f"{store.uri('masks')}: no masks for {len(missing)} scans (e.g. {missing[0]})")
    names: list[str] = []
    type_of: dict[str, np.ndarray] = {}
    if "lesions" in targets:
        if not store.exists("lesions.parquet"):
            raise ValueError(
                f"{store.uri('lesions.parquet')}: missing (lesion types are the 'lesions' target)"
            )
        type_of = lesion_type_lookup(store.read_parquet("lesions.parquet"))
        names += [f"lesion_{t}" for t in LESION_NAMES]
    finding_names: list[str] = []
    if "findings" in targets:
        if not index.finding_classes or index.finding_classes[0] != "none":
            raise ValueError(
                f"{store.uri('masks')}: finding_classes.json missing or not starting with 'none'"
            )
        finding_names = list(index.finding_classes[1:])
        names += [f"finding_{n}" for n in finding_names]
    stacks = index.slices.groupby("scan_id", sort=False)["stack"].first()
    reader = StackReader(store)
    images, cells = [], []
    for scan_id in scan_ids:
        stack = torch.from_numpy(np.array(reader.read_stack(stacks[scan_id])))
        with np.load(io.BytesIO(store.read_bytes(f"masks/{scan_id}.npz"))) as npz:
            maps = []
            if "lesions" in targets:
                maps.append((typed_lesion_mask(npz["lesion"], type_of.get(scan_id)), len(LESION_NAMES)))
            if "findings" in targets:
                maps.append((np.asarray(npz["finding"], np.uint8), len(finding_names)))
        per_target = []
        for class_map, n_classes in maps:
            if class_map.shape[0] != stack.shape[0]:
                raise ValueError(
                    f"scan {scan_id}: {stack.shape[0]} slices but {class_map.shape[0]} mask slices"
                )
            m = _resize(torch.from_numpy(class_map)[:, None].float(), img_size, "nearest")[:, 0].to(
                torch.uint8
            )
            per_target.append(cell_targets(m, grid, n_classes))
        cells.append(torch.cat(per_target, dim=-1).numpy())
        if stack.shape[-1] != img_size:
            resized = _resize(stack.float(), img_size, "bilinear")
            stack = (
                resized.round().clamp(0, 255).to(torch.uint8)
                if stack.dtype == torch.uint8
                else resized.half()
            )
        images.append(stack.numpy())
    cell = np.concatenate(cells)
    return LabelledSlices(
        images=np.concatenate(images),
        slice_targets=cell.any(axis=1).astype(np.float32),
        cell_targets=cell,
        classes=names,
        channels=index.channels,
        key_fingerprint=index.key_fingerprint,
    )


def _seed(pretrain: PretrainConfig, cfg: SupervisedCeilingConfig) -> int:
    return pretrain.seed if cfg.seed is None else cfg.seed


def new_encoder(pretrain: PretrainConfig, in_chans: int, seed: int) -> Encoder:
    """pretrain.encoder's architecture with fresh weights drawn from `seed`."""
    torch.manual_seed(seed)
    enc = pretrain.encoder
    return create_encoder(enc.name, enc.img_size, in_chans, **enc.overrides)


def train_supervised(
    data: LabelledSlices,
    pretrain: PretrainConfig,
    cfg: SupervisedCeilingConfig,
    device: torch.device,
    log_metrics: MetricsCallback | None = None,
    encoder: Encoder | None = None,
) -> tuple[Encoder, SupervisedResult]:
    """Train `encoder` (default: a fresh `new_encoder`) on `data`'s targets."""
    seed = _seed(pretrain, cfg)
    rng = np.random.default_rng(seed)
    per_window = pretrain.input_channels == "per_window"
    if encoder is None:
        encoder = new_encoder(pretrain, 1 if per_window else len(data.channels), seed)
    encoder = encoder.to(device)
    head = torch.nn.Linear(encoder.embed_dim, len(data.classes)).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    positive = data.slice_targets.max(axis=1) > 0
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    if not len(pos) or not len(neg):
        raise ValueError(f"supervised ceiling: needs slices with and without a class ({len(pos)} with one)")
    grid = round(data.cell_targets.shape[1] ** 0.5)
    cell_weight = torch.tensor(cfg.cell_pos_weight, device=device)
    encoder.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        half = cfg.batch_size // 2
        idx = np.concatenate([rng.choice(pos, half), rng.choice(neg, cfg.batch_size - half)])
        if per_window:
            window = rng.integers(0, len(data.channels), len(idx))
            images = data.images[idx, window][:, None]
        else:
            images = data.images[idx]
        x = torch.from_numpy(to_float(images)).to(device)
        cells = torch.from_numpy(data.cell_targets[idx]).to(device).float()  # [B, G*G, K]
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        cells = torch.where(flip[:, None, None], hflip_cells(cells, grid), cells)
        pooled, tokens = encoder.forward_tokens(x)
        logits = head(pooled)
        if cfg.cells and tokens is not None:
            cell_logits = head(tokens)
            logits = torch.maximum(logits, cell_logits.amax(dim=1))
        loss = F.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(data.slice_targets[idx]).to(device)
        )
        if cfg.cells and tokens is not None:
            loss = loss + F.binary_cross_entropy_with_logits(cell_logits, cells, pos_weight=cell_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_metrics is not None and (step % cfg.log_every_steps == 0 or step == cfg.steps - 1):
            log_metrics({"loss": losses[-1], "lr": sched.get_last_lr()[0]}, step)
    window_n = max(1, min(25, cfg.steps // 4))
    result = SupervisedResult(
        steps=cfg.steps,
        loss_first=float(np.mean(losses[:window_n])),
        loss_last=float(np.mean(losses[-window_n:])),
        n_slices=len(data.images),
        n_positive_slices=int(positive.sum()),
        classes=data.classes,
        train_s=time.perf_counter() - t0,
    )
    return encoder.eval().cpu(), result


def run_supervised_ceiling(
    slices_uri: str,
    out_uri: str,
    pretrain: PretrainConfig,
    cfg: SupervisedCeilingConfig,
    log_metrics: MetricsCallback | None = None,
) -> SupervisedResult:
    """Train the ceiling on a preprocess output and export it like the pretrain stage exports its encoder
    (encoder.safetensors + encoder.json with label "supervised"), plus supervised_result.json."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc_cfg = pretrain.encoder
    channels = open_store(slices_uri).read_json("preprocess.json")["channels"]
    in_chans = 1 if pretrain.input_channels == "per_window" else len(channels)
    # Built once: its token grid sizes the cell targets, then it is the model trained.
    encoder = new_encoder(pretrain, in_chans, _seed(pretrain, cfg))
    grid = token_grid(encoder, in_chans) if cfg.cells else 1
    data = load_labelled_slices(slices_uri, cfg.targets, enc_cfg.img_size, grid, cfg.max_scans)
    logger.info(
        "supervised ceiling: %d slices (%d classes: %s), %s on %s, %d steps",
        len(data.images), len(data.classes), ", ".join(data.classes), enc_cfg.name, device, cfg.steps,
    )  # fmt: skip
    encoder, result = train_supervised(data, pretrain, cfg, device, log_metrics, encoder)
    meta = {
        "method": METHOD,
        "label": SUPERVISED_LABEL,
        "channels": data.channels,
        "input_channels": pretrain.input_channels,
        "input_dtype": str(data.images.dtype),
        "config": {
            "encoder": enc_cfg.model_dump(mode="json"),
            "supervised_ceiling": cfg.model_dump(mode="json"),
        },
        "steps": result.steps,
        "classes": data.classes,
        "data_key_fingerprint": data.key_fingerprint,
    }
    export_encoder(encoder, out_uri, meta)
    open_store(out_uri).write_json("supervised_result.json", result.to_dict())
    logger.info(
        "supervised ceiling: loss %.3f -> %.3f in %.0f s", result.loss_first, result.loss_last, result.train_s
    )
    return result
