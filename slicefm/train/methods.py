"""Pretraining methods as the loop sees them: the `Method` protocol and its two adapters.

A method owns its meta-architecture, its dataset and how a batch becomes views and a loss, plus whatever
state of its own a checkpoint must carry (LECL's key bank). `MoCoMethod` serves MoCo-v3 and LECL,
`LeJEPAMethod` LeJEPA with optional DALE-CT auxiliary supervision. Each builds the library modules
(`slicefm.ssl`) from the validated `PretrainConfig` and hands them over ready-made.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from slicefm.models.encoders import Encoder, create_encoder
from slicefm.models.heads import AuxHeads
from slicefm.ssl.aux_loss import AuxSupervisionLoss, abnormality_pos_weight, organ_pos_weight_from_frequency
from slicefm.ssl.infonce import LesionKeyBank
from slicefm.ssl.lejepa import LeJEPA
from slicefm.ssl.moco import MoCoV3
from slicefm.ssl.schedules import cosine_momentum
from slicefm.ssl.sigreg import SIGReg
from slicefm.ssl.views import (
    LeJEPAViews,
    MoCoViews,
    as_float,
    crop_resize,
    lejepa_views,
    lesion_crop_boxes,
    moco_views,
)
from slicefm.train.collapse import eval_mode
from slicefm.train.config import PretrainConfig
from slicefm.train.data import PretrainIndex, SlabDataset, SliceDataset
from slicefm.train.distributed import DistContext


class Method(Protocol):
    """Everything the training loop asks of a pretraining method."""

    # The trainable root: the loop moves it to the device (SyncBatchNorm on multi-GPU) and sets it back.
    model: nn.Module
    encoder: Encoder  # the backbone that is exported and checked for collapse
    dataset: Dataset  # the items the loop's sampler draws

    @property
    def projector(self) -> nn.Module:
        """The head on the backbone whose output the SSL loss sees (its effective rank is logged)."""
        ...

    def redirect(self) -> tuple[float, list[np.ndarray]] | None:
        """The sampler's label-guided swap (probability, targeted ids per item), or None."""
        ...

    def start(self) -> None:
        """Once before the first step of a fresh run (not after a resume, whose checkpoint holds the state)."""
        ...

    def before_step(self, step: int, total: int) -> None: ...

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        step: int,
        rng: np.random.Generator,
        gen: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """One step's views of `batch` through `model` (the DDP-wrapped `self.model`): a dict with "loss"."""
        ...

    def after_step(self, out: dict[str, torch.Tensor], batch: dict[str, Any], step: int) -> None: ...

    def loss_terms(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        """The parts of the loss of `forward`'s output that are logged beside it (may be empty)."""
        ...

    def collapse_signal(self, out: dict[str, torch.Tensor]) -> float | None:
        """A scale-free per-step collapse statistic (0 healthy, 1 collapsed) that the collapse monitor averages
        between its checks, or None when the method has none (non-finite values are skipped)."""
        ...

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


def build_method(cfg: PretrainConfig, index: PretrainIndex, ctx: DistContext) -> Method:
    if cfg.method == "lejepa":
        return LeJEPAMethod(cfg, index, ctx)
    return MoCoMethod(cfg, index, ctx)


def _encoder_factory(cfg: PretrainConfig, in_chans: int) -> Callable[[], Encoder]:
    def factory() -> Encoder:
        return create_encoder(cfg.encoder.name, cfg.encoder.img_size, in_chans, **cfg.encoder.overrides)

    return factory


class MoCoMethod:
    """MoCo-v3 and LECL: two views per slice; LECL gives the momentum encoder lesion-centred crops and,
    with lambda > 0, adds lambda * sum_j psi(q, l_j) over a bank of key-slice encodings."""

    def __init__(self, cfg: PretrainConfig, index: PretrainIndex, ctx: DistContext) -> None:
        self.cfg, self.index, self.ctx, self.device = cfg, index, ctx, ctx.device
        mc, lecl = cfg.moco, cfg.lecl
        is_lecl = cfg.method == "lecl"
        self.model = MoCoV3(
            _encoder_factory(cfg, index.in_chans),
            proj_dim=mc.proj_dim, mlp_dim=mc.mlp_dim, proj_layers=mc.proj_layers, pred_layers=mc.pred_layers,
            temperature=mc.temperature, lesion_lambda=lecl.lesion_lambda if is_lecl else 0.0,
            lesion_term=lecl.lesion_term, momentum=mc.momentum, scale_by_2t=mc.scale_by_2t,
            freeze_patch_embed=mc.freeze_patch_embed,
        )  # fmt: skip
        self.encoder = self.model.base_encoder
        self.dataset = SliceDataset(index, raw=True)  # uint8 / float16 to the device, float there
        self.lecl = lecl if is_lecl else None
        self.bank: LesionKeyBank | None = None
        key_mask = index.slices["key_id"].to_numpy() >= 0
        self.key_items = np.flatnonzero(key_mask)  # dataset item of key-slice id j
        if is_lecl and lecl.lesion_lambda > 0 and len(self.key_items):
            self.bank = LesionKeyBank(len(self.key_items), mc.proj_dim).to(self.device)
        self._last_lesion: torch.Tensor | None = None

    @property
    def projector(self) -> nn.Module:
        return self.model.base_projector

    @torch.no_grad()
    def _bank_keys(self, key_ids: np.ndarray) -> torch.Tensor:
        """Momentum-branch encodings of key slices in eval mode: a refresh of a few lesion crops must neither
        be normalised by its own batch statistics nor move the BatchNorm running statistics."""
        with eval_mode(self.model.momentum_encoder, self.model.momentum_projector):
            return self.model.encode_keys(self._key_slices(key_ids))

    def _key_slices(self, key_ids: np.ndarray) -> torch.Tensor:
        items = [self.dataset[int(self.key_items[j])] for j in key_ids]
        images = as_float(torch.from_numpy(np.stack([it["image"] for it in items])).to(self.device))
        boxes = lesion_crop_boxes(np.stack([it["box"] for it in items]), tuple(images.shape[-2:]), self.lecl)
        return crop_resize(images, torch.from_numpy(boxes), self.cfg.encoder.img_size)

    @torch.no_grad()
    def fill_bank(self, chunk: int = 64) -> None:
        """Encode every key slice once (lesion-centred crop, momentum encoder) before training starts."""
        if self.bank is None or not self.lecl.bank_init_full:
            return
        ctx = self.ctx
        # Each rank encodes its share; the bank update gathers them so all ranks hold every key.
        ids = np.arange(len(self.key_items))[ctx.rank :: ctx.world]
        n_rounds = math.ceil(len(self.key_items) / ctx.world / chunk)
        for r in range(n_rounds):
            part = ids[r * chunk : (r + 1) * chunk]
            keys = self._bank_keys(part) if len(part) else None
            if keys is None:
                keys = torch.zeros(0, self.bank.bank.shape[1], device=self.device)
            self.bank.update(keys, torch.from_numpy(part).to(self.device))

    def start(self) -> None:
        self.fill_bank()

    def redirect(self) -> None:
        return None  # MoCo / LECL draw slices uniformly

    def before_step(self, step: int, total: int) -> None:
        self.model.momentum_update(cosine_momentum(step, total, self.cfg.moco.momentum))

    def views(self, batch: dict[str, Any], rng: np.random.Generator, gen: torch.Generator) -> MoCoViews:
        """The step's two views (and LECL's lesion-centred keys) of a loader batch, on the method's device."""
        images = batch["image"].to(self.device, non_blocking=True)
        return moco_views(
            images, batch["box"].numpy(), self.cfg.encoder.img_size, rng, gen, self.cfg.moco.crop_scale,
            self.cfg.augment, self.lecl,
        )  # fmt: skip

    def forward(self, model, batch, step, rng, gen):
        views = self.views(batch, rng, gen)
        self._last_lesion = views.lesion_mask
        lesion_keys = self.bank.keys() if self.bank is not None else None
        return model(views.x1, views.x2, lesion_keys, views.key_x1, views.key_x2)

    @torch.no_grad()
    def after_step(self, out, batch, step):
        if self.bank is None:
            return
        ctx = self.ctx
        mask = self._last_lesion.to(out["k1"].device)
        ids = batch["key_id"].to(self.device)[mask.to(self.device)]
        # The batch's own lesion-crop keys are fresh momentum encodings: store them first.
        self.bank.update(out["k1"][mask].float(), ids)
        k = self.lecl.bank_refresh_per_step
        if k:
            n = len(self.key_items)
            part = (step * k * ctx.world + ctx.rank * k + np.arange(k)) % n
            self.bank.update(self._bank_keys(part).float(), torch.from_numpy(part))

    def loss_terms(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def collapse_signal(self, out: dict[str, torch.Tensor]) -> float | None:
        return None  # the backbone's effective rank is the only collapse check

    def extra_state(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict()} if self.bank is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])


