"""InfoNCE / LECL, SIGReg, invariance, auxiliary loss and schedules against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slicefm.ssl.aux_loss import (
    REX_POS_WEIGHT,
    AuxSupervisionLoss,
    abnormality_pos_weight,
    organ_pos_weight_from_frequency,
)
from slicefm.ssl.infonce import InfoNCELoss, LesionKeyBank
from slicefm.ssl.invariance import InvarianceLoss, lejepa_loss
from slicefm.ssl.schedules import MomentumSchedule, WarmupCosine, cosine_momentum, weight_decay_schedule
from slicefm.ssl.sigreg import SIGReg


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


def _lecl_loop(q, k, lesion, lam: float, tau: float, variant: str = "paper") -> float:
    """Eq. (4) of CLEAR, one query at a time; variant "code" puts lambda inside the exponent."""
    losses = []
    for i in range(q.shape[0]):
        num = math.exp(_cos(q[i], k[i]) / tau)
        den = sum(math.exp(_cos(q[i], k[j]) / tau) for j in range(k.shape[0]))
        if lesion is not None and lam > 0:  # CLEAR's code skips its lesion term when lambda = 0
            if variant == "paper":
                den += lam * sum(math.exp(_cos(q[i], lj) / tau) for lj in lesion)
            else:
                den += sum(math.exp(lam * _cos(q[i], lj) / tau) for lj in lesion)
        losses.append(-math.log(num / den))
    return sum(losses) / len(losses)


@pytest.fixture
def qkl() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 8, generator=g, dtype=torch.float64)
    k = q + 0.5 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    lesion = torch.randn(4, 8, generator=g, dtype=torch.float64)
    return q, k, lesion


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_infonce_matches_paper_formula(qkl, lam: float) -> None:
    q, k, lesion = qkl
    loss = InfoNCELoss(temperature=0.2, lesion_lambda=lam, scale_by_2t=False)(q, k, lesion_keys=lesion)
    assert loss.item() == pytest.approx(_lecl_loop(q, k, lesion, lam, 0.2), rel=1e-9)


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_infonce_code_variant_matches_formula(qkl, lam: float) -> None:
    q, k, lesion = qkl
    crit = InfoNCELoss(temperature=0.5, lesion_lambda=lam, scale_by_2t=False, lesion_term="code")
    assert crit(q, k, lesion_keys=lesion).item() == pytest.approx(
        _lecl_loop(q, k, lesion, lam, 0.5, "code"), rel=1e-5
    )


def test_lesion_term_increases_loss_with_lambda(qkl) -> None:
    q, k, lesion = qkl
    values = [InfoNCELoss(0.2, lam, False)(q, k, lesion).item() for lam in (0.0, 1.0, 3.0, 5.0)]
    assert values == sorted(values) and values[0] < values[-1]


def test_lambda_zero_is_cross_entropy(qkl) -> None:
    q, k, lesion = qkl
    tau = 0.2
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
    expected = F.cross_entropy(logits, torch.arange(q.shape[0]))
    got = InfoNCELoss(tau, 0.0, scale_by_2t=False)(q, k, lesion_keys=lesion)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-6)


def test_symmetric_loss_and_2t_scaling(qkl) -> None:
    q1, k2, _ = qkl
    g = torch.Generator().manual_seed(1)
    q2, k1 = (
        torch.randn(6, 8, generator=g, dtype=torch.float64),
        torch.randn(6, 8, generator=g, dtype=torch.float64),
    )
    tau = 0.2
    plain = InfoNCELoss(tau, scale_by_2t=False)
    scaled = InfoNCELoss(tau, scale_by_2t=True)
    sym = scaled.symmetric(q1, q2, k1, k2)
    expected = 2 * tau * (_lecl_loop(q1, k2, None, 0.0, tau) + _lecl_loop(q2, k1, None, 0.0, tau))
    assert sym.item() == pytest.approx(expected, rel=1e-9)
    assert scaled(q1, k2).item() == pytest.approx(2 * tau * plain(q1, k2).item(), rel=1e-6)


def test_code_variant_in_batch_lesion_keys_excludes_positive(qkl) -> None:
    q, k, _ = qkl
    mask = torch.tensor([True, False, True, False, False, True])
    tau, lam = 0.5, 3.0
    got = InfoNCELoss(tau, lam, scale_by_2t=False, lesion_term="code")(q, k, lesion_mask=mask)
    losses = []
    for i in range(6):
        num = math.exp(_cos(q[i], k[i]) / tau)
        den = sum(math.exp(_cos(q[i], k[j]) / tau) for j in range(6))
        den += sum(math.exp(lam * _cos(q[i], k[j]) / tau) for j in range(6) if mask[j] and j != i)
        losses.append(-math.log(num / den))
    assert got.item() == pytest.approx(sum(losses) / 6, rel=1e-9)


def test_infonce_gradients_reach_queries(qkl) -> None:
    q, k, lesion = qkl
    q = q.clone().requires_grad_(True)
    InfoNCELoss(0.2, 1.0)(q, k, lesion).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_lesion_key_bank_replaces_by_index_and_fifo() -> None:
    bank = LesionKeyBank(size=5, dim=3)
    assert bank.keys().shape == (0, 3)
    bank.update(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]), torch.tensor([3, 1]))
    keys = bank.keys()
    torch.testing.assert_close(
        keys, torch.tensor([[0, 1.0, 0], [1.0, 0, 0]])
    )  # rows 1, 3 in order, normalised
    bank.update(torch.tensor([[0, 0, 5.0]]), torch.tensor([3]))  # newer encoding of key slice 3
    torch.testing.assert_close(bank.bank[3], torch.tensor([0, 0, 1.0]))
    assert int(bank.filled.sum()) == 2
    with pytest.raises(IndexError):
        bank.update(torch.ones(1, 3), torch.tensor([5]))
    fifo = LesionKeyBank(size=3, dim=2)
    for i in range(4):
        fifo.update(torch.tensor([[1.0, float(i)]]))
    assert int(fifo.filled.sum()) == 3
    torch.testing.assert_close(fifo.bank[0], F.normalize(torch.tensor([1.0, 3.0]), dim=0))


# ---------------------------------------------------------------- SIGReg


def _ep_numpy(x: np.ndarray, t_max: float = 3.0, knots: int = 17) -> np.ndarray:
    """Epps-Pulley with the complex ECF on the symmetric grid [-t_max, t_max] (trapezoid), per column."""
    t = np.linspace(-t_max, t_max, 2 * knots - 1)
    ecf = np.exp(1j * x[:, :, None] * t[None, None, :]).mean(axis=0)  # [M, T]
    phi = np.exp(-(t**2) / 2)
    integrand = np.abs(ecf - phi) ** 2 * phi
    dt = t[1] - t[0]
    trapezoid = dt * (integrand.sum(axis=1) - 0.5 * (integrand[:, 0] + integrand[:, -1]))
    return x.shape[0] * trapezoid


def test_sigreg_matches_numpy_formula() -> None:
    sig = SIGReg(num_directions=16)
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.3 + 0.2
    a = sig.directions(10, step=7).double()
    expected = _ep_numpy((z @ a).numpy()).mean()
    assert sig(z, step=7).item() == pytest.approx(expected, rel=1e-9)
    # float32 inputs (the training path) agree to float32 precision.
    assert sig(z.float(), step=7).item() == pytest.approx(expected, rel=1e-4)


def test_sigreg_small_for_gaussian_large_for_collapse_or_shift() -> None:
    g = torch.Generator().manual_seed(0)
    sig = SIGReg(num_directions=64)
    # For N(0, 1) samples E[EP] = sum_t w(t) (1 - phi(t)^2) ~= 1.06 whatever N (O(1)).
    gauss = [sig(torch.randn(2048, 32, generator=g), step=s).item() for s in range(4)]
    assert 0.7 < np.mean(gauss) < 1.5
    collapsed = sig(torch.zeros(2048, 32), step=0).item()
    shifted = sig(torch.randn(2048, 32, generator=g) + 2.0, step=0).item()
    scaled = sig(3.0 * torch.randn(2048, 32, generator=g), step=0).item()
    assert collapsed > 500 and shifted > 100 and scaled > 100


@pytest.mark.parametrize("n", [8, 16, 512])
def test_sigreg_collapse_and_gaussian_values_and_scale_free_fraction(n: int) -> None:
    sig = SIGReg(num_directions=64)
    t = np.linspace(0.0, 3.0, 17)
    w = np.full(17, 2 * 3.0 / 16) * np.exp(-0.5 * t**2)
    w[[0, -1]] /= 2
    phi = np.exp(-0.5 * t**2)
    # Closed forms on the module's own quadrature: collapse to 0 = n sum w (1 - phi)^2, Gaussian = sum w (1 - phi^2).
    assert sig.collapse_value(n) == pytest.approx(n * (w * (1 - phi) ** 2).sum(), rel=1e-12)
    assert sig.collapse_value(n) == pytest.approx(0.402 * n, rel=0.01)
    assert sig.gaussian_value() == pytest.approx((w * (1 - phi**2)).sum(), rel=1e-12)
    collapsed = sig(torch.zeros(n, 32, dtype=torch.float64), step=0)
    assert collapsed.item() == pytest.approx(sig.collapse_value(n), rel=1e-9)
    assert sig.collapse_fraction(collapsed, n) == pytest.approx(1.0, abs=1e-9)
    # Gaussian projections sit near 0 at every n (the raw ratio EP / collapse would be ~2.6 / n).
    g = torch.Generator().manual_seed(n)
    gauss = np.mean([sig.collapse_fraction(sig(torch.randn(n, 32, generator=g), s), n) for s in range(200)])
    assert abs(gauss) < 0.06, gauss


def test_sigreg_collapse_fraction_is_undefined_below_8_samples() -> None:
    assert math.isnan(SIGReg().collapse_fraction(1.0, 7))


def test_lejepa_reference_batch_rescales_sigreg_only() -> None:
    from slicefm.models.encoders import create_encoder
    from slicefm.ssl.lejepa import LeJEPA

    torch.manual_seed(0)
    x = torch.rand(2, 12, 2, 32, 32)
    losses = {}
    for ref in (None, 12, 48):
        torch.manual_seed(1)
        model = LeJEPA(create_encoder("vit_tiny_test", 32, 2), proj_dim=8, proj_hidden=16, lam=0.1, reference_batch=ref)
        out = model(x, None, step=3)
        losses[ref] = out
    plain = losses[None]
    assert losses[12]["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)  # R = N: the papers' loss
    # R = 4N: lam * SIGReg counts four times, the invariance term is unchanged.
    expected = 0.9 * plain["inv"] + 0.1 * 4 * plain["sigreg"]
    assert losses[48]["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses[48]["sigreg"].item() == pytest.approx(plain["sigreg"].item(), rel=1e-6)  # logged raw
    sig = SIGReg(num_directions=256)
    assert plain["sigreg_collapse"].item() == pytest.approx(sig.collapse_fraction(plain["sigreg"].item(), 12), rel=1e-6)


def test_sigreg_directions_depend_only_on_step() -> None:
    sig = SIGReg(num_directions=8)
    torch.testing.assert_close(sig.directions(5, 3), SIGReg(num_directions=8).directions(5, 3))
    assert not torch.allclose(sig.directions(5, 3), sig.directions(5, 4))
    torch.testing.assert_close(sig.directions(5, 3).norm(dim=0), torch.ones(8))
    # The value of a step is the statistic on that step's directions, whatever the global RNG state: a fresh
    # module after other draws gives it exactly (every rank agrees), another step projects elsewhere.
    z = torch.randn(32, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = sig(z, 3).item()
    assert value == pytest.approx(_ep_numpy((z @ sig.directions(5, 3).double()).numpy()).mean(), rel=1e-9)
    torch.manual_seed(123)
    torch.randn(1000)
    assert SIGReg(num_directions=8)(z, 3).item() == value
    assert sig(z, 4).item() != pytest.approx(value, rel=1e-6)


def test_sigreg_gradients_flow_and_reduce_loss() -> None:
    sig = SIGReg(num_directions=32)
    z = (0.1 * torch.randn(256, 8) + 1.0).requires_grad_(True)
    loss = sig(z, step=0)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = z - 0.05 * z.grad / z.grad.norm() * z.norm()
    assert sig(stepped, step=0).item() < loss.item()


def test_sigreg_per_view_mean() -> None:
    sig = SIGReg(num_directions=8)
    views = torch.randn(3, 40, 6)
    expected = torch.stack([sig(v, 5) for v in views]).mean()
    torch.testing.assert_close(sig(views, 5), expected)


# ---------------------------------------------------------------- invariance, aux


def test_invariance_direct_computation() -> None:
    emb = torch.randn(5, 4, 3)
    centre = (emb[0] + emb[1]) / 2
    expected = sum(((emb[v] - centre) ** 2).sum() for v in range(5)) / (5 * 4 * 3)
    torch.testing.assert_close(InvarianceLoss()(emb, n_global=2), expected)
    same = emb[:1].expand(4, -1, -1)
    assert InvarianceLoss()(same, n_global=2).item() == 0.0
    assert lejepa_loss(torch.tensor(2.0), torch.tensor(10.0), 0.05).item() == pytest.approx(
        0.95 * 2 + 0.05 * 10
    )


def _bce_manual(x: torch.Tensor, y: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    x, y = x.double(), y.double()
    p = torch.sigmoid(x)
    return -(pw.double() * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


def test_aux_loss_matches_manual_bce() -> None:
    g = torch.Generator().manual_seed(0)
    n_org, n_abn, b, n = 4, 3, 2, 5
    organ_pw = torch.tensor([1.0, 10.0, 1000.0, 2.0])
    abn_pw = abnormality_pos_weight(n_abn)
    logits = {
        "organ_cls": torch.randn(b, n_org, generator=g),
        "abn_cls": torch.randn(b, n_abn, generator=g),
        "organ_patch": torch.randn(b, n, n_org, generator=g),
        "abn_patch": torch.randn(b, n, n_abn, generator=g),
    }
    targets = {
        "organ_cls": torch.rand(b, n_org, generator=g),  # soft organ fractions
        "abn_cls": (torch.rand(b, n_abn, generator=g) > 0.5).float(),
        "organ_patch": torch.rand(b, n, n_org, generator=g),
        "abn_patch": (torch.rand(b, n, n_abn, generator=g) > 0.5).float(),
    }
    logits = {key: value.double() for key, value in logits.items()}
    terms = {
        key: _bce_manual(logits[key], targets[key], organ_pw if key.startswith("organ") else abn_pw)
        for key in logits
    }
    two = AuxSupervisionLoss(organ_pw, abn_pw, mode="2S")(logits, targets)
    expected = (
        0.5 * (terms["organ_cls"] + terms["abn_cls"]) / 2
        + 0.5 * (terms["organ_patch"] + terms["abn_patch"]) / 2
    )
    assert two.item() == pytest.approx(expected.item(), rel=1e-9)
    one = AuxSupervisionLoss(organ_pw, None, mode="1S")(logits, targets)
    assert one.item() == pytest.approx(terms["organ_cls"].item(), rel=1e-9)


def test_pos_weights() -> None:
    freq = torch.tensor([0.5, 0.01, 1e-5, 0.0, 0.9])
    w = organ_pos_weight_from_frequency(freq, background=torch.tensor([False, False, False, False, True]))
    torch.testing.assert_close(w, torch.tensor([2.0, 100.0, 1000.0, 1.0, 1.0]))
    assert abnormality_pos_weight(14).tolist() == [REX_POS_WEIGHT] * 14 and REX_POS_WEIGHT == 800.0


# ---------------------------------------------------------------- schedules


def test_cosine_momentum_endpoints() -> None:
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert MomentumSchedule(0.996, 10)(10) == pytest.approx(1.0)


def test_warmup_cosine_values() -> None:
    sched = WarmupCosine(base=1e-3, final=1e-5, warmup=10, total=110)
    assert sched(0) == 0.0
    assert sched(5) == pytest.approx(5e-4)
    assert sched(10) == pytest.approx(1e-3)
    assert sched(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert sched(110) == pytest.approx(1e-5) and sched(500) == pytest.approx(1e-5)
    values = [sched(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_schedules_apply_to_optimizer() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "weight_decay_mult": 0.0}], lr=1.0)
    wd = weight_decay_schedule(0.04, 0.4, total=100)
    assert wd(0) == pytest.approx(0.04) and wd(100) == pytest.approx(0.4)
    wd.apply_to(opt, 100, key="weight_decay")
    assert (
        opt.param_groups[0]["weight_decay"] == pytest.approx(0.4)
        and opt.param_groups[1]["weight_decay"] == 0.0
    )
    WarmupCosine(2.0, 0.0, 4, 8).apply_to(opt, 2)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1.0)] * 2


def test_losses_stay_float32_under_bf16_autocast(qkl) -> None:
    q, k, lesion = (t.float() for t in qkl)
    z = torch.randn(128, 8, generator=torch.Generator().manual_seed(2))
    crit, sig = InfoNCELoss(0.2, 1.0), SIGReg(num_directions=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        infonce_amp, sigreg_amp = crit(q, k, lesion), sig(z, 4)
        inv_amp = InvarianceLoss()(z.view(4, 32, 8), 2)
    assert infonce_amp.dtype == sigreg_amp.dtype == inv_amp.dtype == torch.float32
    torch.testing.assert_close(infonce_amp, crit(q, k, lesion))
    torch.testing.assert_close(sigreg_amp, sig(z, 4))
