"""Encoder factory, registered timm names, conv stem and heads."""

from __future__ import annotations

import pytest
import timm
import torch

from slicefm.models.encoders import Encoder, create_encoder, is_vit_name
from slicefm.models.heads import AuxHeads, MLPHead, moco_predictor, moco_projector
from slicefm.models.vit_conv_stem import ConvStemEmbed, sincos_2d_pos_embed

TINY = ["vit_conv_tiny_test", "vit_tiny_test", "mambaout_tiny_test"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("in_chans", [1, 2])
@pytest.mark.parametrize("img_size", [64, 96])
def test_tiny_encoders_build_and_run(name: str, in_chans: int, img_size: int) -> None:
    enc = create_encoder(name, img_size=img_size, in_chans=in_chans)
    x = torch.randn(2, in_chans, img_size, img_size)
    pooled = enc(x)
    cls, patches = enc.forward_tokens(x)
    assert pooled.shape == (2, enc.embed_dim)
    torch.testing.assert_close(cls, pooled)
    assert torch.isfinite(pooled).all()
    # ViTs: one token per 16 px patch; MambaOut: stride-32 feature map.
    stride = 32 if name.startswith("mambaout") else 16
    assert patches is not None and patches.shape == (2, (img_size // stride) ** 2, enc.embed_dim)
    # Different samples give different embeddings (the trunk is not constant).
    assert not torch.allclose(pooled[0], pooled[1])


def test_vit_encoder_accepts_other_sizes_and_skips_registers() -> None:
    enc = create_encoder("vit_tiny_test", img_size=64, in_chans=1)
    assert enc.is_vit and enc.num_prefix_tokens == 5  # CLS + 4 registers
    feats = enc.trunk.forward_features(torch.randn(3, 1, 96, 96))
    assert feats.shape == (3, 5 + 36, 64)
    cls, patches = enc.forward_tokens(torch.randn(3, 1, 96, 96))
    assert cls.shape == (3, 64) and patches.shape == (3, 36, 64)
    # A local crop size different from img_size works thanks to dynamic_img_size.
    assert enc(torch.randn(2, 1, 48, 48)).shape == (2, 64)


def test_forward_tokens_cls_is_first_token() -> None:
    enc = create_encoder("vit_conv_tiny_test", img_size=64, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    feats = enc.trunk.forward_features(x)
    cls, patches = enc.forward_tokens(x)
    assert enc.num_prefix_tokens == 1  # CLS only, no registers
    torch.testing.assert_close(cls, feats[:, 0])
    torch.testing.assert_close(patches, feats[:, 1:])


def test_registered_names_build_through_timm() -> None:
    model = timm.create_model("vit_conv_tiny_test", pretrained=False)
    assert isinstance(model.patch_embed, ConvStemEmbed)
    assert model.num_classes == 0 and model.in_chans == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 64)
    assert {"vit_conv_base", "vit_conv_tiny_test", "vit_tiny_test", "mambaout_tiny_test"} <= set(
        timm.list_models("*_test") + timm.list_models("vit_conv_*")
    )
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("vit_conv_tiny_test", pretrained=True)
    with pytest.raises(ValueError, match="never downloads"):
        create_encoder("vit_tiny_test", 64, 1, pretrained=True)


def test_conv_stem_structure() -> None:
    stem = ConvStemEmbed(img_size=64, in_chans=2, embed_dim=64)
    convs = [m for m in stem.proj if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in stem.proj if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 4 + [(1, 1)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 64]
    assert len(bns) == 4
    out = stem(torch.randn(2, 2, 64, 64))
    assert out.shape == (2, 16, 64)  # 64 / 16 = 4 -> 4 x 4 tokens, like a 16 px patchify layer
    with pytest.raises(ValueError):
        ConvStemEmbed(img_size=64, patch_size=14, embed_dim=64)


def test_sincos_pos_embed_fixed_and_matches_formula() -> None:
    emb = sincos_2d_pos_embed((2, 3), 8)
    assert emb.shape == (1, 6, 8)
    # token 4 is row h=1, column w=1; pos_dim = 2, omega = [1, 1/100]
    expected = torch.tensor([1.0, 0.01]).sin().tolist() + torch.tensor([1.0, 0.01]).cos().tolist()
    torch.testing.assert_close(emb[0, 4], torch.tensor(expected * 2))
    model = timm.create_model("vit_conv_tiny_test")
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0, 0], torch.zeros(64))  # CLS gets no position
    torch.testing.assert_close(model.pos_embed[:, 1:], sincos_2d_pos_embed((4, 4), 64))


def test_mambaout_embedding_is_normed_pooled_features() -> None:
    enc = create_encoder("mambaout_tiny_test", img_size=64, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    feats = enc.trunk.forward_features(x)  # NHWC
    expected = enc.trunk.head.norm(feats.mean(dim=(1, 2)))
    torch.testing.assert_close(enc(x), expected)
    assert enc.embed_dim == 48
    kept = create_encoder("mambaout_tiny_test", img_size=64, in_chans=1, keep_head_mlp=True)
    assert kept.embed_dim == 4 * 48


def test_is_vit_name() -> None:
    assert is_vit_name("vit_base_patch16_224") and is_vit_name("vit_large_patch14_reg4_dinov2")
    assert is_vit_name("vit_conv_base") and is_vit_name("vit_tiny_test")
    assert not is_vit_name("mambaout_tiny") and not is_vit_name("mambaout_tiny_test")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mambaout_femto", "mambaout_tiny", "vit_base_patch16_224"])
def test_timm_names_build(name: str) -> None:
    enc = create_encoder(name, img_size=64, in_chans=2)
    assert isinstance(enc, Encoder)
    assert enc(torch.randn(2, 2, 64, 64)).shape == (2, enc.embed_dim)


@pytest.mark.slow
def test_dinov2_vit_large_with_registers() -> None:
    enc = create_encoder("vit_large_patch14_reg4_dinov2", img_size=56, in_chans=1)
    assert enc.embed_dim == 1024 and enc.num_prefix_tokens == 5
    cls, patches = enc.forward_tokens(torch.randn(1, 1, 56, 56))
    assert cls.shape == (1, 1024) and patches.shape == (1, 16, 1024)
    assert enc(torch.randn(1, 1, 42, 42)).shape == (1, 1024)  # a smaller local crop (3 x 3 patches)


def test_vit_conv_base_is_vit_b_scale() -> None:
    enc = create_encoder("vit_conv_base", img_size=224, in_chans=1)
    n_params = sum(p.numel() for p in enc.parameters())
    # ViT-B/16 has 86M parameters; one block fewer (-7.1M) plus the conv stem (~+3M) keeps ~82M.
    assert 75e6 < n_params < 90e6
    assert enc.embed_dim == 768 and len(enc.trunk.blocks) == 11 and enc.trunk.blocks[0].attn.num_heads == 12


def test_mlp_head_layout() -> None:
    proj = moco_projector(64, hidden=32, out=16)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert proj[-1].affine is False and all(m.bias is None for m in proj if isinstance(m, torch.nn.Linear))
    pred = moco_predictor(16, hidden=32)
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    plain = MLPHead(8, 16, 4, n_layers=2, last_bn=False)
    assert plain[-1].bias is not None
    assert proj(torch.randn(5, 64)).shape == (5, 16)


def test_aux_heads_shared_between_cls_and_patches() -> None:
    heads = AuxHeads(embed_dim=8, n_organs=5, n_abnormal=3)
    cls, patch = torch.randn(2, 8), torch.randn(2, 4, 8)
    out = heads(cls, patch)
    assert out["organ_cls"].shape == (2, 5) and out["abn_patch"].shape == (2, 4, 3)
    torch.testing.assert_close(out["organ_patch"][:, 1], heads.organ(patch[:, 1]))
    assert set(AuxHeads(8, 5, 0)(cls)) == {"organ_cls"}


def test_null_overrides_are_refused_and_zero_turns_layer_scale_off() -> None:
    """timm drops None kwargs: `init_values: null` would silently keep vit_tiny_test's layer scale."""
    with pytest.raises(ValueError, match=r"\['init_values'\] are null"):
        create_encoder("vit_tiny_test", 64, 1, init_values=None)
    default = create_encoder("vit_tiny_test", 64, 1)
    plain = create_encoder("vit_tiny_test", 64, 1, init_values=0)
    assert any("gamma" in n for n, _ in default.trunk.named_parameters())
    assert not any("gamma" in n for n, _ in plain.trunk.named_parameters())
