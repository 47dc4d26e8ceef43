"""The one pretraining loop for MoCo-v3, LECL and LeJEPA: DDP, bf16 autocast (CUDA), AdamW / LARS,
warm-up + cosine schedules, gradient clipping, throughput / memory logging, checkpoints, exact resume.

A method adapter (`MoCoMethod`, `LeJEPAMethod`) owns the meta-architecture, the dataset and how a
batch becomes views and a loss; the loop owns everything else. View randomness comes from
generators derived from (seed, rank, global step), so a resumed run draws the same views.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset

from slicefm.models.encoders import Encoder, create_encoder
from slicefm.models.heads import AuxHeads
from slicefm.ssl.aux_loss import AuxSupervisionLoss, abnormality_pos_weight, organ_pos_weight_from_frequency
from slicefm.ssl.infonce import LesionKeyBank
from slicefm.ssl.lejepa import LeJEPA
from slicefm.ssl.moco import MoCoV3
from slicefm.ssl.schedules import WarmupCosine, cosine_momentum
from slicefm.ssl.sigreg import SIGReg
from slicefm.ssl.views import crop_resize, lejepa_views, lesion_crop_boxes, moco_views
from slicefm.tracking.store import Store
from slicefm.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from slicefm.train.collapse import CollapseMonitor, eval_mode
from slicefm.train.config import OptimizerConfig, PretrainConfig
from slicefm.train.data import EpochBatchSampler, PretrainIndex, SlabDataset, SliceDataset, make_loader

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- distributed context
@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def current(cls) -> DistContext:
        """Rank / world of the initialised process group (single process otherwise); CUDA device by local rank."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return cls(rank, world, device)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def step_generators(seed: int, rank: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The view RNGs of one step on one rank: pure functions of (seed, rank, step)."""
    rng = np.random.default_rng([seed, rank, step, 0])
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, step, 1]).integers(2**62)))
    return rng, gen