def organ_frequencies(index: PretrainIndex, n_organs: int, max_scans: int) -> torch.Tensor:
    """Mean pixel fraction of every organ class over the organ masks of up to `max_scans` scans."""
    counts = np.zeros(n_organs, np.float64)
    reader = SliceDataset(index)._io
    for sid in sorted(index.scans_with_masks)[:max_scans]:
        rows = index.slices.loc[index.slices["scan_id"] == sid, "row"].to_numpy()
        organ = reader.masks(sid, rows, (1, 1))["organ"]
        counts += np.bincount(organ.ravel(), minlength=n_organs)[:n_organs]
    total = counts.sum()
    return torch.from_numpy(counts / total if total else counts).float()


_DEVICE_KEYS = ("stack", "organ", "lesion", "finding", "box_mask")
_LOSS_TERMS = ("inv", "sigreg", "sigreg_collapse", "aux")


class LeJEPAMethod:
    """LeJEPA (+ DALE-CT 1S / 2S aux supervision) on multi-crop views of 12 mm slabs or single slices."""

    def __init__(self, cfg: PretrainConfig, index: PretrainIndex, ctx: DistContext) -> None:
        self.cfg, self.index, self.ctx, self.device = cfg, index, ctx, ctx.device
        lc, ac = cfg.lejepa, cfg.aux
        encoder = _encoder_factory(cfg, index.in_chans)()
        self.global_size = lc.global_size or cfg.encoder.img_size
        self.n_organs = self.n_abnormal = self.token_grid = None
        aux = aux_loss = None
        if ac.mode is not None:
            if not index.organ_classes or not index.scans_with_masks:
                raise ValueError(
                    "auxiliary supervision needs organ masks (masks/organ_classes.json + masks/*.npz)"
                )
            self.n_organs = len(index.organ_classes)
            self.n_abnormal = index.n_abnormal
            freq = organ_frequencies(index, self.n_organs, ac.freq_sample_scans)
            background = torch.zeros(self.n_organs, dtype=torch.bool)
            background[0] = True  # mask value 0 = background: pos_weight 1 (DALE-CT)
            organ_w = organ_pos_weight_from_frequency(freq, ac.organ_pos_weight_cap, background=background)
            two = ac.mode == "2S"
            abn_w = abnormality_pos_weight(self.n_abnormal, ac.abn_pos_weight) if two else None
            aux = AuxHeads(encoder.embed_dim, self.n_organs, self.n_abnormal if two else 0)
            aux_loss = AuxSupervisionLoss(organ_w, abn_w, ac.mode, ac.cls_patch_weights)
            if two:
                with torch.no_grad():
                    _, patches = encoder.forward_tokens(
                        torch.zeros(2, index.in_chans, *[self.global_size] * 2)
                    )
                if patches is None:
                    raise ValueError(f"2S needs patch tokens; {cfg.encoder.name} has none")
                self.token_grid = math.isqrt(patches.shape[1])
                if self.token_grid**2 != patches.shape[1]:
                    raise ValueError(f"patch tokens {patches.shape[1]} do not form a square grid")
        # SIGReg's directions are seeded by the run's seed (+ the global step): the same on every rank.
        sigreg = SIGReg(num_directions=lc.num_directions, num_knots=lc.num_knots, seed=cfg.seed)
        self.model = LeJEPA(
            encoder, proj_dim=lc.proj_dim, lam=lc.lam, sigreg=sigreg, aux=aux, alpha=ac.alpha,
            aux_loss=aux_loss, proj_hidden=lc.proj_hidden, proj_layers=lc.proj_layers,
            reference_batch=lc.reference_batch,
        )  # fmt: skip
        self.encoder = encoder
        self.label_guided = lc.guidance == "volume" and lc.abnormal_prob > 0
        self.dataset = SlabDataset(
            index, depth_aware=lc.depth_aware, label_guided=self.label_guided, raw=True
        )  # stacks in their stored dtype to the device, float there

    @property
    def projector(self) -> nn.Module:
        return self.model.projector

    def redirect(self) -> tuple[float, list[np.ndarray]] | None:
        """The sampler's label-guided swap (DALE-CT, guidance "volume"), None otherwise."""
        return (self.cfg.lejepa.abnormal_prob, self.dataset.targets_of) if self.label_guided else None

    def start(self) -> None:
        return None

    def before_step(self, step: int, total: int) -> None:
        return None

    def views(self, batch: dict[str, Any], rng: np.random.Generator, gen: torch.Generator) -> LeJEPAViews:
        """The step's multi-crop views and aux targets of a loader batch, made on the method's device."""
        moved = {
            k: (v.to(self.device, non_blocking=True) if k in _DEVICE_KEYS else v) for k, v in batch.items()
        }
        return lejepa_views(
            moved, rng, gen, self.cfg.lejepa, self.cfg.augment, self.global_size, self.n_organs,
            self.n_abnormal, self.token_grid, self.index.n_lesion_classes,
        )  # fmt: skip

    def forward(self, model, batch, step, rng, gen):
        views = self.views(batch, rng, gen)
        return model(views.global_views, views.local_views, step, views.aux_targets)

    def after_step(self, out, batch, step):
        return None

    def loss_terms(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        return {key: float(out[key]) for key in _LOSS_TERMS}

    def collapse_signal(self, out: dict[str, torch.Tensor]) -> float | None:
        """SIGReg placed between Gaussian projections (0) and a collapse to a point (1), NaN at tiny batches."""
        return float(out["sigreg_collapse"])

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None
