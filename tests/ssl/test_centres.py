"""Batched crop-centre sampling (LeJEPA / DALE-CT views) against its definition."""

from __future__ import annotations

import numpy as np
import torch

from slicefm.ssl.views import ABNORMAL, BODY, ORGAN, body_masks, sample_centres


def _masks(n: int, h: int = 12, w: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slice 0: all three masks; 1: organ + body; 2: body only; 3: nothing; the rest like slice 0."""
    abnormal = torch.zeros(n, h, w, dtype=torch.bool)
    organ = torch.zeros_like(abnormal)
    body = torch.zeros_like(abnormal)
    body[:, 2:10, 1:9] = True
    organ[:, 4:7, 3:8] = True
    abnormal[:, 5, 6] = abnormal[:, 8, 2] = abnormal[:, 9, 8] = True  # three pixels, one outside the organ
    abnormal[1:4], organ[2:4], body[3] = False, False, False
    return abnormal, organ, body


def _inside(mask: torch.Tensor, centres: np.ndarray) -> np.ndarray:
    x, y = (centres - 0.5).astype(int).T
    assert np.allclose(centres - 0.5, np.stack([x, y], 1))  # pixel centres
    return mask[torch.arange(len(x)), torch.from_numpy(y), torch.from_numpy(x)].numpy()


def test_centres_land_in_the_mask_of_their_kind_with_the_right_probabilities() -> None:
    n = 4000
    abnormal, organ, body = _masks(n)
    p = np.full(n, 0.8)
    centres, kinds = sample_centres(np.random.default_rng(0), abnormal, organ, body, p)
    assert centres.shape == (n, 2) and centres.dtype == np.float32 and kinds.shape == (n,)
    assert kinds[1] == ORGAN and kinds[2] == BODY and kinds[3] == BODY
    assert tuple(centres[3]) == (5.0, 6.0)  # no mask at all: the image centre (w / 2, h / 2)
    for kind, mask in ((ABNORMAL, abnormal), (ORGAN, organ), (BODY, body)):
        sel = kinds == kind
        sel[3] = False
        assert _inside(mask[sel], centres[sel]).all(), kind
    rest = kinds[4:]
    frac = float(np.mean(rest == ABNORMAL))
    assert abs(frac - 0.8) < 4 * (0.8 * 0.2 / len(rest)) ** 0.5, frac  # binomial, 4 sd
    assert set(np.unique(rest)) == {ABNORMAL, ORGAN}  # an organ exists: never the body
    never = sample_centres(np.random.default_rng(1), abnormal, organ, body, np.zeros(n))[1]
    assert not (never == ABNORMAL).any()


def test_centre_pixels_are_uniform_over_the_chosen_mask() -> None:
    n = 6000
    abnormal, organ, body = _masks(n)
    centres, kinds = sample_centres(np.random.default_rng(2), abnormal, organ, body, np.ones(n))
    picks = centres[4:][kinds[4:] == ABNORMAL]
    assert len(picks) == n - 4  # p = 1 with an abnormality: always on it
    _, counts = np.unique(picks, axis=0, return_counts=True)
    assert len(counts) == 3  # every abnormal pixel is reachable, nothing else is
    expected = len(picks) / 3
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, counts  # chi-square, 2 dof, p = 0.001
    organ_picks = sample_centres(np.random.default_rng(3), abnormal, organ, body, np.zeros(n))[0][4:]
    _, organ_counts = np.unique(organ_picks, axis=0, return_counts=True)
    assert len(organ_counts) == int(organ[0].sum())  # all 15 organ pixels, roughly equally often
    e = len(organ_picks) / len(organ_counts)
    assert float(((organ_counts - e) ** 2 / e).sum()) < 36.1  # 14 dof, p = 0.001


def test_body_masks_threshold_each_slice_at_a_tenth_of_its_range() -> None:
    images = torch.zeros(3, 2, 4, 4)
    images[0, :, 1:3, 1:3] = 1.0
    images[1] = 0.05  # constant: all body
    images[2, 0, 0, 0] = 10.0  # channel mean 5 at one pixel, 0 elsewhere
    images[2, 1, 0, 1] = 1.2  # channel mean 0.6 > 0.5: body too
    m = body_masks(images)
    assert m[0].sum() == 4 and m[0, 1:3, 1:3].all()
    assert m[1].all()
    assert m[2].sum() == 2 and m[2, 0, 0] and m[2, 0, 1]


def _per_crop_reference(rng, abnormal, organ, body, p):
    """The sampler one crop at a time, as the definition reads: an abnormal pixel with probability p when there
    is one (the coin is tossed only then), else organ, else body; the pixel uniform over torch.nonzero's list."""
    out = []
    for a, o, b, pi in zip(abnormal, organ, body, p, strict=True):
        masks = ([(a, ABNORMAL)] if a.any() and rng.random() < pi else []) + [(o, ORGAN), (b, BODY)]
        for mask, kind in masks:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(ys):
                j = int(rng.integers(len(ys)))
                out.append((float(xs[j]) + 0.5, float(ys[j]) + 0.5, kind))
                break
        else:
            out.append((b.shape[1] / 2, b.shape[0] / 2, BODY))
    return out


def test_batched_centres_draw_what_the_per_crop_definition_draws_with_the_same_seed():
    g = torch.Generator().manual_seed(0)
    n, h, w = 120, 24, 24
    abnormal = torch.rand(n, h, w, generator=g) < 0.01
    abnormal[::3] = False
    organ = torch.rand(n, h, w, generator=g) < 0.2
    organ[::7] = False
    body = torch.rand(n, h, w, generator=g) < 0.6
    for m in (abnormal, organ, body):
        m[::11] = False  # nothing at all: the image centre
    p = np.random.default_rng(1).random(n)
    ref_rng, rng = np.random.default_rng(5), np.random.default_rng(5)
    expected = _per_crop_reference(ref_rng, abnormal, organ, body, p)
    centres, kinds = sample_centres(rng, abnormal, organ, body, p)
    np.testing.assert_array_equal(centres, np.array([(x, y) for x, y, _ in expected], np.float32))
    np.testing.assert_array_equal(kinds, [k for *_, k in expected])
    assert ref_rng.random() == rng.random()  # the same number of draws: later views stay the same too
