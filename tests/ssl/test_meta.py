"""MoCo-v3 and LeJEPA meta-architectures: momentum update, gradient isolation, a few real optimizer steps."""

from __future__ import annotations

import pytest
import torch

from slicefm.models.encoders import create_encoder
from slicefm.models.heads import AuxHeads
from slicefm.ssl.aux_loss import AuxSupervisionLoss, abnormality_pos_weight
from slicefm.ssl.infonce import LesionKeyBank
from slicefm.ssl.lejepa import LeJEPA
from slicefm.ssl.moco import MoCoV3
from slicefm.ssl.sigreg import SIGReg


def _tiny_moco(**kwargs) -> MoCoV3:
    return MoCoV3(
        lambda: create_encoder("vit_conv_tiny_test", img_size=64, in_chans=1),
        proj_dim=16,
        mlp_dim=32,
        **kwargs,
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_momentum_encoder_starts_equal_and_gets_no_grads() -> None:
    model = _tiny_moco()
    for p_q, p_k in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters(), strict=True):
        torch.testing.assert_close(p_q, p_k)
        assert not p_k.requires_grad
    x1, x2 = torch.randn(4, 1, 64, 64), torch.randn(4, 1, 64, 64)
    out = model(x1, x2)
    out["loss"].backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert all(p.grad is None for p in model.momentum_projector.parameters())
    assert not out["k1"].requires_grad and out["q1"].requires_grad
    assert model.base_encoder.trunk.blocks[0].attn.qkv.weight.grad is not None


def test_momentum_update_formula() -> None:
    model = _tiny_moco()
    with torch.no_grad():
        for p in list(model.base_encoder.parameters()) + list(model.base_projector.parameters()):
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.momentum_encoder.parameters()]
    q = [p.clone() for p in model.base_encoder.parameters()]
    model.momentum_update(0.9)
    for p_k, k0, q0 in zip(model.momentum_encoder.parameters(), before_k, q, strict=True):
        torch.testing.assert_close(p_k, 0.9 * k0 + 0.1 * q0)
    proj_q = list(model.base_projector.parameters())[0]
    proj_k = list(model.momentum_projector.parameters())[0]
    assert not torch.allclose(proj_q, proj_k)
    model.momentum_update(0.0)  # m = 0 copies the query branch
    torch.testing.assert_close(proj_k, proj_q)


def test_moco_key_views_and_lesion_bank() -> None:
    model = _tiny_moco(lesion_lambda=1.0).eval()
    x1, x2 = torch.randn(4, 1, 64, 64), torch.randn(4, 1, 64, 64)
    lesion_crop = torch.randn(4, 1, 64, 64)
    plain = model(x1, x2)
    lecl = model(x1, x2, key_x2=lesion_crop)
    torch.testing.assert_close(lecl["k2"], model.encode_keys(lesion_crop))
    torch.testing.assert_close(lecl["q1"], plain["q1"])
    bank = LesionKeyBank(size=10, dim=16)
    bank.update(model.encode_keys(lesion_crop), torch.tensor([0, 3, 5, 9]))
    with_bank = model(x1, x2, lesion_keys=bank.keys())
    # lambda * xi only adds to the denominator: the loss can only grow.
    assert with_bank["loss"].item() > plain["loss"].item()


def test_freeze_patch_embed() -> None:
    model = MoCoV3(
        lambda: create_encoder("vit_tiny_test", 64, 1), proj_dim=8, mlp_dim=16, freeze_patch_embed=True
    )
    assert not any(p.requires_grad for p in model.base_encoder.trunk.patch_embed.parameters())
    assert model.base_encoder.trunk.blocks[0].attn.qkv.weight.requires_grad


