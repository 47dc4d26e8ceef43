"""The one pretraining loop for MoCo-v3, LECL and LeJEPA: bf16 autocast (CUDA), schedules, gradient clipping,
throughput / memory logging, collapse checks, checkpoints, exact resume.

The loop talks to the method only through `slicefm.train.methods.Method`, to the optimizer through
`slicefm.train.optim`, and to other ranks through `slicefm.train.distributed`. View randomness comes from
generators derived from (seed, rank, global step), so a resumed run draws the same views. Metrics go to
the caller's `log_metrics(metrics, step)` (rank 0 only): the loop knows no tracking server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slicefm.core.store import Store
from slicefm.ssl.views import crop_resize
from slicefm.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from slicefm.train.collapse import CollapseMonitor
from slicefm.train.config import PretrainConfig
from slicefm.train.data import EpochBatchSampler, PretrainIndex, SliceDataset, make_loader
from slicefm.train.distributed import DistContext, prepare_model
from slicefm.train.methods import Method
from slicefm.train.optim import build_optimizer, build_schedules

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


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


def step_generators(seed: int, rank: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The view RNGs of one step on one rank: pure functions of (seed, rank, step)."""
    rng = np.random.default_rng([seed, rank, step, 0])
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, step, 1]).integers(2**62)))
    return rng, gen


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


def run_identity(cfg: PretrainConfig, ctx: DistContext) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this run."""
    return {
        "method": cfg.method, "encoder": cfg.encoder.name, "img_size": cfg.encoder.img_size, "seed": cfg.seed,
        "batch_size": cfg.loader.batch_size, "world": ctx.world,
    }  # fmt: skip


@dataclass
class _Progress:
    """Where the run stands: the global step, every loss so far, and the timing of this process's steps."""

    step: int
    losses: list[float]
    start_step: int  # where this process started (throughput counts its own steps only)
    wait_s: float = 0.0  # data wait, summed over logged windows
    compute_s: float = 0.0
    win_wait: float = 0.0  # the current logging window
    win_compute: float = 0.0
    win_steps: int = 0
    # The method's collapse signal at every step since the last collapse check.
    collapse_window: list[float] = field(default_factory=list)

    def close_window(self) -> None:
        self.wait_s, self.compute_s = self.wait_s + self.win_wait, self.compute_s + self.win_compute
        self.win_wait = self.win_compute = 0.0
        self.win_steps = 0


@dataclass
class _Run:
    """What stays fixed while a run trains: its parts and where it checkpoints."""

    cfg: PretrainConfig
    ctx: DistContext
    store: Store
    method: Method
    model: nn.Module  # the method's model on the device (what the checkpoint holds)
    optimizer: torch.optim.Optimizer
    monitor: CollapseMonitor
    identity: dict[str, Any]
    log_metrics: MetricsCallback | None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.ctx.is_main and self.log_metrics is not None:
            self.log_metrics(metrics, step)

    def resume(self) -> _Progress | None:
        """Restore the latest checkpoint of this run (None when there is none)."""
        state = load_checkpoint(self.store, self.identity)
        if state is None:
            return None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_extra_state(state["extra"])
        self.monitor.load_state_dict(state["collapse"])
        rank = self.ctx.rank
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        step = int(state["step"])
        return _Progress(step=step, losses=list(state["losses"]), start_step=step)

    def save(self, progress: _Progress, epoch: int) -> None:
        # Every rank's RNG state is gathered so each resumes its own stream (dropout differs per rank).
        states = self.ctx.all_gather_object(rng_state())
        if self.ctx.is_main:
            save_checkpoint(
                self.store,
                {
                    "identity": self.identity, "step": progress.step, "epoch": epoch,
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "extra": self.method.extra_state(), "collapse": self.monitor.state_dict(),
                    "losses": progress.losses, "rng": states, "config": self.cfg.model_dump(mode="json"),
                },
                keep_history=self.cfg.checkpoint.keep_history,
            )  # fmt: skip
        self.ctx.barrier()

    def outcome(self, progress: _Progress, *, total: int, stopped: bool) -> TrainOutcome:
        elapsed = progress.wait_s + progress.compute_s
        samples = (progress.step - progress.start_step) * self.cfg.loader.batch_size * self.ctx.world
        last = dict(self.monitor.history[-1]) if self.monitor.history else {}
        last.pop("step", None)
        return TrainOutcome(
            step=progress.step, total_steps=total, losses=progress.losses,
            slices_per_s=samples / elapsed if elapsed > 0 else 0.0, data_wait_s=progress.wait_s,
            compute_s=progress.compute_s, collapse=last, stopped_early=stopped,
            collapse_history=list(self.monitor.history),
        )  # fmt: skip


