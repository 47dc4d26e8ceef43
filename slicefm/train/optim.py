"""Optimizers and their schedules: LARS, weight-decay parameter groups, AdamW / LARS set-up, and the
warm-up + cosine learning-rate and weight-decay schedules of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slicefm.ssl.schedules import WarmupCosine
from slicefm.train.config import OptimizerConfig, ScheduleConfig


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


@dataclass(frozen=True)
class Schedules:
    """A run's length and its per-step learning rate and weight decay (pure functions of the global step)."""

    total: int  # optimizer steps
    warmup: int  # linear warm-up steps of the learning rate
    lr: WarmupCosine
    weight_decay: WarmupCosine

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr and weight decay (times its `*_mult`) for `step`; returns the lr."""
        lr = self.lr.apply_to(optimizer, step)
        self.weight_decay.apply_to(optimizer, step, key="weight_decay")
        return lr


def build_schedules(
    optimizer: OptimizerConfig, schedule: ScheduleConfig, steps_per_epoch: int, global_batch: int
) -> Schedules:
    """Total and warm-up steps (`max_steps` / `warmup_steps` or epochs), the scaled lr's warm-up + cosine to
    `min_lr`, and the weight decay's cosine to `weight_decay_end` (constant when that is None)."""
    total = schedule.max_steps or schedule.epochs * steps_per_epoch
    warmup_steps = schedule.warmup_steps
    warmup = min(
        total, warmup_steps if warmup_steps is not None else round(schedule.warmup_epochs * steps_per_epoch)
    )
    lr = WarmupCosine(
        base=scaled_lr(optimizer, global_batch), final=optimizer.min_lr, warmup=warmup, total=total
    )
    wd_end = optimizer.weight_decay if optimizer.weight_decay_end is None else optimizer.weight_decay_end
    wd = WarmupCosine(
        base=optimizer.weight_decay, final=wd_end, warmup=0, total=total, start=optimizer.weight_decay
    )
    return Schedules(total, warmup, lr, wd)
