"""Projection / prediction MLPs (MoCo-v3, LeJEPA) and the auxiliary organ / abnormality heads (DALE-CT)."""

from __future__ import annotations

import torch
from torch import nn

# Official moco-v3 defaults (main_moco.py: --moco-dim 256, --moco-mlp-dim 4096).
MOCO_DIM = 256
MOCO_MLP_DIM = 4096


class MLPHead(nn.Sequential):
    """MoCo-v3 `_build_mlp`: (Linear - BN - ReLU) x (n_layers - 1), then Linear [- BN without affine].

    Linear layers followed by BatchNorm have no bias (BN's shift makes it redundant); the last Linear
    has a bias only when no BN follows it.
    """

    def __init__(self, in_dim: int, hidden: int, out: int, n_layers: int, last_bn: bool = True) -> None:
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = []
        for i in range(n_layers):
            d_in = in_dim if i == 0 else hidden
            last = i == n_layers - 1
            d_out = out if last else hidden
            if not last:
                layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
            elif last_bn:
                # moco-v3 ends the projector/predictor with a non-affine BN (following SimCLR).
                layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out, affine=False)]
            else:
                layers.append(nn.Linear(d_in, d_out))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out


def moco_projector(
    in_dim: int, hidden: int = MOCO_MLP_DIM, out: int = MOCO_DIM, n_layers: int = 3, last_bn: bool = True
) -> MLPHead:
    """Projector of moco-v3 (ViT recipe: 3 layers; the ResNet recipe uses 2)."""
    return MLPHead(in_dim, hidden, out, n_layers, last_bn)


def moco_predictor(
    dim: int = MOCO_DIM, hidden: int = MOCO_MLP_DIM, n_layers: int = 2, last_bn: bool = True
) -> MLPHead:
    """Predictor of moco-v3 (ViT recipe keeps the last BN; the ResNet recipe uses last_bn=False)."""
    return MLPHead(dim, hidden, dim, n_layers, last_bn)


class AuxHeads(nn.Module):
    """Independent linear heads to organ (TotalSegmentator) and abnormality (ReXGroundingCT) classes.

    The same layer is applied to the CLS embedding and, for 2S, to every patch token (DALE-CT III-C2).
    `n_abnormal=0` gives the single-source (1S, organs only) head.
    """

    def __init__(self, embed_dim: int, n_organs: int, n_abnormal: int = 0) -> None:
        super().__init__()
        if n_organs < 1:
            raise ValueError(f"n_organs must be >= 1, got {n_organs}")
        self.organ = nn.Linear(embed_dim, n_organs)
        self.abnormal = nn.Linear(embed_dim, n_abnormal) if n_abnormal > 0 else None
        self.n_organs, self.n_abnormal = n_organs, n_abnormal

    def forward(self, cls: torch.Tensor, patch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """cls [B, D], patch [B, N, D] or None -> logits dict (organ_cls, abn_cls, organ_patch, abn_patch)."""
        out = {"organ_cls": self.organ(cls)}
        if self.abnormal is not None:
            out["abn_cls"] = self.abnormal(cls)
        if patch is not None:
            out["organ_patch"] = self.organ(patch)
            if self.abnormal is not None:
                out["abn_patch"] = self.abnormal(patch)
        return out
