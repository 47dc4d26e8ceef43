"""DALE-CT auxiliary supervision: BCE with logits on organ fractions and abnormality labels.

Sources: TotalSegmentator organs (soft targets = fraction of the crop / patch covered by the organ)
and ReXGroundingCT abnormalities (binary). Levels: CLS (1S and 2S) and, for 2S, every patch token.
The loss is an equal blend of the terms present: 2S = 0.5 * mean(organ_cls, abn_cls)
+ 0.5 * mean(organ_patch, abn_patch); 1S (organs only, CLS only) reduces to the organ CLS term.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slicefm.ssl.infonce import at_least_fp32

logger = logging.getLogger(__name__)

# DALE-CT: every ReXGroundingCT class gets positive weight 800 (extremely sparse positives).
REX_POS_WEIGHT = 800.0
# DALE-CT: organ positive weights are inverse frequencies capped at 1000; background gets 1.
ORGAN_POS_WEIGHT_CAP = 1000.0


def organ_pos_weight_from_frequency(
    freq: torch.Tensor,
    cap: float = ORGAN_POS_WEIGHT_CAP,
    background_weight: float = 1.0,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class pos_weight = 1 / freq, capped at `cap`.

    `freq` [C] is each organ's positive frequency in [0, 1]. Classes marked in `background` [C] bool
    (background / out-of-distribution anatomy) and classes never seen (freq == 0) get `background_weight`.
    """
    freq = torch.as_tensor(freq, dtype=torch.float32)
    if (freq < 0).any() or (freq > 1).any():
        raise ValueError("frequencies must lie in [0, 1]")
    weight = torch.where(freq > 0, 1.0 / freq.clamp_min(1e-12), torch.full_like(freq, background_weight))
    weight = weight.clamp(max=cap)
    if background is not None:
        weight = torch.where(
            torch.as_tensor(background, dtype=torch.bool), torch.full_like(freq, background_weight), weight
        )
    return weight


def abnormality_pos_weight(n_abnormal: int, value: float = REX_POS_WEIGHT) -> torch.Tensor:
    """The uniform ReXGroundingCT pos_weight vector [n_abnormal]."""
    return torch.full((n_abnormal,), float(value))


class AuxSupervisionLoss(nn.Module):
    """BCE-with-logits auxiliary loss of DALE-CT (1S: CLS level; 2S: CLS and patch levels).

    forward(logits, targets) with dicts keyed organ_cls [B, C_o], abn_cls [B, C_a] and, for 2S,
    organ_patch [B, N, C_o], abn_patch [B, N, C_a] (the keys AuxHeads returns). Abnormality terms are
    used when `abn_pos_weight` is given and targets carry them.
    """

    def __init__(
        self,
        organ_pos_weight: torch.Tensor,
        abn_pos_weight: torch.Tensor | None = None,
        mode: Literal["1S", "2S"] = "2S",
        cls_patch_weights: tuple[float, float] = (0.5, 0.5),
    ) -> None:
        super().__init__()
        if mode not in ("1S", "2S"):
            raise ValueError(f"mode must be '1S' or '2S', got {mode!r}")
        self.mode = mode
        self.cls_patch_weights = (float(cls_patch_weights[0]), float(cls_patch_weights[1]))
        self.register_buffer("organ_pos_weight", torch.as_tensor(organ_pos_weight, dtype=torch.float32))
        if abn_pos_weight is not None:
            self.register_buffer("abn_pos_weight", torch.as_tensor(abn_pos_weight, dtype=torch.float32))
        else:
            self.abn_pos_weight = None

    def _bce(self, logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
        logits = at_least_fp32(logits)  # bf16 logits under autocast: BCE needs float32
        return F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype), pos_weight=pos_weight.to(logits.dtype)
        )

    def _level(
        self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], level: str
    ) -> torch.Tensor:
        terms = [self._bce(logits[f"organ_{level}"], targets[f"organ_{level}"], self.organ_pos_weight)]
        key = f"abn_{level}"
        if self.abn_pos_weight is not None and key in logits and key in targets:
            terms.append(self._bce(logits[key], targets[key], self.abn_pos_weight))
        return torch.stack(terms).mean()

    def forward(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        cls_term = self._level(logits, targets, "cls")
        if self.mode == "1S":
            return cls_term
        w_cls, w_patch = self.cls_patch_weights
        return w_cls * cls_term + w_patch * self._level(logits, targets, "patch")
