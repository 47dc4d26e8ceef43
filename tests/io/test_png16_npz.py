"""DeepLesion 16-bit PNG slices and RAD-ChestCT .npz volumes: round trips and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slicefm.io.npz import read_npz_volume
from slicefm.io.png16 import read_png_slices, write_png16
from slicefm.io.volume import InvalidScanError


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(99)


def write_slices(directory: Path, hu: np.ndarray, rng: np.random.Generator) -> list[Path]:
    """One PNG per slice under random names; returned in slice order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(hu.shape[0]):
        path = directory / f"{rng.integers(10**9):09d}.png"
        write_png16(path, hu[k])
        paths.append(path)
    return paths


# --- png16 --------------------------------------------------------------------------------------


def test_png16_round_trip_in_given_order(tmp_path: Path, rng) -> None:
    hu = rng.integers(-1024, 3000, size=(4, 9, 7)).astype(np.float32)
    hu[0, 0, 0], hu[0, 0, 1] = -32768, 32767  # the uint16 extremes (0 and 65535 on disk)
    paths = write_slices(tmp_path / "000001_01_01", hu, rng)
    with Image.open(paths[0]) as img:
        assert img.mode.startswith("I;16")
        assert np.asarray(img)[0, 0] == 0  # HU -32768 stored as 0
    vol = read_png_slices(paths, spacing_mm=(5.0, 0.8, 0.8))
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.hu.dtype == np.float32
    assert vol.spacing_mm == (5.0, 0.8, 0.8)
    assert vol.fmt == "deeplesion"
    assert vol.source == str(tmp_path / "000001_01_01")
    # The caller's list order is the slice order.
    np.testing.assert_array_equal(read_png_slices(paths[::-1], (5.0, 0.8, 0.8)).hu, hu[::-1])


def test_write_png16_rounds_and_refuses_out_of_range(tmp_path: Path) -> None:
    write_png16(tmp_path / "r.png", np.array([[-0.4, 10.6]]))
    np.testing.assert_array_equal(read_png_slices([tmp_path / "r.png"], (1, 1, 1)).hu, [[[0.0, 11.0]]])
    for bad in (np.array([[40000.0]]), np.array([[-40000.0]]), np.array([[np.nan]]), np.zeros(3)):
        with pytest.raises(ValueError):
            write_png16(tmp_path / "bad.png", bad)


def test_png_bad_inputs(tmp_path: Path, rng) -> None:
    paths = write_slices(tmp_path, rng.integers(-1000, 1000, size=(2, 6, 6)), rng)
    write_png16(tmp_path / "small.png", np.zeros((5, 6)))
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "eight_bit.png")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "text.png").write_text("not an image")
    raw = paths[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    cases = {
        "slices differ in shape": [*paths, tmp_path / "small.png"],
        "not a 16-bit grayscale PNG (mode L)": [paths[0], tmp_path / "eight_bit.png"],
        "not a 16-bit grayscale PNG (mode RGB)": [tmp_path / "rgb.png"],
        "unreadable PNG": [tmp_path / "text.png"],
        "cut.png: unreadable PNG": [tmp_path / "cut.png"],
    }
    for expected, slice_paths in cases.items():
        with pytest.raises(InvalidScanError) as info:
            read_png_slices(slice_paths, (1.0, 1.0, 1.0))
        assert expected in info.value.reason
    with pytest.raises(InvalidScanError, match="no PNG slices"):
        read_png_slices([], (1.0, 1.0, 1.0))
    with pytest.raises(InvalidScanError, match="spacing"):
        read_png_slices(paths, (1.0, -1.0, 1.0))


# --- npz ----------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path, rng) -> None:
    ct = rng.integers(-1024, 3000, size=(6, 8, 5)).astype(np.int16)
    np.savez_compressed(tmp_path / "trn00001.npz", ct=ct)
    vol = read_npz_volume(tmp_path / "trn00001.npz")
    np.testing.assert_array_equal(vol.hu, ct.astype(np.float32))
    assert vol.hu.dtype == np.float32 and vol.hu.flags.c_contiguous
    assert vol.spacing_mm == (0.8, 0.8, 0.8)
    assert vol.fmt == "npz" and vol.source == str(tmp_path / "trn00001.npz")
    np.savez(tmp_path / "other.npz", volume=ct[::-1])
    vol = read_npz_volume(tmp_path / "other.npz", key="volume", spacing_mm=(1.0, 0.7, 0.7))
    np.testing.assert_array_equal(vol.hu, ct[::-1])
    assert vol.spacing_mm == (1.0, 0.7, 0.7)


def test_npz_bad_inputs(tmp_path: Path) -> None:
    nan = np.zeros((2, 3, 4), np.float32)
    nan[1, 1, 1] = np.nan
    np.savez(tmp_path / "nokey.npz", image=np.zeros((2, 3, 4)))
    np.savez(tmp_path / "flat.npz", ct=np.zeros((3, 4)))
    np.savez(tmp_path / "nan.npz", ct=nan)
    np.savez(tmp_path / "text.npz", ct=np.array([["a"] * 2] * 2 * 2).reshape(2, 2, 2))
    np.save(tmp_path / "bare.npy", np.zeros((2, 3, 4)))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    raw = (tmp_path / "nokey.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    cases = {
        "nokey.npz": "missing array 'ct' (keys: ['image'])",
        "flat.npz": "expected a 3-D [z, y, x] array, got shape (3, 4)",
        "nan.npz": "1 non-finite voxels (NaN/inf)",
        "text.npz": "non-numeric dtype",
        "bare.npy": "not a .npz archive",
        "junk.npz": "unreadable .npz",
        "cut.npz": "unreadable .npz",
        "missing.npz": "unreadable .npz",
    }
    for name, expected in cases.items():
        with pytest.raises(InvalidScanError) as info:
            read_npz_volume(tmp_path / name)
        assert expected in info.value.reason, name
    np.savez(tmp_path / "ok.npz", ct=np.zeros((2, 2, 2)))
    with pytest.raises(InvalidScanError, match="spacing"):
        read_npz_volume(tmp_path / "ok.npz", spacing_mm=(0.8, 0.8, float("inf")))
