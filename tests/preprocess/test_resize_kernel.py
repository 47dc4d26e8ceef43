"""The C resize kernel (`slicefm.preprocess._bilinear`): the same bytes as Pillow's bilinear filter, close to
the filter's formula evaluated in float64, and the same stacks as the torch-free fallback it replaces."""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest

from slicefm.preprocess import resize as resize_mod
from slicefm.preprocess.config import ABDOMEN, BONE, LUNG, PreprocessConfig
from slicefm.preprocess.resize import _pillow_two_pass, resize_hu_slices, resize_kernel
from slicefm.preprocess.stage import preprocess_volume
from slicefm.preprocess.windows import apply_windows_uint8, resize_windows_uint8, window_affine

kernel = resize_mod._bilinear
needs_kernel = pytest.mark.skipif(kernel is None, reason="C kernel not built (no compiler)")


def test_kernel_is_built_where_a_compiler_is() -> None:
    """`pip install` builds it whenever a C compiler is there (setup.py): a silent fall back to Pillow here
    would hide a broken build behind passing tests."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}): the Pillow fallback is what runs")
    assert kernel is not None, "slicefm.preprocess._bilinear was not built: reinstall (pip install -e .)"


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of the anti-aliased bilinear filter, from its definition: output o is centred at
    (o + 0.5) * s in input coordinates (s = n_in / n_out); input i (centre i + 0.5) weighs
    max(0, 1 - |i + 0.5 - centre| / max(s, 1)); rows normalised to sum 1."""
    s = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * s
    dist = np.abs(np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / max(s, 1.0)
    w = np.clip(1.0 - dist, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def _formula(plane: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    return _triangle_weights(plane.shape[0], out_h) @ plane.astype(np.float64) @ _triangle_weights(
        plane.shape[1], out_w
    ).T


SHAPES = [  # (h, w, out_h, out_w): CT crops (square, shrinking), enlarging, non-square, tiny, large factors
    (412, 412, 256, 256),
    (512, 512, 224, 224),
    (300, 300, 256, 256),
    (100, 100, 256, 256),
    (257, 255, 256, 256),
    (300, 200, 100, 150),
    (7, 9, 3, 5),
    (33, 33, 33, 20),
    (512, 512, 16, 16),
    (1, 5, 3, 2),
]


@needs_kernel
@pytest.mark.parametrize("h, w, oh, ow", SHAPES)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_kernel_equals_pillow_bytes_and_the_formula(h: int, w: int, oh: int, ow: int, dtype: type) -> None:
    rng = np.random.default_rng(h * 1000 + w)
    hu = rng.integers(-1024, 3071, size=(3, h, w)).astype(dtype)
    if dtype == np.float32:
        hu += rng.random(hu.shape, dtype=np.float32) - 0.5  # fractional HU: every bit of the float input counts
    out = np.empty((3, oh, ow), np.float32)
    kernel.resize(hu, out)
    ref = np.stack([_pillow_two_pass(p, oh, ow) for p in hu])
    assert out.tobytes() == ref.tobytes()
    for k in range(3):  # the filter's definition in float64: the float32 intermediate costs ~1e-7 relative
        np.testing.assert_allclose(out[k], _formula(hu[k], oh, ow), rtol=0, atol=4000 * 2e-7)


@needs_kernel
def test_kernel_reads_views_in_place() -> None:
    """Crop views (row stride of the full slice), flipped and transposed views, big-endian data: the bytes
    of their contiguous copies."""
    rng = np.random.default_rng(0)
    vol = rng.integers(-1024, 2000, size=(4, 96, 80)).astype(np.int16)
    for view in (vol[:, 10:70, 5:65], vol[:, ::-1, :], vol[:, :, ::2], vol.transpose(0, 2, 1), vol[::2]):
        got = resize_hu_slices(view, 40)
        want = resize_hu_slices(np.ascontiguousarray(view).astype(np.float32), 40)
        assert got.tobytes() == want.tobytes()
    swapped = vol.astype(">i2")
    assert resize_hu_slices(swapped, 40).tobytes() == resize_hu_slices(vol, 40).tobytes()


@needs_kernel
def test_kernel_rejects_what_it_cannot_read() -> None:
    out = np.empty((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="int16 or float32"):
        kernel.resize(np.zeros((2, 16, 16), np.int32), out)
    with pytest.raises(ValueError, match="slices"):
        kernel.resize(np.zeros((3, 16, 16), np.int16), out)
    with pytest.raises(ValueError, match="format f"):
        kernel.resize(np.zeros((2, 16, 16), np.int16), np.empty((2, 8, 8), np.float64))
    with pytest.raises(ValueError, match="channels"):
        kernel.resize_windows(np.zeros((2, 16, 16), np.int16), np.empty((2, 3, 8, 8), np.uint8), [1.0], [0.5])
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel.resize(np.zeros((2, 16, 16), np.int16), np.empty((2, 8, 16), np.float32)[:, :, ::2])


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("size", [48, 100, None])
def test_resize_windows_equals_resize_then_window(monkeypatch, use_kernel: bool, size: int | None) -> None:
    if use_kernel and kernel is None:
        pytest.skip("C kernel not built")
    monkeypatch.setenv("SLICEFM_RESIZE_KERNEL", "c" if use_kernel else "pillow")
    assert (resize_kernel() is not None) == use_kernel
    rng = np.random.default_rng(1)
    vol = rng.integers(-1500, 2000, size=(5, 70, 70)).astype(np.int16)
    windows = [ABDOMEN, LUNG, BONE]
    want = apply_windows_uint8(resize_hu_slices(vol.astype(np.float32), size), windows)
    assert resize_windows_uint8(vol, size, windows).tobytes() == want.tobytes()
    stack = np.zeros((5, 2, 3, *want.shape[-2:]), np.uint8)  # a non-contiguous `out`: rows of a 5-cut-like stack
    resize_windows_uint8(vol, size, windows, out=stack[:, 1])
    assert stack[:, 1].tobytes() == want.tobytes() and not stack[:, 0].any()


def test_window_affine_rounds_half_up_at_the_window_edges() -> None:
    scale, offset = window_affine(ABDOMEN)
    assert scale.dtype == offset.dtype == np.float32
    hu = np.array([ABDOMEN.lo - 10, ABDOMEN.lo, (ABDOMEN.lo + ABDOMEN.hi) / 2, ABDOMEN.hi, ABDOMEN.hi + 10])
    got = np.clip(hu.astype(np.float32) * scale + offset, 0.5, 255.5).astype(np.uint8)
    assert got.tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("normalisation", ["windows", "zscore"])
def test_preprocess_volume_same_bytes_with_and_without_the_kernel(monkeypatch, normalisation: str) -> None:
    """The stage's stacks do not depend on whether the kernel was built (a padded crop box included)."""
    if kernel is None:
        pytest.skip("C kernel not built")
    rng = np.random.default_rng(2)
    vol = np.full((12, 90, 90), -1024, np.int16)
    vol[:, 5:85, 0:90] = rng.integers(-200, 400, size=(12, 80, 90))  # body wider than tall: the square pads
    cfg = PreprocessConfig(size=64, normalisation=normalisation)
    monkeypatch.setenv("SLICEFM_RESIZE_KERNEL", "c")
    with_kernel = preprocess_volume(vol, cfg)
    monkeypatch.setenv("SLICEFM_RESIZE_KERNEL", "pillow")
    without = preprocess_volume(vol, cfg)
    assert with_kernel[1:] == without[1:]
    assert with_kernel[0].tobytes() == without[0].tobytes()


@pytest.mark.parametrize("side, size", [(412, 256), (300, 224), (97, 48), (40, 64)])
def test_square_slices_resize_as_one_pillow_call_did(side: int, size: int) -> None:
    """Body crops are square: for them the fixed rows-then-columns order is the order Pillow's single call
    took, so stacks keep the bytes earlier releases wrote."""
    from PIL import Image

    plane = np.random.default_rng(side).normal(0, 300, (side, side)).astype(np.float32)
    one_call = np.asarray(Image.fromarray(plane, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    assert _pillow_two_pass(plane, size, size).tobytes() == one_call.tobytes()
    assert resize_hu_slices(plane[None], size)[0].tobytes() == one_call.tobytes()
