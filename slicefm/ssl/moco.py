"""MoCo-v3 meta-architecture (CLEAR's MoCo and LECL pretraining): encoders, heads, momentum update, loss.

Query branch: encoder -> projector -> predictor. Key branch: momentum encoder -> momentum projector,
an exponential moving average of the query branch that never receives gradients. The training loop
calls `momentum_update(m)` (m from `schedules.cosine_momentum`) once per step, before `forward`, as
the official code does. With DDP, convert BatchNorm to SyncBatchNorm in the loop (official recipe).

LECL (paper): for slices with a key-slice annotation, the *key* encoder sees a lesion-centred crop
while the query encoder sees the full slice. The caller builds those views and passes them as
`key_x1` / `key_x2` (for slices without a lesion, the same views as `x1` / `x2`); the lambda * xi term
uses `lesion_keys` from a `LesionKeyBank` refreshed with `encode_keys`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from slicefm.models.encoders import Encoder
from slicefm.models.heads import MOCO_DIM, MOCO_MLP_DIM, moco_predictor, moco_projector
from slicefm.ssl.infonce import InfoNCELoss

logger = logging.getLogger(__name__)


class MoCoV3(nn.Module):
    """MoCo-v3 with the optional LECL lesion term.

    `encoder_factory()` must return a fresh `Encoder` (called twice: query and momentum encoders).
    Defaults follow the official ViT recipe (3-layer projector, 2-layer predictor, 4096 / 256, T = 0.2);
    CLEAR's code uses T = 1.0 and m = 0.99.
    """

    def __init__(
        self,
        encoder_factory: Callable[[], Encoder],
        proj_dim: int = MOCO_DIM,
        mlp_dim: int = MOCO_MLP_DIM,
        proj_layers: int = 3,
        pred_layers: int = 2,
        pred_last_bn: bool = True,
        temperature: float = 0.2,
        lesion_lambda: float = 0.0,
        lesion_term: Literal["paper", "code"] = "paper",
        momentum: float = 0.99,
        scale_by_2t: bool = True,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        self.base_encoder = encoder_factory()
        self.momentum_encoder = encoder_factory()
        dim = self.base_encoder.embed_dim
        self.base_projector = moco_projector(dim, mlp_dim, proj_dim, proj_layers)
        self.momentum_projector = moco_projector(dim, mlp_dim, proj_dim, proj_layers)
        self.predictor = moco_predictor(proj_dim, mlp_dim, pred_layers, pred_last_bn)
        self.criterion = InfoNCELoss(temperature, lesion_lambda, scale_by_2t, lesion_term)
        self.momentum = momentum
        if freeze_patch_embed:
            # moco-v3's "stop-grad conv1" trick for patchify ViTs (stabilises training).
            patch_embed = getattr(self.base_encoder.trunk, "patch_embed", None)
            if patch_embed is None:
                raise ValueError("freeze_patch_embed needs a trunk with a patch_embed")
            patch_embed.requires_grad_(False)
        for q_mod, k_mod in self._pairs():
            k_mod.load_state_dict(q_mod.state_dict())
            k_mod.requires_grad_(False)

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.base_encoder, self.momentum_encoder), (self.base_projector, self.momentum_projector)]

    @torch.no_grad()
    def momentum_update(self, m: float | None = None) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q over encoder and projector parameters (moco-v3 Eq.)."""
        m = self.momentum if m is None else float(m)
        for q_mod, k_mod in self._pairs():
            for p_q, p_k in zip(q_mod.parameters(), k_mod.parameters(), strict=True):
                p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Query branch: predictor(projector(encoder(x)))."""
        return self.predictor(self.base_projector(self.base_encoder(x)))

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key branch without gradients, e.g. to refresh the LECL lesion key bank."""
        return self.momentum_projector(self.momentum_encoder(x))

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        lesion_keys: torch.Tensor | None = None,
        key_x1: torch.Tensor | None = None,
        key_x2: torch.Tensor | None = None,
        lesion_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Two views -> dict(loss, q1, q2, k1, k2); loss = L(q1, k2) + L(q2, k1).

        key_x1 / key_x2 replace x1 / x2 for the key encoder (LECL lesion-centred crops); lesion_mask [B]
        selects in-batch lesion keys for CLEAR's code variant of the lesion term.
        """
        q1, q2 = self.query(x1), self.query(x2)
        k1 = self.encode_keys(x1 if key_x1 is None else key_x1)
        k2 = self.encode_keys(x2 if key_x2 is None else key_x2)
        loss = self.criterion.symmetric(q1, q2, k1, k2, lesion_keys, lesion_mask)
        return {"loss": loss, "q1": q1, "q2": q2, "k1": k1, "k2": k2}