def train(
    method: Method,
    cfg: PretrainConfig,
    index: PretrainIndex,
    store: Store,
    ctx: DistContext,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    log_metrics: MetricsCallback | None = None,
) -> TrainOutcome:
    """Train `method` to the configured number of steps (or until `stop_after` steps: a simulated kill).

    `log_metrics(metrics, step)` receives the step metrics every `logging.every_steps` and the collapse
    checks' metrics, on rank 0 only."""
    model, ddp_model = prepare_model(method.model, ctx)
    method.model = model
    optimizer = build_optimizer(cfg.optimizer, model)
    batch = cfg.loader.batch_size
    steps_per_epoch = EpochBatchSampler.batches_per_epoch(len(method.dataset), batch, ctx.world)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(method.dataset)} items are fewer than one global batch of {batch * ctx.world}"
        )
    sched = build_schedules(cfg.optimizer, cfg.schedule, steps_per_epoch, batch * ctx.world)
    total = sched.total
    lc = cfg.logging
    monitor = CollapseMonitor(
        lc.collapse_min_rank, lc.collapse_max_sigreg, lc.collapse_patience, lc.collapse_action
    )
    run = _Run(cfg, ctx, store, method, model, optimizer, monitor, run_identity(cfg, ctx), log_metrics)
    progress = run.resume() if resume else None
    if progress is not None:
        logger.info("resumed from step %d (epoch %d)", progress.step, progress.step // steps_per_epoch)
    else:
        progress = _Progress(step=0, losses=[], start_step=0)
        method.start()
    held = held_images(index, lc.collapse_batch, cfg.encoder.img_size, cfg.seed).to(ctx.device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if ctx.device.type == "cuda" and cfg.precision == "bf16"
        else contextlib.nullcontext()
    )
    grad_clip = cfg.optimizer.grad_clip
    model.train()
    logger.info(
        "pretraining %s/%s: %d steps (%d per epoch), global batch %d, warm-up %d, %d rank(s) on %s",
        cfg.method, cfg.encoder.name, total, steps_per_epoch, batch * ctx.world, sched.warmup, ctx.world,
        ctx.device,
    )  # fmt: skip
    while progress.step < total:
        epoch, in_epoch = divmod(progress.step, steps_per_epoch)
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
            step = progress.step
            rng, gen = step_generators(cfg.seed, ctx.rank, step)
            lr = sched.apply(optimizer, step)
            method.before_step(step, total)
            with autocast:
                out = method.forward(ddp_model, data, step, rng, gen)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = None
            if grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
            optimizer.step()
            method.after_step(out, data, step)
            loss = float(out["loss"].detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {step}")
            progress.losses.append(loss)
            signal = method.collapse_signal(out)
            if signal is not None and math.isfinite(signal):
                progress.collapse_window.append(signal)
            progress.step = step = step + 1
            t2 = time.perf_counter()
            progress.win_wait += t1 - t0
            progress.win_compute += t2 - t1
            progress.win_steps += 1
            if step % lc.every_steps == 0 or step == total:
                _log_step(run, progress, out, loss=loss, lr=lr, grad_norm=grad_norm, total=total)
            if step % lc.collapse_every == 0 or step == total:
                _check_collapse(run, progress, held)
            if step % cfg.checkpoint.every_steps == 0 or step == total:
                run.save(progress, epoch)
            if step >= total or (stop_after is not None and step >= stop_after):
                break
            t0 = time.perf_counter()
        if stop_after is not None and progress.step >= stop_after and progress.step < total:
            # A simulated kill: the open logging window's timing is not counted.
            return run.outcome(progress, total=total, stopped=True)
    progress.close_window()
    return run.outcome(progress, total=total, stopped=False)


def _log_step(
    run: _Run,
    progress: _Progress,
    out: dict[str, torch.Tensor],
    *,
    loss: float,
    lr: float,
    grad_norm: float | None,
    total: int,
) -> None:
    """The logging window's metrics (loss, lr, throughput, memory, the method's loss terms) -> log, callback."""
    elapsed = progress.win_wait + progress.win_compute
    n = progress.win_steps
    global_batch = run.cfg.loader.batch_size * run.ctx.world
    metrics = {
        "loss": loss, "lr": lr, "slices_per_s": n * global_batch / max(elapsed, 1e-9),
        "data_wait_s": progress.win_wait / n, "compute_s": progress.win_compute / n,
        "memory_mb": _memory_mb(run.ctx.device),
    }  # fmt: skip
    metrics.update(run.method.loss_terms(out))
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    logger.info("step %d/%d %s", progress.step, total, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    run.log(metrics, progress.step)
    progress.close_window()


def _check_collapse(run: _Run, progress: _Progress, held: torch.Tensor) -> None:
    """Effective ranks of the held slices, plus the mean and peak of the method's collapse signal since the
    last check (when it has one) -> the collapse monitor (which may raise), callback."""
    window = progress.collapse_window
    ratio = float(np.mean(window)) if window else None
    peak = {"sigreg_collapse_max": max(window)} if window else None
    method = run.method
    collapse = run.monitor.check(method.encoder, held, progress.step, method.projector, ratio, peak)
    window.clear()
    run.log(collapse, progress.step)
