"""Encoder factory over timm's registry: pooled slice embedding plus CLS / patch tokens.

`create_encoder("vit_conv_base" | "mambaout_tiny" | "vit_large_patch14_reg4_dinov2" | ..., img_size, in_chans)`
returns an `Encoder` whose `trunk` is the plain timm model (`num_classes=0`, never pretrained), so
`encoder.trunk.state_dict()` is what a checkpoint stores and `create_encoder(name, ...)` rebuilds it.
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.models import get_arch_name, is_model_in_modules
from timm.models.mambaout import MambaOut
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from slicefm.models import vit_conv_stem  # noqa: F401  (registers slicefm's timm names)

logger = logging.getLogger(__name__)

# timm modules whose models are VisionTransformer and accept `dynamic_img_size`.
VIT_MODULES = ("vision_transformer",)


def is_vit_name(name: str) -> bool:
    """True when `name` is built by timm's VisionTransformer (timm or slicefm registration)."""
    return is_model_in_modules(name, VIT_MODULES) or get_arch_name(name) in vit_conv_stem.VIT_NAMES


class Encoder(nn.Module):
    """A timm trunk with a uniform interface: `forward` -> pooled embedding, `forward_tokens` -> (cls, patches)."""

    def __init__(self, trunk: nn.Module, name: str, img_size: int, in_chans: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.name, self.img_size, self.in_chans = name, img_size, in_chans
        self.is_vit = isinstance(trunk, VisionTransformer)
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 0)) if self.is_vit else 0
        self.embed_dim = int(getattr(trunk, "head_hidden_size", trunk.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> pooled embedding [B, embed_dim] (CLS token for ViTs)."""
        return self.trunk(x)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, C, H, W] -> (pooled [B, D], patch tokens [B, N, D] or None when the trunk has no spatial map)."""
        feats = self.trunk.forward_features(x)
        pooled = self.trunk.forward_head(feats, pre_logits=True)
        if feats.ndim == 3:
            # ViT sequence: [CLS, registers..., patches]; registers are neither CLS nor spatial.
            return pooled, feats[:, self.num_prefix_tokens :]
        if feats.ndim != 4:
            return pooled, None
        if getattr(self.trunk, "output_fmt", "NCHW") == "NHWC":
            patches = feats.flatten(1, 2)
        else:
            patches = feats.flatten(2).transpose(1, 2)
        head_norm = getattr(getattr(self.trunk, "head", None), "norm", None)
        if isinstance(self.trunk, MambaOut) and head_norm is not None:
            # MambaOut normalises only after pooling; apply the same LayerNorm to every spatial token
            # so patch tokens live on the scale the pooled embedding (and shared aux heads) see.
            patches = head_norm(patches)
        if patches.shape[-1] != pooled.shape[-1]:
            logger.debug(
                "patch tokens (%d) and pooled embedding (%d) differ", patches.shape[-1], pooled.shape[-1]
            )
        return pooled, patches


def _drop_mambaout_head_mlp(model: MambaOut) -> None:
    # timm's MambaOut head adds an ImageNet MLP (fc -> GELU -> LN, 4x wider) before the classifier.
    # The original MambaOut repo (which CLEAR extracts from with head=Identity) takes the embedding
    # right after pool + LayerNorm, so the slice embedding is the last stage's width (576 for tiny).
    model.head.pre_logits = nn.Identity()
    model.head.num_features = model.head.in_features
    model.head_hidden_size = model.num_features


def create_encoder(
    name: str, img_size: int, in_chans: int, *, keep_head_mlp: bool = False, **overrides: Any
) -> Encoder:
    """Build `name` from timm's registry as a feature extractor (num_classes=0, pretrained=False).

    ViTs get `dynamic_img_size=True` so global and local crops of different sizes (multiples of the
    patch size) share one model. `overrides` go to `timm.create_model` (e.g. drop_path_rate, depth).
    `keep_head_mlp` keeps timm's MambaOut pre-logits MLP (see `_drop_mambaout_head_mlp`).
    """
    if overrides.pop("pretrained", False):
        raise ValueError("slicefm never downloads weights: load a checkpoint into encoder.trunk instead")
    unset = sorted(k for k, v in overrides.items() if v is None)
    if unset:
        # timm.create_model drops None kwargs, so `init_values: null` would silently keep the default.
        raise ValueError(
            f"encoder overrides {unset} are null: timm ignores null overrides and keeps {name}'s defaults; "
            "give a value (e.g. init_values: 0 turns layer scale off)"
        )
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_chans}
    if is_vit_name(name):
        kwargs.update(img_size=img_size, dynamic_img_size=True)
    kwargs.update(overrides)
    try:
        trunk = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        # Convolutional trunks (MambaOut, ResNet...) are size-agnostic and reject `img_size`.
        if "img_size" not in str(err) or "img_size" not in kwargs:
            raise
        kwargs.pop("img_size")
        trunk = timm.create_model(name, pretrained=False, **kwargs)
    if isinstance(trunk, MambaOut) and not keep_head_mlp:
        _drop_mambaout_head_mlp(trunk)
    encoder = Encoder(trunk, name=name, img_size=img_size, in_chans=in_chans)
    n_params = sum(p.numel() for p in trunk.parameters())
    logger.info("built encoder %s: embed_dim=%d, %.1fM parameters", name, encoder.embed_dim, n_params / 1e6)
    return encoder
