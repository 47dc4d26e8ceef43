"""Representation-collapse detection: effective rank of the backbone and projector on held slices, and
(LeJEPA) SIGReg over its full-collapse value.

Effective rank: exp of the entropy of the normalised singular values of the centred, row-normalised
embeddings (RankMe, Roy & Vetterli 2007); 0 when all embeddings coincide, at most min(N - 1, D). Measure it
on many more slices than dimensions (default 256): a batch of 32 caps it at 31 whatever the encoder.
The per-dimension std of normalised embeddings (SimSiam's indicator) is not used: a layer-scale ViT's CLS
carries a large constant component, so its std is ~0.005 already at random init and flags nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class CollapseError(RuntimeError):
    """Embeddings collapsed for `patience` consecutive checks."""


@contextlib.contextmanager
def eval_mode(*modules: object) -> Iterator[None]:
    """The given nn.Modules in eval mode for the block, each restored to its own mode after (others ignored)."""
    nets = [m for m in modules if isinstance(m, nn.Module)]
    modes = [m.training for m in nets]
    for m in nets:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(nets, modes, strict=True):
            m.train(mode)


@torch.no_grad()
def effective_rank(emb: torch.Tensor) -> float:
    """emb [N, D] -> RankMe effective rank of the centred, L2-normalised rows (0 if they coincide)."""
    z = F.normalize(emb.double(), dim=1)
    s = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))
    # Rows are unit vectors (||z||_F = sqrt(N)): spread below float32 noise of that scale is no spread.
    if float(s.sum()) <= 1e-4 * z.shape[0] ** 0.5:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


@dataclass
class CollapseMonitor:
    """Counts consecutive collapsed checks; raises CollapseError (or warns) after `patience` of them.

    A check is collapsed when the backbone's effective rank is below `min_rank` or, when a SIGReg ratio is
    given (LeJEPA), that ratio exceeds `max_sigreg`.
    """

    min_rank: float
    max_sigreg: float
    patience: int
    action: Literal["error", "warn"] = "error"
    consecutive: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # every check: step + metrics

    @torch.no_grad()
    def check(
        self,
        encoder: nn.Module,
        held: torch.Tensor,
        step: int,
        projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sigreg_collapse: float | None = None,
        extra: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Metrics of `held` slices: eff_rank (backbone), proj_eff_rank (when a projector is given) and the
        caller's sigreg_collapse (and `extra`, recorded only); modules run in eval mode and are restored."""
        with eval_mode(encoder, projector):
            emb = encoder(held)
            metrics = {"eff_rank": effective_rank(emb)}
            if projector is not None:
                metrics["proj_eff_rank"] = effective_rank(projector(emb))
        if sigreg_collapse is not None:
            metrics["sigreg_collapse"] = float(sigreg_collapse)
        metrics.update(extra or {})
        self.history.append({"step": float(step), **metrics})
        collapsed = metrics["eff_rank"] < self.min_rank or (
            sigreg_collapse is not None and sigreg_collapse > self.max_sigreg
        )
        self.consecutive = self.consecutive + 1 if collapsed else 0
        summary = self._describe(metrics)
        if collapsed:
            logger.warning(
                "step %d: embeddings look collapsed (%s), %d/%d checks",
                step, summary, self.consecutive, self.patience,
            )  # fmt: skip
        if self.consecutive >= self.patience:
            msg = (
                f"representation collapse at step {step}: {summary} for {self.consecutive} consecutive checks"
            )
            if self.action == "error":
                raise CollapseError(msg)
            logger.warning(msg)
        return metrics

    def _describe(self, metrics: dict[str, float]) -> str:
        text = f"backbone effective rank {metrics['eff_rank']:.2f} (min {self.min_rank})"
        if "sigreg_collapse" in metrics:
            text += (
                f", SIGReg at {metrics['sigreg_collapse']:.2f} of its collapse value (max {self.max_sigreg})"
            )
        return text

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = int(state["consecutive"])
        self.history = [dict(h) for h in state.get("history", [])]
