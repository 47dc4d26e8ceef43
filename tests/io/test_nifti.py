"""NIfTI reader: real .nii / .nii.gz files written with nibabel in tmp_path."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from slicefm.io.nifti import read_nifti
from slicefm.io.volume import InvalidScanError

SPACING_ZYX = (2.0, 0.75, 0.6)
# axcode -> (LPS world axis, voxel index runs along +L/+P/+S, sign of the RAS affine column)
_CODES = {
    "L": (0, True, -1.0),
    "R": (0, False, 1.0),
    "P": (1, True, -1.0),
    "A": (1, False, 1.0),
    "S": (2, True, 1.0),
    "I": (2, False, -1.0),
}


def stored_as(hu: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """`hu` [z, y, x] canonical, stored with voxel axes pointing to `axcodes` (nibabel's convention)."""
    data_lps = hu.transpose(2, 1, 0)
    spacing_xyz = SPACING_ZYX[::-1]
    perm = [_CODES[c][0] for c in axcodes]
    data = np.transpose(data_lps, perm)
    affine = np.eye(4)
    affine[:3, 3] = (12.0, -30.0, 55.0)  # the origin does not matter for orientation
    for m, code in enumerate(axcodes):
        world, along_lps, ras_sign = _CODES[code]
        if not along_lps:
            data = np.flip(data, axis=m)
        affine[:3, m] = 0.0
        affine[world, m] = ras_sign * spacing_xyz[world]
    assert nib.aff2axcodes(affine) == tuple(axcodes)  # the helper builds what it claims
    return np.ascontiguousarray(data), affine


@pytest.fixture()
def hu() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(-1024, 2000, size=(5, 7, 9)).astype(np.float32)


@pytest.mark.parametrize("axcodes", ["LAS", "RAS", "LPS", "RPI", "ASL"])
def test_differently_stored_copies_read_back_identical(tmp_path: Path, hu: np.ndarray, axcodes: str) -> None:
    data, affine = stored_as(hu, axcodes)
    path = tmp_path / f"{axcodes}.nii"
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), path)
    vol = read_nifti(path)
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.hu.dtype == np.float32
    assert vol.spacing_mm == pytest.approx(SPACING_ZYX)
    assert vol.fmt == "nifti" and vol.source == str(path)


def test_scl_slope_applied_exactly_once(tmp_path: Path, hu: np.ndarray) -> None:
    raw = ((hu + 1024) // 2).astype(np.int16)  # HU = 2 * raw - 1024 (rounded down to even)
    img = nib.Nifti1Image(raw, np.diag([0.6, 0.75, 2.0, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol = read_nifti(tmp_path / "scaled.nii")
    expected = 2.0 * raw.astype(np.float32) - 1024.0
    np.testing.assert_array_equal(vol.hu, expected.transpose(2, 1, 0)[:, ::-1, ::-1])


def test_extra_rescale_for_raw_stored_values(tmp_path: Path, hu: np.ndarray) -> None:
    data, affine = stored_as(hu, "LPS")
    raw = ((data + 1024) // 2).astype(np.uint16)
    nib.save(nib.Nifti1Image(raw, affine), tmp_path / "raw.nii.gz")
    vol = read_nifti(tmp_path / "raw.nii.gz", rescale=(2.0, -1024.0))
    np.testing.assert_array_equal(vol.hu, 2.0 * ((hu + 1024) // 2) - 1024.0)


def test_header_scaling_plus_extra_rescale_warns(
    tmp_path: Path, hu: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    img = nib.Nifti1Image((hu + 1024).astype(np.int16), np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "both.nii")
    with caplog.at_level(logging.WARNING, logger="slicefm"):
        vol = read_nifti(tmp_path / "both.nii", rescale=(1.0, -1024.0))
    assert "extra rescale are both applied" in caplog.text
    assert vol.hu.min() == hu.min() - 1024.0  # both mappings applied, as asked, once each


def test_spacing_from_header_and_override(tmp_path: Path, hu: np.ndarray) -> None:
    data, affine = stored_as(hu, "RAS")
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), tmp_path / "a.nii.gz")
    assert read_nifti(tmp_path / "a.nii.gz").spacing_mm == pytest.approx(SPACING_ZYX)
    vol = read_nifti(tmp_path / "a.nii.gz", spacing_override_mm=(1.5, 0.5, 0.4))
    assert vol.spacing_mm == (1.5, 0.5, 0.4)
    np.testing.assert_array_equal(vol.hu, hu)
    with pytest.raises(InvalidScanError, match="spacing"):
        read_nifti(tmp_path / "a.nii.gz", spacing_override_mm=(1.5, 0.0, 0.4))


def test_gz_and_singleton_4d(tmp_path: Path, hu: np.ndarray) -> None:
    data, affine = stored_as(hu, "LAS")
    nib.save(nib.Nifti1Image(data[..., None].astype(np.int16), affine), tmp_path / "v4.nii.gz")
    np.testing.assert_array_equal(read_nifti(tmp_path / "v4.nii.gz").hu, hu)


def test_non_3d_rejected(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), tmp_path / "v4.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), tmp_path / "v2.nii")
    for name in ("v4.nii", "v2.nii"):
        with pytest.raises(InvalidScanError, match="expected 3-D"):
            read_nifti(tmp_path / name)


def test_corrupt_and_truncated_files_rejected(tmp_path: Path, hu: np.ndarray) -> None:
    (tmp_path / "junk.nii").write_bytes(b"this is not a nifti header" * 20)
    data, affine = stored_as(hu, "RAS")
    for name in ("full.nii", "full.nii.gz"):
        nib.save(nib.Nifti1Image(data.astype(np.int16), affine), tmp_path / name)
        raw = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(raw[: len(raw) // 2])
    for name in ("junk.nii", "cut_full.nii", "cut_full.nii.gz", "missing.nii"):
        with pytest.raises(InvalidScanError) as info:
            read_nifti(tmp_path / name)
        assert info.value.path == str(tmp_path / name)
        assert "NIfTI" in info.value.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_rejected(tmp_path: Path, hu: np.ndarray, bad: float) -> None:
    data = hu.copy()
    data[2, 3, 4] = bad
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(InvalidScanError, match="1 non-finite voxels"):
        read_nifti(tmp_path / "nan.nii")
