"""LeJEPA invariance term: every view's embedding is pulled to the mean of the global views."""

from __future__ import annotations

import torch
from torch import nn

from slicefm.ssl.infonce import at_least_fp32


class InvarianceLoss(nn.Module):
    """forward(views_emb [V, B, D], n_global) -> mean over views, batch and dims of (z_v - centre)^2.

    The centre is the mean of the first `n_global` views' embeddings (the global crops), as in
    LeJEPA's multi-crop objective; local views (indices >= n_global) are only pulled towards it.
    The centre is not detached: LeJEPA has no stop-gradient.
    """

    def forward(self, views_emb: torch.Tensor, n_global: int) -> torch.Tensor:
        if views_emb.ndim != 3:
            raise ValueError(f"views_emb must be [V, B, D], got shape {tuple(views_emb.shape)}")
        if not 1 <= n_global <= views_emb.shape[0]:
            raise ValueError(f"n_global must be in [1, {views_emb.shape[0]}], got {n_global}")
        views_emb = at_least_fp32(views_emb)  # bf16 projections: average the squares in float32
        centre = views_emb[:n_global].mean(dim=0)
        return (views_emb - centre).square().mean()


def lejepa_loss(inv: torch.Tensor, sigreg: torch.Tensor, lam: float) -> torch.Tensor:
    """L = (1 - lambda) * L_inv + lambda * L_SIGReg (DALE-CT Eq. 1, LeJEPA); lambda in [0, 1] (`LeJEPA` checks it
    once, when it is built: this runs every step)."""
    return (1.0 - lam) * inv + lam * sigreg
