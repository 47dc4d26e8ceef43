"""Each preprocessing transform alone, on small synthetic arrays with known answers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from slicefm.preprocess.boxes import map_box_to_input, map_box_to_output
from slicefm.preprocess.config import (
    ABDOMEN,
    LUNG,
    WINDOWS,
    HUWindow,
    PreprocessConfig,
    ZScoreNorm,
    channel_names,
    resolve_windows,
)
from slicefm.preprocess.crop import AIR_HU, body_bbox, body_mask, crop_to_box, square_box
from slicefm.preprocess.resize import resize_slices
from slicefm.preprocess.slabs import slab_ids
from slicefm.preprocess.tiling import five_cut_boxes, tile_slices
from slicefm.preprocess.windows import apply_windows_uint8, apply_zscore, fit_zscore_norm


def phantom(
    n_slices: int = 4, size: int = 128, bridge: bool = False, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Axial CT-like slices: soft-tissue ellipse with two lungs, a table bar below it, air around.

    Returns HU [z, size, size] float32 and the 2-D region masks (body, lungs, table).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.45) / 0.32) ** 2 + ((xx - 0.5) / 0.42) ** 2 < 1
    lungs = (((yy - 0.4) / 0.15) ** 2 + ((xx - 0.33) / 0.1) ** 2 < 1) | (
        ((yy - 0.4) / 0.15) ** 2 + ((xx - 0.67) / 0.1) ** 2 < 1
    )
    table = (yy > 0.84) & (yy < 0.9) & (xx > 0.05) & (xx < 0.95)
    sl = np.full((size, size), AIR_HU, dtype=np.float32)
    sl[body] = 40.0
    sl[lungs] = -850.0
    sl[table] = 300.0
    if bridge:  # a 1-px cable from the body down to the table
        rows = np.flatnonzero(~body[:, size // 2] & (yy[:, 0] > 0.5) & ~table[:, size // 2])
        sl[rows, size // 2] = 100.0
    vol = np.repeat(sl[None], n_slices, axis=0) + rng.normal(0.0, 15.0, (n_slices, size, size)).astype(
        np.float32
    )
    return vol, {"body": body, "lungs": lungs, "table": table}


# ---------------------------------------------------------------- windows


def test_window_endpoints_clipping_and_linearity() -> None:
    hu = np.array([[[-3000.0, -175.0, -175.0 + 100 * 450 / 255, 275.0, 4000.0]]], dtype=np.float32)
    out = apply_windows_uint8(hu, [ABDOMEN])
    assert out.dtype == np.uint8 and out.shape == (1, 1, 1, 5)
    np.testing.assert_array_equal(out[0, 0, 0], [0, 0, 100, 255, 255])

    # Dense sweep against a float64 reference: off by at most one level, and only at rounding ties.
    sweep = np.linspace(-1800.0, 800.0, 20001, dtype=np.float32).reshape(1, 1, -1)
    for win in (ABDOMEN, LUNG, WINDOWS["brain"]):
        got = apply_windows_uint8(sweep, [win])[0, 0, 0].astype(int)
        exact = 255.0 * (np.clip(sweep[0, 0].astype(np.float64), win.lo, win.hi) - win.lo) / (win.hi - win.lo)
        ref = np.floor(exact + 0.5).astype(int)
        assert np.abs(got - ref).max() <= 1
        assert np.mean(got == ref) > 0.999


def test_window_channel_order_and_input_layouts() -> None:
    vol, _ = phantom(n_slices=3, size=32)
    both = apply_windows_uint8(vol, [LUNG, ABDOMEN])
    assert both.shape == (3, 2, 32, 32) and both.dtype == np.uint8
    np.testing.assert_array_equal(both[:, 0], apply_windows_uint8(vol, [LUNG])[:, 0])
    np.testing.assert_array_equal(both[:, 1], apply_windows_uint8(vol, [ABDOMEN])[:, 0])
    # Lung parenchyma (-850 HU) is visible in the lung window, black in the abdomen window.
    assert both[:, 0, 13, 10].min() > 50 and both[:, 1, 13, 10].max() == 0
    np.testing.assert_array_equal(apply_windows_uint8(torch.from_numpy(vol), [LUNG, ABDOMEN]), both)
    np.testing.assert_array_equal(apply_windows_uint8(vol[:, None], [LUNG, ABDOMEN]), both)
    np.testing.assert_array_equal(apply_windows_uint8(vol.astype(np.float64), [LUNG, ABDOMEN]), both)
    with pytest.raises(ValueError):
        apply_windows_uint8(vol[:, None].repeat(2, axis=1), [LUNG])


def test_window_table() -> None:
    assert WINDOWS["soft_tissue"] is ABDOMEN and (ABDOMEN.lo, ABDOMEN.hi) == (-175, 275)
    assert (LUNG.lo, LUNG.hi) == (-1500, 500)
    assert (WINDOWS["bone"].lo, WINDOWS["bone"].hi) == (-500, 1300)
    assert (WINDOWS["brain"].lo, WINDOWS["brain"].hi) == (0, 80)
    # The preprocess config names windows from the table, in its order, or spells one out.
    assert resolve_windows(PreprocessConfig(windows=["lung", "abdomen"])) == [LUNG, ABDOMEN]
    custom = PreprocessConfig(windows=["soft_tissue", HUWindow(name="liver", lo=-50, hi=200)])
    assert resolve_windows(custom) == [ABDOMEN, HUWindow(name="liver", lo=-50, hi=200)]
    assert channel_names(custom) == ["abdomen", "liver"]
    with pytest.raises(ValueError, match=r"unknown window 'liver'; known: \['abdomen', 'bone'"):
        resolve_windows(PreprocessConfig(windows=["lung", "liver"]))
    with pytest.raises(ValueError):
        HUWindow(name="bad", lo=100.0, hi=100.0)


def test_windows_and_zscore_are_validated_alike_from_yaml_and_code() -> None:
    """One type each: the config's YAML mapping and the transform's argument are the same model."""
    from_yaml = PreprocessConfig.model_validate({"windows": [{"name": "liver", "lo": -50, "hi": 200}]})
    assert from_yaml.windows == [HUWindow(name="liver", lo=-50.0, hi=200.0)]
    assert len({*from_yaml.windows, HUWindow(name="liver", lo=-50, hi=200)}) == 1  # frozen, hashable
    with pytest.raises(ValueError, match=r"window 'liver': hi \(-60.0\) must exceed lo \(-50.0\)"):
        PreprocessConfig.model_validate({"windows": [{"name": "liver", "lo": -50, "hi": -60}]})
    with pytest.raises(ValueError, match="extra"):
        PreprocessConfig.model_validate({"windows": [{"name": "liver", "lo": -50, "hi": 200, "level": 75}]})
    with pytest.raises(ValueError, match=r"clip_hi \(-1000.0\) must exceed clip_lo"):
        PreprocessConfig.model_validate({"zscore": {"clip_hi": -1000}})
    with pytest.raises(ValueError, match="greater than 0"):
        ZScoreNorm(std=0.0)
    assert PreprocessConfig().zscore == ZScoreNorm(clip_lo=-997.0, clip_hi=888.0, mean=-142.39, std=360.97)


def test_zscore_values() -> None:
    norm = ZScoreNorm()
    hu = np.array([[[-2000.0, -997.0, -142.39, 888.0, 3000.0]]], dtype=np.float32)
    out = apply_zscore(hu, norm)
    assert out.dtype == np.float16 and out.shape == (1, 1, 1, 5)
    lo, hi = (-997.0 + 142.39) / 360.97, (888.0 + 142.39) / 360.97
    np.testing.assert_allclose(out[0, 0, 0].astype(np.float64), [lo, lo, 0.0, hi, hi], atol=2e-3)
    custom = apply_zscore(
        torch.tensor([[[10.0, 30.0]]]), ZScoreNorm(clip_lo=0.0, clip_hi=20.0, mean=10.0, std=5.0)
    )
    np.testing.assert_array_equal(custom[0, 0, 0], [0.0, 2.0])


def test_fit_zscore_norm_recovers_gaussian_foreground() -> None:
    rng = np.random.default_rng(1)
    mu, sd = 40.0, 100.0
    vols, masks = [], []
    for _ in range(3):
        vol = np.full((8, 64, 64), AIR_HU, dtype=np.float32)  # background must not enter the statistics
        mask = np.zeros(vol.shape, dtype=bool)
        mask[:, 8:56, 8:56] = True
        vol[mask] = rng.normal(mu, sd, mask.sum())
        vols.append(vol)
        masks.append(mask)
    z995 = 2.5758293  # standard-normal 99.5th percentile
    for cap in (None, 20_000):
        norm = fit_zscore_norm(vols, masks, max_voxels_per_volume=cap, rng=np.random.default_rng(2))
        tol = 3.0 if cap is None else 6.0
        assert norm.mean == pytest.approx(mu, abs=tol)
        assert norm.std == pytest.approx(sd, abs=tol)
        assert norm.clip_lo == pytest.approx(mu - z995 * sd, abs=4 * tol)
        assert norm.clip_hi == pytest.approx(mu + z995 * sd, abs=4 * tol)
    with pytest.raises(ValueError, match="foreground"):
        fit_zscore_norm([vols[0]], [np.zeros_like(masks[0])])


def test_fit_zscore_norm_computes_body_masks_when_not_given() -> None:
    vol, regions = phantom(n_slices=2, size=64)
    norm = fit_zscore_norm([vol])
    body = regions["body"]
    expected = vol[:, body].mean()  # lungs included, air and table excluded
    assert norm.mean == pytest.approx(expected, abs=15.0)
    assert norm.clip_lo < -800.0 < 0.0 < norm.clip_hi < 200.0


# ---------------------------------------------------------------- crop


@pytest.mark.parametrize("size", [128, 256])  # 256 px exercises the coarse (stride 2) grid
def test_body_mask_excludes_table_includes_lungs(size: int) -> None:
    vol, regions = phantom(size=size)
    mask = body_mask(vol)
    assert mask.shape == vol.shape and mask.dtype == bool
    assert not mask[:, regions["table"]].any()
    assert mask[:, regions["lungs"]].all()
    body_area = regions["body"].sum()
    # agreement with the true body up to a boundary band of about one grid step
    for m in mask:
        assert abs(int(m.sum()) - int(body_area)) < 0.03 * body_area
        assert (m & regions["body"]).sum() > 0.97 * body_area


def test_body_mask_cuts_a_thin_bridge_to_the_table() -> None:
    vol, regions = phantom(size=128, bridge=True)
    joined = body_mask(vol, opening_px=0)  # without the opening the cable joins body and table
    assert joined[:, regions["table"]].all()
    mask = body_mask(vol)
    assert not mask[:, regions["table"]].any()
    assert mask[:, regions["lungs"]].all()


def test_body_bbox_margins_union_and_clipping() -> None:
    mask = np.zeros((3, 60, 80), dtype=bool)
    mask[1, 10:20, 30:50] = True
    mask[2, 15:25, 5:8] = True
    assert body_bbox(mask, margin_px=4) == (6, 29, 1, 54)
    assert body_bbox(mask, margin_px=0) == (10, 25, 5, 50)
    mask[0, 55:60, 75:80] = True  # touches the image corner: the margin is clipped
    assert body_bbox(mask, margin_px=4) == (6, 60, 1, 80)


def test_body_bbox_empty_volume_gives_full_image(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert body_bbox(np.zeros((2, 30, 40), dtype=bool)) == (0, 30, 0, 40)
    assert "empty" in caplog.text


def test_square_box_inside_shifted_and_padded() -> None:
    assert square_box((10, 50, 20, 40), (100, 100)) == (10, 50, 10, 50)
    assert square_box((0, 60, 0, 10), (100, 100)) == (0, 60, 0, 60)  # shifted back inside at the edge
    assert square_box((40, 100, 90, 100), (100, 100)) == (40, 100, 40, 100)
    # Wider than the image is tall: the square must stick out and be padded with air.
    img = np.arange(40 * 100, dtype=np.float32).reshape(1, 40, 100)
    box = square_box((0, 40, 0, 100), img.shape)
    assert box == (-30, 70, 0, 100)
    crop = crop_to_box(img, box)
    assert crop.shape == (1, 100, 100)
    assert (crop[:, :30] == AIR_HU).all() and (crop[:, 70:] == AIR_HU).all()
    np.testing.assert_array_equal(crop[:, 30:70], img)


def test_crop_to_box_is_a_view_inside_the_image() -> None:
    vol = np.arange(2 * 3 * 20 * 30, dtype=np.float32).reshape(2, 3, 20, 30)
    crop = crop_to_box(vol, (5, 15, 10, 25))
    assert crop.shape == (2, 3, 10, 15) and np.shares_memory(crop, vol)
    np.testing.assert_array_equal(crop, vol[..., 5:15, 10:25])
    t = torch.from_numpy(vol)
    tcrop = crop_to_box(t, (-2, 15, 10, 25), pad_value=-5.0)
    assert isinstance(tcrop, torch.Tensor) and tuple(tcrop.shape) == (2, 3, 17, 15)
    assert (tcrop[..., :2, :] == -5.0).all()
    with pytest.raises(ValueError, match="pad_value"):
        crop_to_box(vol.astype(np.uint8), (-1, 5, 0, 5))
    assert (crop_to_box(vol.astype(np.uint8), (-1, 5, 0, 5), pad_value=0)[..., 0, :] == 0).all()


# ---------------------------------------------------------------- resize


def test_resize_shapes_kinds_and_dtypes() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 100, (3, 2, 40, 60)).astype(np.float32)
    out = resize_slices(x, 16)
    assert isinstance(out, np.ndarray) and out.shape == (3, 2, 16, 16) and out.dtype == np.float32
    assert resize_slices(x[:, 0], 16).shape == (3, 16, 16)
    assert resize_slices(x, 100).shape == (3, 2, 100, 100)  # upsampling
    tout = resize_slices(torch.from_numpy(x), 16)
    assert isinstance(tout, torch.Tensor)
    np.testing.assert_allclose(tout.numpy(), out)
    u8 = rng.integers(0, 256, (3, 2, 40, 40), dtype=np.uint8)
    assert resize_slices(u8, 20).dtype == np.uint8
    assert resize_slices(x.astype(np.float16), 20).dtype == np.float16
    assert resize_slices(x[:, :, ::-1], 16).shape == (3, 2, 16, 16)  # negative strides
    with pytest.raises(TypeError):
        resize_slices(x.astype(np.int32), 16)


def test_resize_native_is_a_no_op() -> None:
    x = np.zeros((2, 32, 32), dtype=np.float32)
    assert resize_slices(x, None) is x
    assert resize_slices(x, 32) is x


def test_resize_constant_stays_constant_and_antialiases() -> None:
    const = np.full((2, 1, 97, 97), 123.25, dtype=np.float32)
    np.testing.assert_allclose(resize_slices(const, 24), 123.25, rtol=1e-6)
    assert (resize_slices(np.full((2, 50, 50), 77, dtype=np.uint8), 13) == 77).all()
    # One bright column in four: plain bilinear sampling at 4x would miss every bright column (all 0);
    # the anti-aliasing filter averages them to the mean, 250.
    stripes = np.zeros((1, 64, 64), dtype=np.float32)
    stripes[..., 0::4] = 1000.0
    out = resize_slices(stripes, 16)
    interior = out[0, 2:-2, 2:-2]
    assert interior.mean() == pytest.approx(250.0, abs=5.0) and interior.std() < 10.0


def test_resize_preserves_a_linear_ramp() -> None:
    ramp = np.broadcast_to(np.arange(64, dtype=np.float32), (1, 64, 64)).copy()
    out = resize_slices(ramp, 32)
    # half-pixel centres: output column j sits at input coordinate 2j + 0.5
    np.testing.assert_allclose(out[0, 5, 2:-2], 2 * np.arange(2, 30) + 0.5, atol=1e-3)


# ---------------------------------------------------------------- tiling


@pytest.mark.parametrize(
    ("box", "overlap"), [((0, 100, 0, 100), 0.2), ((10, 111, 50, 151), 0.2), ((3, 104, 0, 101), 0.0)]
)
def test_five_cut_boxes_cover_and_overlap(box: tuple[int, int, int, int], overlap: float) -> None:
    tiles = five_cut_boxes(box, overlap=overlap)
    assert len(tiles) == 5
    y0, y1, x0, x1 = box
    cover = np.zeros((y1, x1), dtype=int)
    for ty0, ty1, tx0, tx1 in tiles:
        assert y0 <= ty0 < ty1 <= y1 and x0 <= tx0 < tx1 <= x1
        assert (ty1 - ty0, tx1 - tx0) == (tiles[0][1] - tiles[0][0], tiles[0][3] - tiles[0][2])  # same size
        cover[ty0:ty1, tx0:tx1] += 1
    assert (cover[y0:y1, x0:x1] >= 1).all()  # the whole crop is covered
    assert cover[y0:y1, x0:x1].max() >= 2  # and tiles overlap (centre tile at least)
    side = y1 - y0
    assert tiles[0][1] - tiles[0][0] == max(round(side * (1 + overlap) / 2), (side + 1) // 2)


def test_five_cut_default_geometry() -> None:
    assert five_cut_boxes((0, 100, 0, 100)) == [
        (0, 60, 0, 60),
        (0, 60, 40, 100),
        (40, 100, 0, 60),
        (40, 100, 40, 100),
        (20, 80, 20, 80),
    ]


def test_tile_slices_shapes_and_content() -> None:
    yy, xx = np.mgrid[:100, :100]
    x = np.stack([yy * 1000.0 + xx, -(yy * 1000.0 + xx)]).astype(np.float32)[:, None]  # [2, 1, 100, 100]
    boxes = five_cut_boxes((0, 100, 0, 100))
    native = tile_slices(x, boxes, 60)
    assert native.shape == (2, 5, 1, 60, 60)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        np.testing.assert_array_equal(native[:, k], x[..., y0:y1, x0:x1])
    assert tile_slices(x, boxes, 30).shape == (2, 5, 1, 30, 30)
    assert tile_slices(x[:, 0], boxes, 30).shape == (2, 5, 30, 30)
    assert isinstance(tile_slices(torch.from_numpy(x), boxes, 30), torch.Tensor)
    padded = tile_slices(x[:, 0], [(-10, 50, 0, 60)], 60)
    assert (padded[:, 0, :10] == AIR_HU).all()


# ---------------------------------------------------------------- slabs


@pytest.mark.parametrize(
    ("spacing", "per_slab"), [(1.0, 12), (5.0, 2), (2.5, 5), (0.625, 19), (12.0, 1), (20.0, 1)]
)
def test_slab_ids_regular_spacing(spacing: float, per_slab: int) -> None:
    n = 40
    ids = slab_ids(100.0 + spacing * np.arange(n))
    np.testing.assert_array_equal(ids, np.arange(n) // per_slab)
    assert ids.dtype == np.int64


def test_slab_ids_irregular_positions_and_edges() -> None:
    rng = np.random.default_rng(4)
    steps = 1.25 + rng.uniform(-0.05, 0.05, 29)
    steps[10] = 2.5  # a missing slice does not move the median spacing
    z = np.concatenate([[0.0], np.cumsum(steps)])
    ids = slab_ids(z)  # round(12 / 1.25) = 10 slices per slab; 30 slices -> 3 slabs
    np.testing.assert_array_equal(ids, np.repeat([0, 1, 2], 10))
    np.testing.assert_array_equal(slab_ids(z[::-1]), ids)  # descending positions: same grouping by count
    np.testing.assert_array_equal(slab_ids(np.arange(25.0)), [0] * 12 + [1] * 12 + [2])  # partial last slab
    np.testing.assert_array_equal(slab_ids(np.array([7.0])), [0])
    with pytest.raises(ValueError):
        slab_ids(np.zeros(5))


# ---------------------------------------------------------------- boxes


def test_box_mapping_known_values_and_round_trip() -> None:
    crop = (100, 300, 50, 250)  # (y0, y1, x0, x1): 200 x 200, resized to 256
    np.testing.assert_allclose(map_box_to_output(np.array([50, 100, 250, 300]), crop, 256), [0, 0, 256, 256])
    np.testing.assert_allclose(
        map_box_to_output(np.array([150, 200, 200, 250]), crop, 256, 200), [128, 128, 192, 192]
    )
    rng = np.random.default_rng(5)
    xy0 = rng.uniform([50, 100], [200, 250], (50, 2))
    boxes = np.concatenate([xy0, xy0 + rng.uniform(1, 50, (50, 2))], axis=1)
    out = map_box_to_output(boxes, crop, 256, 200)
    assert out.shape == (50, 4)
    back = map_box_to_input(out, crop, 256, 200)
    assert np.abs(back - boxes).max() < 1.0
    np.testing.assert_allclose(back, boxes, atol=1e-9)


def test_box_mapping_clips_at_the_crop_border() -> None:
    crop = (100, 300, 50, 250)
    boxes = np.array([[30.0, 90.0, 80.0, 150.0], [240.0, 280.0, 400.0, 500.0], [0.0, 0.0, 10.0, 10.0]])
    out = map_box_to_output(boxes, crop, 256)
    np.testing.assert_allclose(out[0], [0.0, 0.0, 38.4, 64.0])
    np.testing.assert_allclose(out[1], [243.2, 230.4, 256.0, 256.0])
    assert out[2, 2] - out[2, 0] == 0 and out[2, 3] - out[2, 1] == 0  # wholly outside: zero area
    # A padded square crop reaching above a 40 x 100 image: the inverse clips to the image when asked.
    padded = (-30, 70, 0, 100)
    np.testing.assert_allclose(map_box_to_input(np.array([0, 0, 50, 50]), padded, 50), [0, -30, 100, 70])
    np.testing.assert_allclose(
        map_box_to_input(np.array([0, 0, 50, 50]), padded, 50, image_shape=(40, 100)), [0, 0, 100, 40]
    )
    with pytest.raises(ValueError, match="crop_size"):
        map_box_to_output(boxes, crop, 256, crop_size=180)


# ---------------------------------------------------------------- composed


def test_window_crop_resize_composition() -> None:
    vol, regions = phantom(n_slices=2, size=128)
    box = square_box(body_bbox(body_mask(vol)), vol.shape)
    assert box[3] - box[2] == box[1] - box[0]
    out = apply_windows_uint8(resize_slices(crop_to_box(vol, box), 64), [ABDOMEN, LUNG])
    assert out.shape == (2, 2, 64, 64)
    # The body (~107 px of 128 wide) fills the crop's width up to the 4 px margins: soft tissue (~120 in the
    # abdomen window) spans > 90% of the output columns; uncropped it would span 84%.
    tissue = (out[:, 0] > 100) & (out[:, 0] < 150)  # 40 HU -> ~122; the 300 HU table saturates at 255
    tissue_cols = tissue.any(axis=(0, 1))
    assert tissue_cols.mean() > 0.9
    assert not tissue_cols[0] and not tissue_cols[-1]  # the margin is air
