"""ViT with a convolutional stem (MoCo-v3 "ViT-ConvB") and tiny test variants, registered with timm.

Importing this module registers `vit_conv_base`, `vit_conv_tiny_test`, `vit_tiny_test` and
`mambaout_tiny_test` in timm's registry, so `timm.create_model(name, pretrained=False)` builds them.
None of them has pretrained weights: weights are loaded separately from slicefm checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from timm.layers import PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.mambaout import MambaOut
from timm.models.vision_transformer import VisionTransformer
from torch import nn

logger = logging.getLogger(__name__)

# slicefm-registered names built by timm's VisionTransformer (they accept dynamic_img_size).
VIT_NAMES = ("vit_conv_base", "vit_conv_tiny_test", "vit_tiny_test")
# Four stride-2 convolutions: the stem's output grid equals that of a 16 px patchify layer.
CONV_STEM_STRIDE = 16


def _untrained_cfg(**kwargs: Any) -> dict[str, Any]:
    # No weights to download; inputs arrive windowed and scaled by slicefm.preprocess, hence mean 0 / std 1.
    return {
        "url": "", "num_classes": 0, "input_size": (1, 224, 224), "pool_size": None,
        "mean": (0.0,), "std": (1.0,), "first_conv": "patch_embed.proj.0", "classifier": "head",
        "license": "apache-2.0", **kwargs,
    }  # fmt: skip


default_cfgs = generate_default_cfgs(
    {
        "vit_conv_base": _untrained_cfg(),
        "vit_conv_tiny_test": _untrained_cfg(input_size=(1, 64, 64)),
        "vit_tiny_test": _untrained_cfg(input_size=(1, 64, 64), first_conv="patch_embed.proj"),
        "mambaout_tiny_test": _untrained_cfg(
            input_size=(1, 64, 64), first_conv="stem.conv1", classifier="head.fc"
        ),
    }
)


class ConvStemEmbed(PatchEmbed):
    """MoCo-v3 conv stem: 4 x (conv3x3 stride 2 + BN + ReLU), then conv1x1 to `embed_dim`.

    Subclasses timm's PatchEmbed so VisionTransformer's grid bookkeeping (dynamic image size,
    position-embedding resampling, `set_input_size`) works unchanged; only `proj` differs.
    Channels grow embed_dim/8 -> /4 -> /2 -> embed_dim as in the official moco-v3 `ConvStem`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int = CONV_STEM_STRIDE,
        in_chans: int = 3,
        embed_dim: int = 768,
        **kwargs: Any,
    ) -> None:
        if patch_size != CONV_STEM_STRIDE:
            raise ValueError(
                f"the conv stem has a fixed stride of {CONV_STEM_STRIDE}, got patch_size={patch_size}"
            )
        if embed_dim % 8 != 0:
            raise ValueError(f"embed_dim must be divisible by 8 for the conv stem, got {embed_dim}")
        kwargs.pop("bias", None)  # the final 1x1 conv always has a bias (no norm follows it)
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs
        )
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _ in range(4):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False, **dd),
                nn.BatchNorm2d(c_out, **dd),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1, **dd))
        self.proj = nn.Sequential(*layers)

    def set_input_size(self, img_size: Any = None, patch_size: Any = None) -> None:
        if patch_size is not None and tuple(to_2tuple(patch_size)) != self.patch_size:
            raise ValueError("the conv stem's stride cannot be changed")
        super().set_input_size(img_size=img_size, patch_size=None)


def sincos_2d_pos_embed(grid_hw: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding of moco-v3 (`build_2d_sincos_position_embedding`).

    Returns [1, H*W, dim]: a quarter of the channels each for sin/cos of the x and y coordinates.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be divisible by 4 for a 2D sin-cos embedding, got {dim}")
    h, w = grid_hw
    grid_h, grid_w = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = grid_w.flatten()[:, None] * omega[None, :]
    out_h = grid_h.flatten()[:, None] * omega[None, :]
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return emb[None]


def use_fixed_sincos_pos_embed(model: VisionTransformer) -> None:
    """Replace the learned position embedding by moco-v3's fixed sin-cos one (prefix tokens get zeros)."""
    if model.pos_embed is None:
        return
    grid = tuple(model.patch_embed.grid_size)
    emb = sincos_2d_pos_embed(grid, model.embed_dim)
    n_prefix = model.pos_embed.shape[1] - emb.shape[1]
    emb = torch.cat([torch.zeros(1, n_prefix, model.embed_dim), emb], dim=1)
    with torch.no_grad():
        model.pos_embed.copy_(emb.to(model.pos_embed))
    # moco-v3 keeps the position embedding fixed (requires_grad=False).
    model.pos_embed.requires_grad_(False)


def _create_vit(variant: str, pretrained: bool, sincos_pos_embed: bool, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights; load a slicefm checkpoint instead")
    model = build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained=False,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )
    if sincos_pos_embed:
        use_fixed_sincos_pos_embed(model)
    return model


@register_model
def vit_conv_base(
    pretrained: bool = False, sincos_pos_embed: bool = True, **kwargs: Any
) -> VisionTransformer:
    """MoCo-v3 ViT-ConvB: conv stem + 11 blocks (one block fewer than ViT-B keeps its FLOPs), width 768."""
    model_args = dict(
        embed_layer=ConvStemEmbed, patch_size=CONV_STEM_STRIDE, embed_dim=768, depth=11, num_heads=12,
        weight_init="moco",
    )  # fmt: skip
    return _create_vit("vit_conv_base", pretrained, sincos_pos_embed, **dict(model_args, **kwargs))


@register_model
def vit_conv_tiny_test(
    pretrained: bool = False, sincos_pos_embed: bool = True, **kwargs: Any
) -> VisionTransformer:
    """Tiny ViT-Conv for CPU tests: conv stem, depth 2, width 64, 2 heads."""
    model_args = dict(
        img_size=64, embed_layer=ConvStemEmbed, patch_size=CONV_STEM_STRIDE, embed_dim=64, depth=2,
        num_heads=2, weight_init="moco",
    )  # fmt: skip
    return _create_vit("vit_conv_tiny_test", pretrained, sincos_pos_embed, **dict(model_args, **kwargs))


@register_model
def vit_tiny_test(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Tiny DINOv2-style ViT for CPU tests: patch 16, 4 registers, layer scale, depth 2, width 64."""
    model_args = dict(
        img_size=64,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        init_values=1e-5,
        reg_tokens=4,
        no_embed_class=True,
    )
    return _create_vit("vit_tiny_test", pretrained, False, **dict(model_args, **kwargs))


@register_model
def mambaout_tiny_test(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """Tiny MambaOut (gated CNN) for CPU tests: one block per stage, dims (16, 24, 32, 48)."""
    if pretrained:
        raise ValueError("mambaout_tiny_test has no pretrained weights")
    model_args = dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48))
    return build_model_with_cfg(
        MambaOut,
        "mambaout_tiny_test",
        pretrained=False,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **dict(model_args, **kwargs),
    )
