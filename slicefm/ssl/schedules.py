"""Per-iteration schedules (learning rate, weight decay, EMA momentum) as explicit, loggable objects.

Each schedule is a pure function of the global step, so a resumed run gets the same values without
saving schedule state; `apply_to` writes the value into an optimizer's parameter groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def cosine_momentum(step: int, total: int, m0: float) -> float:
    """moco-v3 EMA momentum m = 1 - 0.5 (1 + cos(pi step / total)) (1 - m0): m0 at 0, 1 at `total`."""
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    frac = min(max(step, 0), total) / total
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * frac)) * (1.0 - m0)


@dataclass(frozen=True)
class MomentumSchedule:
    """Callable form of `cosine_momentum` (m0 -> 1 over `total` steps)."""

    m0: float
    total: int

    def __call__(self, step: int) -> float:
        return cosine_momentum(step, self.total, self.m0)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from `start` to `base` over `warmup` steps, then cosine from `base` to `final` at `total`.

    value(0) = start, value(warmup) = base, value(step >= total) = final (dinov2 / moco-v3 style).
    """

    base: float
    final: float
    warmup: int
    total: int
    start: float = 0.0

    def __post_init__(self) -> None:
        if self.total <= 0 or not 0 <= self.warmup <= self.total:
            raise ValueError(
                f"need 0 <= warmup <= total and total > 0, got warmup={self.warmup}, total={self.total}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (self.base - self.start) * step / self.warmup
        if step >= self.total:
            return self.final
        span = self.total - self.warmup
        frac = (step - self.warmup) / span if span > 0 else 1.0
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * frac))

    def apply_to(self, optimizer: torch.optim.Optimizer, step: int, key: str = "lr") -> float:
        """Set `key` of every param group to value(step) x the group's optional `{key}_mult` (e.g. 0 for no wd)."""
        value = self(step)
        for group in optimizer.param_groups:
            group[key] = value * group.get(f"{key}_mult", 1.0)
        return value


def weight_decay_schedule(base: float, final: float, total: int) -> WarmupCosine:
    """Cosine weight-decay schedule from `base` to `final` without warm-up (dinov2 style)."""
    return WarmupCosine(base=base, final=final, warmup=0, total=total, start=base)