# --------------------------------------------------------------------------- optimizers
class LARS(torch.optim.Optimizer):
    """LARS as in moco-v3 (layer-wise trust ratio on weights only; biases and norms plain SGD momentum).

    For p.ndim > 1: g <- (g + wd * p) * eta * ||p|| / ||g + wd * p||; then mu <- momentum * mu + g,
    p <- p - lr * mu. A group's `weight_decay` is applied to its ndim > 1 parameters only.
    """

    def __init__(
        self, params: Any, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:  # fmt: skip
        defaults = {
            "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "trust_coefficient": trust_coefficient,
        }  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(
                        p_norm > 0,
                        torch.where(d_norm > 0, g["trust_coefficient"] * p_norm / d_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weights (ndim > 1) only; biases, norms, tokens get weight_decay_mult 0 (moco-v3, dinov2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay_mult": 1.0},
        {"params": no_decay, "weight_decay_mult": 0.0},
    ]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or LARS over `param_groups(model)`; lr and weight decay are set every step by the schedules."""
    groups = param_groups(model)
    if cfg.name == "lars":
        return LARS(groups, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def scaled_lr(cfg: OptimizerConfig, global_batch: int) -> float:
    """moco-v3 linear scaling rule: lr = base_lr x global_batch / 256 (or the absolute lr)."""
    return cfg.lr * global_batch / 256 if cfg.lr_scaling == "batch/256" else cfg.lr


# --------------------------------------------------------------------------- method adapters
class Method(Protocol):
    model: nn.Module  # trainable root (wrapped in DDP by the loop)
    encoder: Encoder  # backbone that is exported / checked for collapse
    dataset: Dataset

    @property
    def projector(self) -> nn.Module:
        """The head on the backbone whose output the SSL loss sees (its effective rank is logged)."""
        ...

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        step: int,
        rng: np.random.Generator,
        gen: torch.Generator,
    ) -> dict[str, torch.Tensor]: ...

    def before_step(self, step: int, total: int) -> None: ...

    def redirect(self) -> tuple[float, list[np.ndarray]] | None:
        """The sampler's label-guided swap (probability, targeted ids per item), or None."""
        ...

    def after_step(self, out: dict[str, torch.Tensor], batch: dict[str, Any], step: int) -> None: ...

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


def _encoder_factory(cfg: PretrainConfig, in_chans: int):
    def factory() -> Encoder:
        return create_encoder(cfg.encoder.name, cfg.encoder.img_size, in_chans, **cfg.encoder.overrides)

    return factory


class MoCoMethod:
    """MoCo-v3 and LECL: two views per slice; LECL gives the momentum encoder lesion-centred crops and,
    with lambda > 0, adds lambda * sum_j psi(q, l_j) over a bank of key-slice encodings."""

    def __init__(self, cfg: PretrainConfig, index: PretrainIndex, device: torch.device) -> None:
        self.cfg, self.index, self.device = cfg, index, device
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
        self.dataset = SliceDataset(index)
        self.lecl = lecl if is_lecl else None
        self.bank: LesionKeyBank | None = None
        key_mask = index.slices["key_id"].to_numpy() >= 0
        self.key_items = np.flatnonzero(key_mask)  # dataset item of key-slice id j
        if is_lecl and lecl.lesion_lambda > 0 and len(self.key_items):
            self.bank = LesionKeyBank(len(self.key_items), mc.proj_dim).to(device)
        self.lesion_keys: torch.Tensor | None = None

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
        images = torch.from_numpy(np.stack([it["image"] for it in items])).to(self.device)
        boxes = lesion_crop_boxes(np.stack([it["box"] for it in items]), tuple(images.shape[-2:]), self.lecl)
        return crop_resize(images, torch.from_numpy(boxes), self.cfg.encoder.img_size)

    @torch.no_grad()
    def fill_bank(self, chunk: int = 64) -> None:
        """Encode every key slice once (lesion-centred crop, momentum encoder) before training starts."""
        if self.bank is None or not self.lecl.bank_init_full:
            return
        ctx = DistContext.current()
        # Each rank encodes its share; the bank update gathers them so all ranks hold every key.
        ids = np.arange(len(self.key_items))[ctx.rank :: ctx.world]
        n_rounds = math.ceil(len(self.key_items) / ctx.world / chunk)
        for r in range(n_rounds):
            part = ids[r * chunk : (r + 1) * chunk]
            keys = self._bank_keys(part) if len(part) else None
            if keys is None:
                keys = torch.zeros(0, self.bank.bank.shape[1], device=self.device)
            self.bank.update(keys, torch.from_numpy(part).to(self.device))

    def redirect(self) -> None:
        return None  # MoCo / LECL draw slices uniformly

    def before_step(self, step: int, total: int) -> None:
        self.model.momentum_update(cosine_momentum(step, total, self.cfg.moco.momentum))

    def forward(self, model, batch, step, rng, gen):
        images = batch["image"].to(self.device, non_blocking=True)
        views = moco_views(
            images, batch["box"].numpy(), self.cfg.encoder.img_size, rng, gen, self.cfg.moco.crop_scale,
            self.cfg.augment, self.lecl,
        )  # fmt: skip
        self._last_lesion = views.lesion_mask
        lesion_keys = self.bank.keys() if self.bank is not None else None
        return model(views.x1, views.x2, lesion_keys, views.key_x1, views.key_x2)

    @torch.no_grad()
    def after_step(self, out, batch, step):
        if self.bank is None:
            return
        ctx = DistContext.current()
        mask = self._last_lesion.to(out["k1"].device)
        ids = batch["key_id"].to(self.device)[mask.to(self.device)]
        # The batch's own lesion-crop keys are fresh momentum encodings: store them first.
        self.bank.update(out["k1"][mask].float(), ids)
        k = self.lecl.bank_refresh_per_step
        if k:
            n = len(self.key_items)
            part = (step * k * ctx.world + ctx.rank * k + np.arange(k)) % n
            self.bank.update(self._bank_keys(part).float(), torch.from_numpy(part))

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


class LeJEPAMethod:
    """LeJEPA (+ DALE-CT 1S / 2S aux supervision) on multi-crop views of 12 mm slabs or single slices."""

    def __init__(self, cfg: PretrainConfig, index: PretrainIndex, device: torch.device) -> None:
        self.cfg, self.index, self.device = cfg, index, device
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
        self.dataset = SlabDataset(index, depth_aware=lc.depth_aware, label_guided=self.label_guided)

    @property
    def projector(self) -> nn.Module:
        return self.model.projector

    def redirect(self) -> tuple[float, list[np.ndarray]] | None:
        """The sampler's label-guided swap (DALE-CT, guidance "volume"), None otherwise."""
        return (self.cfg.lejepa.abnormal_prob, self.dataset.targets_of) if self.label_guided else None

    def before_step(self, step: int, total: int) -> None:
        return None

    def forward(self, model, batch, step, rng, gen):
        moved = {
            k: (v.to(self.device, non_blocking=True) if k in _DEVICE_KEYS else v) for k, v in batch.items()
        }
        views = lejepa_views(
            moved, rng, gen, self.cfg.lejepa, self.cfg.augment, self.global_size, self.n_organs,
            self.n_abnormal, self.token_grid, self.index.n_lesion_classes,
        )  # fmt: skip
        return model(views.global_views, views.local_views, step, views.aux_targets)

    def after_step(self, out, batch, step):
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None


_DEVICE_KEYS = ("stack", "organ", "lesion", "finding", "box_mask")


def build_method(
    cfg: PretrainConfig, index: PretrainIndex, device: torch.device
) -> MoCoMethod | LeJEPAMethod:
    if cfg.method == "lejepa":
        return LeJEPAMethod(cfg, index, device)
    return MoCoMethod(cfg, index, device)


# --------------------------------------------------------------------------- the loop
@dataclass
class TrainOutcome:
    step: int
    total_steps: int
    losses: list[float]
    slices_per_s: float
    data_wait_s: float
    compute_s: float
    collapse: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    collapse_history: list[dict[str, float]] = field(default_factory=list)


def held_images(index: PretrainIndex, n: int, size: int, seed: int) -> torch.Tensor:
    """A fixed batch of whole slices (resized to `size`) for collapse checks: same on every rank and run."""
    ds = SliceDataset(index)
    items = np.random.default_rng([seed, 7]).permutation(len(ds))[: min(n, len(ds))]
    images = torch.from_numpy(np.stack([ds[int(i)]["image"] for i in items]))
    h, w = images.shape[-2:]
    return crop_resize(images, torch.tensor([[0, 0, w, h]] * len(items)), size)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _log_metrics(metrics: dict[str, float], step: int, rank: int) -> None:
    if rank != 0:
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics, step=step)


def run_identity(cfg: PretrainConfig, ctx: DistContext) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this run."""
    return {
        "method": cfg.method, "encoder": cfg.encoder.name, "img_size": cfg.encoder.img_size, "seed": cfg.seed,
        "batch_size": cfg.loader.batch_size, "world": ctx.world,
    }  # fmt: skip


def train(
    method: MoCoMethod | LeJEPAMethod,
    cfg: PretrainConfig,
    index: PretrainIndex,
    store: Store,
    ctx: DistContext,
    resume: bool = True,
    stop_after: int | None = None,
) -> TrainOutcome:
    """Train `method` to the configured number of steps (or until `stop_after` steps: a simulated kill)."""
    model = method.model.to(ctx.device)
    if ctx.world > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # official moco-v3 recipe
        method.model = model
    ddp_model: nn.Module = model
    if ctx.world > 1:
        ddp_model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = build_optimizer(cfg.optimizer, model)
    batch = cfg.loader.batch_size
    steps_per_epoch = EpochBatchSampler.batches_per_epoch(len(method.dataset), batch, ctx.world)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(method.dataset)} items are fewer than one global batch of {batch * ctx.world}"
        )
    sc = cfg.schedule
    total = sc.max_steps or sc.epochs * steps_per_epoch
    warmup = min(
        total, sc.warmup_steps if sc.warmup_steps is not None else round(sc.warmup_epochs * steps_per_epoch)
    )
    oc = cfg.optimizer
    lr_sched = WarmupCosine(
        base=scaled_lr(oc, batch * ctx.world), final=oc.min_lr, warmup=warmup, total=total
    )
    wd_end = oc.weight_decay if oc.weight_decay_end is None else oc.weight_decay_end
    wd_sched = WarmupCosine(base=oc.weight_decay, final=wd_end, warmup=0, total=total, start=oc.weight_decay)
    lc = cfg.logging
    monitor = CollapseMonitor(
        lc.collapse_min_rank, lc.collapse_max_sigreg, lc.collapse_patience, lc.collapse_action
    )
    identity = run_identity(cfg, ctx)
    step, losses = 0, []
    state = load_checkpoint(store, identity) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_extra_state(state["extra"])
        monitor.load_state_dict(state["collapse"])
        step, losses = int(state["step"]), list(state["losses"])
        set_rng_state(state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0])
        logger.info("resumed from step %d (epoch %d)", step, step // steps_per_epoch)
    elif isinstance(method, MoCoMethod):
        method.fill_bank()
    held = held_images(index, lc.collapse_batch, cfg.encoder.img_size, cfg.seed).to(ctx.device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if ctx.device.type == "cuda" and cfg.precision == "bf16"
        else contextlib.nullcontext()
    )
    wait_s = compute_s = 0.0
    win_wait = win_compute = 0.0
    win_steps = 0
    n_done_at_start = step
    sigreg_window: list[float] = []  # LeJEPA's scale-free SIGReg since the last collapse check
    model.train()
    logger.info(
        "pretraining %s/%s: %d steps (%d per epoch), global batch %d, warm-up %d, %d rank(s) on %s",
        cfg.method, cfg.encoder.name, total, steps_per_epoch, batch * ctx.world, warmup, ctx.world, ctx.device,
    )  # fmt: skip
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler = EpochBatchSampler(
            len(method.dataset), batch, ctx.rank, ctx.world, cfg.seed, epoch, in_epoch,
            redirect=method.redirect(),
        )  # fmt: skip
        # The loader's worker base seed comes from its own generator, not from the global torch RNG, so
        # a mid-epoch restart does not shift the global RNG stream (dropout / drop-path).
        loader = make_loader(
            method.dataset, sampler, cfg.loader.workers, cfg.loader.pin_memory, cfg.loader.prefetch_factor,
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
        )  # fmt: skip
        t0 = time.perf_counter()
        for data in loader:
            t1 = time.perf_counter()
            rng, gen = step_generators(cfg.seed, ctx.rank, step)
            lr = lr_sched.apply_to(optimizer, step)
            wd_sched.apply_to(optimizer, step, key="weight_decay")
            method.before_step(step, total)
            with autocast:
                out = method.forward(ddp_model, data, step, rng, gen)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = None
            if oc.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip))
            optimizer.step()
            method.after_step(out, data, step)
            loss = float(out["loss"].detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {step}")
            losses.append(loss)
            if "sigreg_collapse" in out and math.isfinite(float(out["sigreg_collapse"])):
                sigreg_window.append(float(out["sigreg_collapse"]))
            step += 1
            t2 = time.perf_counter()
            win_wait += t1 - t0
            win_compute += t2 - t1
            win_steps += 1
            if step % lc.every_steps == 0 or step == total:
                elapsed = win_wait + win_compute
                metrics = {
                    "loss": loss, "lr": lr, "slices_per_s": win_steps * batch * ctx.world / max(elapsed, 1e-9),
                    "data_wait_s": win_wait / win_steps, "compute_s": win_compute / win_steps,
                    "memory_mb": _memory_mb(ctx.device),
                }  # fmt: skip
                for key in ("inv", "sigreg", "sigreg_collapse", "aux"):
                    if key in out:
                        metrics[key] = float(out[key])
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                logger.info(
                    "step %d/%d %s", step, total, " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                )
                _log_metrics(metrics, step, ctx.rank)
                wait_s, compute_s = wait_s + win_wait, compute_s + win_compute
                win_wait = win_compute = 0.0
                win_steps = 0
            if step % lc.collapse_every == 0 or step == total:
                ratio = float(np.mean(sigreg_window)) if sigreg_window else None
                peak = {"sigreg_collapse_max": max(sigreg_window)} if sigreg_window else None
                collapse = monitor.check(method.encoder, held, step, method.projector, ratio, peak)
                sigreg_window.clear()
                _log_metrics(collapse, step, ctx.rank)
            if step % cfg.checkpoint.every_steps == 0 or step == total:
                _save(store, ctx, model, optimizer, method, monitor, step, epoch, losses, identity, cfg)
            if step >= total or (stop_after is not None and step >= stop_after):
                break
            t0 = time.perf_counter()
        if stop_after is not None and step >= stop_after and step < total:
            return _outcome(
                step, total, losses, wait_s, compute_s, n_done_at_start, batch, ctx, monitor, True
            )
    wait_s, compute_s = wait_s + win_wait, compute_s + win_compute
    return _outcome(step, total, losses, wait_s, compute_s, n_done_at_start, batch, ctx, monitor, False)


def _outcome(step, total, losses, wait_s, compute_s, start, batch, ctx, monitor, stopped) -> TrainOutcome:
    elapsed = wait_s + compute_s
    rate = (step - start) * batch * ctx.world / elapsed if elapsed > 0 else 0.0
    last = dict(monitor.history[-1]) if monitor.history else {}
    last.pop("step", None)
    return TrainOutcome(step, total, losses, rate, wait_s, compute_s, last, stopped, list(monitor.history))


def _save(store, ctx, model, optimizer, method, monitor, step, epoch, losses, identity, cfg) -> None:
    # Every rank's RNG state is gathered so each resumes its own stream (dropout differs per rank).
    states: list[Any] = [rng_state()]
    if ctx.world > 1:
        states = [None] * ctx.world
        dist.all_gather_object(states, rng_state())
    if ctx.rank == 0:
        save_checkpoint(
            store,
            {
                "identity": identity, "step": step, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "extra": method.extra_state(),
                "collapse": monitor.state_dict(), "losses": losses, "rng": states,
                "config": cfg.model_dump(mode="json"),
            },
            keep_history=cfg.checkpoint.keep_history,
        )  # fmt: skip
    ctx.barrier()
