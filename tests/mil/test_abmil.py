import numpy as np
import torch

from slicefm.mil.abmil import ABMIL
from slicefm.mil.bags import collate_bags, pack_bags


def _model(d: int = 8, c: int = 3) -> ABMIL:
    torch.manual_seed(0)
    return ABMIL(d, c).eval()


def _bags(lengths: tuple[int, ...], d: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(n, d)).astype(np.float32) for n in lengths]


def test_layers_match_clear() -> None:
    m = ABMIL(768, 8)
    assert (m.embed[0].in_features, m.embed[0].out_features) == (768, 256)
    assert (m.attn_v.in_features, m.attn_v.out_features, m.attn_w.out_features) == (256, 256, 1)
    assert isinstance(m.norm, torch.nn.LayerNorm)
    kinds = [type(layer).__name__ for layer in m.mlp]
    assert kinds == ["Linear", "Dropout", "SiLU", "Linear"] and m.mlp[1].p == 0.5
    assert m.mlp[3].out_features == 8


def test_attention_sums_to_one_over_real_slices() -> None:
    x, mask = collate_bags(_bags((2, 7, 4)))
    _, a = _model()(x, mask)
    assert torch.allclose(a.sum(dim=1), torch.ones(3), atol=1e-6)
    assert torch.all(a[~mask] == 0)
    assert torch.all(a[mask] > 0)


def test_padding_does_not_change_output() -> None:
    model = _model()
    bags = _bags((3, 5))
    x, mask = collate_bags(bags)
    logits, a = model(x, mask)
    # Same bags with 20 extra padded (garbage-filled) positions.
    xp = torch.cat([x, torch.randn(2, 20, 8) * 100], dim=1)
    mp = torch.cat([mask, torch.zeros(2, 20, dtype=torch.bool)], dim=1)
    logits_p, ap = model(xp, mp)
    assert torch.allclose(logits, logits_p, atol=1e-5)
    assert torch.allclose(a, ap[:, : x.shape[1]], atol=1e-6)


def test_batched_equals_per_bag() -> None:
    model = _model()
    bags = _bags((1, 4, 9, 2))
    logits, a = model(*collate_bags(bags))
    for i, bag in enumerate(bags):
        single, a1 = model(torch.from_numpy(bag)[None])
        assert torch.allclose(logits[i], single[0], atol=1e-5)
        assert torch.allclose(a[i, : bag.shape[0]], a1[0], atol=1e-6)


def test_attention_formula() -> None:
    model = _model()
    bag = torch.from_numpy(_bags((6,))[0])
    logits, a = model(bag[None])
    h = torch.relu(model.embed[0](bag))
    expected = torch.softmax(model.attn_w(torch.tanh(model.attn_v(h))).squeeze(-1), dim=0)
    assert torch.allclose(a[0], expected, atol=1e-6)
    z = (expected[:, None] * h).sum(0)
    assert torch.allclose(logits[0], model.mlp(model.norm(z)), atol=1e-5)


def test_packed_forward_equals_the_padded_forward():

    torch.manual_seed(0)
    model = ABMIL(8, 3).eval()
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 8)).astype(np.float32) for n in (5, 1, 9)]
    with torch.no_grad():
        lp, ap = model.forward_packed(*pack_bags(bags))
        ld, ad = model(*collate_bags(bags))
    torch.testing.assert_close(lp, ld, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ap, ad, rtol=1e-5, atol=1e-6)
