"""reorient_to_canonical: the same physical volume stored with any axis order / flips / frame comes back identical."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from slicefm.io.orientation import check_spacing_mm, reorient_to_canonical

SPACING_ZYX = (2.5, 0.7, 0.9)


@pytest.fixture()
def canonical() -> np.ndarray:
    # Distinct axis lengths so a wrong permutation cannot go unnoticed.
    return np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)


def stored_copy(
    canonical: np.ndarray, perm: tuple[int, int, int], signs: tuple[int, int, int], frame: str
) -> tuple[np.ndarray, np.ndarray]:
    """Store `canonical` with voxel axis m along LPS world axis perm[m], direction signs[m]."""
    data_lps = canonical.transpose(2, 1, 0)  # axes (x:+L, y:+P, z:+S)
    spacing_xyz = SPACING_ZYX[::-1]
    data = np.transpose(data_lps, perm)
    affine = np.eye(4)
    origin_lps = np.array([-120.0, 35.0, 410.0])  # world position of data_lps[0, 0, 0]
    for m, (w, s) in enumerate(zip(perm, signs, strict=True)):
        if s < 0:
            data = np.flip(data, axis=m)
        affine[:3, m] = 0.0
        affine[w, m] = s * spacing_xyz[w]
        if s < 0:  # voxel 0 on this axis is the far end of the LPS axis
            affine[w, 3] = origin_lps[w] + (data_lps.shape[w] - 1) * spacing_xyz[w]
        else:
            affine[w, 3] = origin_lps[w]
    if frame == "RAS":
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return np.ascontiguousarray(data), affine


@pytest.mark.parametrize("frame", ["LPS", "RAS"])
def test_every_axis_order_and_flip_gives_the_same_canonical_array(canonical: np.ndarray, frame: str) -> None:
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            data, affine = stored_copy(canonical, perm, signs, frame)
            out, spacing = reorient_to_canonical(data, affine, frame)  # type: ignore[arg-type]
            np.testing.assert_array_equal(out, canonical, err_msg=f"perm={perm} signs={signs}")
            assert spacing == pytest.approx(SPACING_ZYX)
            assert out.flags.c_contiguous


def test_identity_ras_affine_flips_x_and_y(canonical: np.ndarray) -> None:
    # With an identity RAS affine, i runs to patient Right and j to Anterior: canonical runs the other way.
    data_ijk = canonical[:, ::-1, ::-1].transpose(2, 1, 0)
    out, spacing = reorient_to_canonical(np.ascontiguousarray(data_ijk), np.eye(4), "RAS")
    np.testing.assert_array_equal(out, canonical)
    assert spacing == (1.0, 1.0, 1.0)


def test_identity_lps_affine_is_a_plain_transpose(canonical: np.ndarray) -> None:
    out, _ = reorient_to_canonical(np.ascontiguousarray(canonical.transpose(2, 1, 0)), np.eye(4), "LPS")
    np.testing.assert_array_equal(out, canonical)


def test_slightly_oblique_affine_maps_to_nearest_axes(canonical: np.ndarray) -> None:
    data, affine = stored_copy(canonical, (0, 1, 2), (1, 1, 1), "LPS")
    angle = np.deg2rad(5.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = rot @ affine[:3, :3]
    out, spacing = reorient_to_canonical(data, affine, "LPS")
    np.testing.assert_array_equal(out, canonical)
    assert spacing == pytest.approx(SPACING_ZYX)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="3-D"):
        reorient_to_canonical(np.zeros((2, 3)), np.eye(4), "LPS")
    with pytest.raises(ValueError, match="degenerate"):
        reorient_to_canonical(np.zeros((2, 3, 4)), np.diag([1.0, 0.0, 1.0, 1.0]), "LPS")
    with pytest.raises(ValueError, match="frame"):
        reorient_to_canonical(np.zeros((2, 3, 4)), np.eye(4), "XYZ")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        reorient_to_canonical(np.zeros((2, 3, 4)), np.full((4, 4), np.nan), "LPS")


def test_check_spacing_mm() -> None:
    assert check_spacing_mm([1, 0.5, 0.5]) == (1.0, 0.5, 0.5)
    for bad in [(1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("nan"), 1.0), (1.0, 1.0), ("a", 1, 1)]:
        with pytest.raises(ValueError, match="spacing"):
            check_spacing_mm(bad)  # type: ignore[arg-type]
