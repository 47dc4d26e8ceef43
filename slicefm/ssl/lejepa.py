"""LeJEPA meta-architecture (DALE-CT): one encoder + projector, invariance + SIGReg (+ auxiliary heads).

No teacher, no stop-gradient. Global crops (e.g. 2 x 256 px) and local crops (e.g. 8 x 144 px) have
different sizes, so the encoder runs once per size group (ViTs are built with dynamic_img_size=True).
The projector sees all views together; invariance pulls every view to the mean of the global views,
SIGReg is computed per view and averaged (LeJEPA). The auxiliary heads (DALE-CT 1S / 2S) read the
backbone's CLS embedding and, for 2S, its patch tokens of the global views.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from slicefm.models.encoders import Encoder
from slicefm.models.heads import AuxHeads, MLPHead
from slicefm.ssl.aux_loss import AuxSupervisionLoss
from slicefm.ssl.invariance import InvarianceLoss, lejepa_loss
from slicefm.ssl.sigreg import SIGReg, _dist_world

logger = logging.getLogger(__name__)


class LeJEPA(nn.Module):
    """L = (1 - lam) * L_inv + lam * L_SIGReg + alpha * L_aux.

    Defaults: lam 0.02 and alpha 0.1 (DALE-CT code); projector Linear-BN-ReLU x 2 -> Linear as the
    LeJEPA minimal example. `sigreg` is the regulariser (None = `SIGReg()` with its defaults); `aux` and
    `aux_loss` go together (both or neither).

    `reference_batch` (None = the papers' formula): SIGReg's statistic is N x a per-sample term, so lam's
    real strength grows with the global batch N. With a reference batch R, L_SIGReg = EP * R / N: lam then
    weighs the regulariser exactly as it would at global batch R (e.g. lam 0.02 at R = 512, DALE-CT's 8 x 64),
    whatever the batch this run can afford.
    """

    def __init__(
        self,
        encoder: Encoder,
        proj_dim: int = 128,
        lam: float = 0.02,
        sigreg: SIGReg | None = None,
        aux: AuxHeads | None = None,
        alpha: float = 0.1,
        aux_loss: AuxSupervisionLoss | None = None,
        proj_hidden: int = 2048,
        proj_layers: int = 3,
        reference_batch: int | None = None,
    ) -> None:
        super().__init__()
        if (aux is None) != (aux_loss is None):
            raise ValueError("aux heads and aux_loss must be given together")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if reference_batch is not None and reference_batch < 1:
            raise ValueError(f"reference_batch must be >= 1, got {reference_batch}")
        self.encoder = encoder
        self.projector = MLPHead(encoder.embed_dim, proj_hidden, proj_dim, proj_layers, last_bn=False)
        self.invariance = InvarianceLoss()
        self.sigreg = sigreg if sigreg is not None else SIGReg()
        self.aux, self.aux_loss = aux, aux_loss
        self.lam, self.alpha = float(lam), float(alpha)
        self.reference_batch = reference_batch

    def _needs_patches(self) -> bool:
        return self.aux_loss is not None and self.aux_loss.mode == "2S"

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None,
        step: int,
        aux_targets: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """global_views [G, B, C, H, W], local_views [L, B, C, h, w] or None, global step ->
        dict(loss, inv, sigreg (the raw EP statistic at this global batch), sigreg_collapse (where EP lies between
        Gaussian projections, 0, and a collapse to a point, 1: the same scale at every N), aux, global_emb [G, B, D]).

        aux_targets (when aux heads are set): organ_cls [G, B, C_o], abn_cls [G, B, C_a] and for 2S
        organ_patch [G, B, N, C_o], abn_patch [G, B, N, C_a], aligned with the global views.
        """
        n_global, batch = global_views.shape[:2]
        g_in = global_views.flatten(0, 1)
        if self._needs_patches():
            g_emb, g_patch = self.encoder.forward_tokens(g_in)
        else:
            g_emb, g_patch = self.encoder(g_in), None
        embs = [g_emb]
        if local_views is not None and local_views.shape[0] > 0:
            if local_views.shape[1] != batch:
                raise ValueError("global and local views must share the batch dimension")
            embs.append(self.encoder(local_views.flatten(0, 1)))
        proj = self.projector(torch.cat(embs, dim=0)).view(-1, batch, self.projector.out_dim)
        inv = self.invariance(proj, n_global)
        sig = self.sigreg(proj, step)
        n = batch * _dist_world()
        scale = 1.0 if self.reference_batch is None else self.reference_batch / n
        loss = lejepa_loss(inv, sig * scale, self.lam)
        aux_value = torch.zeros((), device=loss.device)
        if self.aux is not None and self.aux_loss is not None:
            if aux_targets is None:
                raise ValueError("aux heads are set: aux_targets are required")
            logits = self.aux(g_emb, g_patch)
            targets = {key: value.flatten(0, 1) for key, value in aux_targets.items()}
            aux_value = self.aux_loss(logits, targets)
            loss = loss + self.alpha * aux_value
        return {
            "loss": loss,
            "inv": inv.detach(),
            "sigreg": sig.detach(),
            "sigreg_collapse": self.sigreg.collapse_fraction(sig.detach(), n),
            "aux": aux_value.detach(),
            "global_emb": g_emb.detach().view(n_global, batch, -1),
        }
