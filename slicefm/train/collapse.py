"""Representation-collapse detection on a held batch: per-dimension std and effective rank.

std: mean over dimensions of the std of L2-normalised embeddings (VICReg / SimSiam's collapse
indicator; about 1/sqrt(D) for spread-out embeddings, 0 for a constant encoder). Effective rank:
exp of the entropy of the normalised singular values of the centred embeddings (RankMe, Roy &
Vetterli 2007); 0 when all embeddings coincide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class CollapseError(RuntimeError):
    """Embeddings collapsed for `patience` consecutive checks."""


@torch.no_grad()
def collapse_metrics(emb: torch.Tensor) -> dict[str, float]:
    """emb [N, D] -> {"emb_std": mean per-dim std of normalised rows, "eff_rank": effective rank}."""
    z = F.normalize(emb.float(), dim=1)
    std = float(z.std(dim=0).mean())
    centred = z - z.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(centred.double())
    # Rows are unit vectors (||z||_F = sqrt(N)): spread below float32 noise of that scale is no spread.
    if float(s.sum()) <= 1e-4 * z.shape[0] ** 0.5:
        return {"emb_std": std, "eff_rank": 0.0}
    p = s / s.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return {"emb_std": std, "eff_rank": float(torch.exp(entropy))}


@dataclass
class CollapseMonitor:
    """Counts consecutive collapsed checks; raises CollapseError (or warns) after `patience` of them."""

    min_std: float
    min_rank: float
    patience: int
    action: Literal["error", "warn"] = "error"
    consecutive: int = 0

    @torch.no_grad()
    def check(self, encoder: nn.Module, held: torch.Tensor, step: int) -> dict[str, float]:
        was_training = encoder.training
        encoder.eval()
        try:
            metrics = collapse_metrics(encoder(held))
        finally:
            encoder.train(was_training)
        collapsed = metrics["emb_std"] < self.min_std or metrics["eff_rank"] < self.min_rank
        self.consecutive = self.consecutive + 1 if collapsed else 0
        if collapsed:
            logger.warning(
                "step %d: embeddings look collapsed (std %.2e, effective rank %.2f), %d/%d checks",
                step, metrics["emb_std"], metrics["eff_rank"], self.consecutive, self.patience,
            )  # fmt: skip
        if self.consecutive >= self.patience:
            msg = (
                f"representation collapse at step {step}: embedding std {metrics['emb_std']:.2e} "
                f"(min {self.min_std}), effective rank {metrics['eff_rank']:.2f} (min {self.min_rank}) "
                f"for {self.consecutive} consecutive checks"
            )
            if self.action == "error":
                raise CollapseError(msg)
            logger.warning(msg)
        return metrics

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