def test_tiny_moco_loss_decreases_on_fixed_batch() -> None:
    model = _tiny_moco(temperature=0.2)
    x1, x2 = torch.randn(8, 1, 64, 64), torch.randn(8, 1, 64, 64)
    x2 = x1 + 0.3 * x2  # two "views" of the same slices
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(12):
        model.momentum_update(0.9)
        loss = model(x1, x2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def _tiny_lejepa(aux: bool) -> LeJEPA:
    enc = create_encoder("vit_tiny_test", img_size=64, in_chans=1)
    kwargs = {}
    if aux:
        kwargs = {
            "aux": AuxHeads(enc.embed_dim, n_organs=5, n_abnormal=2),
            "aux_loss": AuxSupervisionLoss(torch.full((5,), 3.0), abnormality_pos_weight(2, 5.0), mode="2S"),
            "alpha": 0.1,
        }
    return LeJEPA(enc, proj_dim=16, proj_hidden=64, lam=0.05, sigreg=SIGReg(num_directions=32), **kwargs)


def test_lejepa_forward_mixed_sizes_and_terms() -> None:
    model = _tiny_lejepa(aux=True)
    g, loc = torch.randn(2, 4, 1, 64, 64), torch.randn(3, 4, 1, 32, 32)
    targets = {
        "organ_cls": torch.rand(2, 4, 5),
        "abn_cls": torch.randint(0, 2, (2, 4, 2)).float(),
        "organ_patch": torch.rand(2, 4, 16, 5),
        "abn_patch": torch.randint(0, 2, (2, 4, 16, 2)).float(),
    }
    out = model(g, loc, step=3, aux_targets=targets)
    expected = 0.95 * out["inv"] + 0.05 * out["sigreg"] + 0.1 * out["aux"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert out["global_emb"].shape == (2, 4, 64) and out["aux"].item() > 0
    with pytest.raises(ValueError, match="aux_targets"):
        model(g, loc, step=3)


def test_tiny_lejepa_loss_decreases_on_fixed_batch() -> None:
    model = _tiny_lejepa(aux=True)
    g = torch.randn(1, 8, 1, 64, 64)
    g = torch.cat([g, g + 0.3 * torch.randn_like(g)])  # two global views of the same slices
    loc = g[:, :, :, 16:48, 16:48] + 0.1 * torch.randn(2, 8, 1, 32, 32)
    targets = {
        "organ_cls": torch.rand(2, 8, 5),
        "abn_cls": torch.randint(0, 2, (2, 8, 2)).float(),
        "organ_patch": torch.rand(2, 8, 16, 5),
        "abn_patch": torch.randint(0, 2, (2, 8, 16, 2)).float(),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def terms_at_step0() -> dict[str, float]:
        with torch.no_grad():
            out = model(g, loc, step=0, aux_targets=targets)
        return {key: out[key].item() for key in ("loss", "inv", "sigreg", "aux")}

    before = terms_at_step0()
    for step in range(10):
        loss = model(g, loc, step=step, aux_targets=targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = terms_at_step0()
    assert after["loss"] < 0.8 * before["loss"]
    # Each term improves, SIGReg included: no collapse while the views are pulled together.
    assert (
        after["inv"] < before["inv"] and after["sigreg"] < before["sigreg"] and after["aux"] < before["aux"]
    )


def test_lejepa_takes_a_built_sigreg_and_checks_its_own_arguments() -> None:
    enc = create_encoder("vit_tiny_test", img_size=32, in_chans=1)
    sigreg = SIGReg(num_directions=8, num_knots=5, seed=3)
    assert LeJEPA(enc, proj_dim=8, proj_hidden=16, sigreg=sigreg).sigreg is sigreg
    assert LeJEPA(enc, proj_dim=8, proj_hidden=16).sigreg.num_directions == SIGReg().num_directions
    with pytest.raises(ValueError, match="lam must be in"):
        LeJEPA(enc, proj_dim=8, proj_hidden=16, lam=1.5)
    with pytest.raises(ValueError, match="reference_batch"):
        LeJEPA(enc, proj_dim=8, proj_hidden=16, reference_batch=0)
