"""The fused ingest + preprocess pass: the same outputs as the two stages one after the other, byte for byte
(but the canonical volumes it skips), in one pool; and the torch-free steps it relies on match their
references (the crop box on the mask's grid, Pillow's resize vs torch's, chunked processing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slicefm.data import ingest as ingest_module
from slicefm.data.ingest import ingest
from slicefm.edge.cli import main as cli_main
from slicefm.phantom.dataset import generate_dataset
from slicefm.preprocess import stage as stage_module
from slicefm.preprocess.config import PreprocessConfig, ZScoreNorm
from slicefm.preprocess.crop import body_bbox, body_box, body_mask
from slicefm.preprocess.fused import ingest_and_preprocess
from slicefm.preprocess.resize import resize_hu_slices, resize_slices
from slicefm.preprocess.stage import MissingVolumesError, preprocess_volume, run_preprocess

KEY = b"fused-test-key-0123456789abcdef"
CFG = PreprocessConfig(size=48, workers=2, n_shards=2)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 phantom DICOM scans at 64 px (lesions, organ masks) and a corrupt file, which ingest quarantines."""
    root = generate_dataset(tmp_path_factory.mktemp("fused") / "raw", 4, "dicom", seed=5, shape_xy=64)
    victim = sorted(root.rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:400])  # truncated: its series is quarantined, the others go on
    return root


@pytest.fixture(scope="module")
def two_stage(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two-stage")
    ingest(raw, str(out / "ingest"), KEY, "dicom", "t", workers=2)
    run_preprocess(str(out / "ingest"), str(out / "pre"), CFG)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fused_pass_writes_what_the_two_stages_write(raw, two_stage, tmp_path):
    res = ingest_and_preprocess(raw, str(tmp_path / "ingest"), str(tmp_path / "pre"), KEY, CFG, "dicom", "t", 2)
    assert res.ingest.n_quarantined >= 1 and res.ingest.n_scans == res.preprocess.n_scans == 3
    fused, ref = _files(tmp_path / "pre"), _files(two_stage / "pre")
    assert set(fused) == set(ref)
    # Byte for byte: every stack, index, crop record, resized mask and lesions.parquet. What differs is where
    # the data came from: the scans manifest (no volume column value) and the fingerprints of it.
    differ = {k for k in ref if fused[k] != ref[k]}
    assert differ == {"scans.parquet", "preprocess.json", "preprocess.resume.json"}, differ
    assert any(k.startswith("shards/") for k in ref) and any(k.startswith("masks/") for k in ref)
    fused_meta, ref_meta = (json.loads(f["preprocess.json"]) for f in (fused, ref))
    assert {k for k in ref_meta if fused_meta[k] != ref_meta[k]} == {"source"}
    scans = pd.read_parquet(tmp_path / "ingest" / "scans.parquet")
    ref_scans = pd.read_parquet(two_stage / "ingest" / "scans.parquet")
    assert set(scans["volume"]) == {""} and not (tmp_path / "ingest" / "volumes").exists()
    pd.testing.assert_frame_equal(scans.drop(columns="volume"), ref_scans.drop(columns="volume"))
    quarantine = (tmp_path / "ingest" / "quarantine.csv").read_bytes()
    assert quarantine == (two_stage / "ingest" / "quarantine.csv").read_bytes()
    assert json.loads((tmp_path / "ingest" / "dataset.json").read_text())["volumes"] is False
    # Without volumes the ingest output cannot be preprocessed alone: a clear refusal, nothing written.
    with pytest.raises(MissingVolumesError, match="without canonical volumes"):
        run_preprocess(str(tmp_path / "ingest"), str(tmp_path / "pre-again"), CFG)
    assert not (tmp_path / "pre-again").exists()
    argv = ["preprocess", "--scans", str(tmp_path / "ingest"), "--out", str(tmp_path / "pre-cli")]
    assert cli_main(argv) == 2 and not (tmp_path / "pre-cli").exists()  # a message, not a traceback


def test_fused_pass_with_volumes_matches_ingest_and_resumes_preprocess(raw, two_stage, tmp_path):
    ingest_and_preprocess(
        raw, str(tmp_path / "ingest"), str(tmp_path / "pre"), KEY, CFG, "dicom", "t", 1, keep_volumes=True
    )
    assert _files(tmp_path / "ingest") == _files(two_stage / "ingest")  # volumes included, one worker here
    # `slicefm preprocess` of that ingest output finds every scan finished under the same identity.
    again = run_preprocess(str(tmp_path / "ingest"), str(tmp_path / "pre"), CFG)
    assert again.n_skipped == again.n_scans == 3
    assert _files(tmp_path / "pre") == {
        k: v for k, v in _files(two_stage / "pre").items() if k not in ("preprocess.json",)
    } | {"preprocess.json": (tmp_path / "pre" / "preprocess.json").read_bytes()}


def test_to_int16_in_chunks_equals_the_whole_volume_rule():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 2000, (13, 7, 5)).astype(np.float32)  # not a multiple of the chunk; values past int16
    hu[0, 0, :3] = [-5000.0, 40000.0, -0.5]
    ref = np.clip(np.rint(hu), -1024, 32767).astype(np.int16)
    out = ingest_module._to_int16(hu.copy())
    np.testing.assert_array_equal(out, ref)
    assert out.dtype == np.int16 and out[0, 0, :3].tolist() == [-1024, 32767, 0]
    # Without the cast (the fused pass): the same values, float32, in the reader's own array.
    work = hu.copy()
    same = ingest_module._to_int16(work, cast=False)
    assert same is work and same.dtype == np.float32
    np.testing.assert_array_equal(same, ref.astype(np.float32))
    readonly = hu.copy()
    readonly.flags.writeable = False
    np.testing.assert_array_equal(ingest_module._to_int16(readonly, cast=False), ref.astype(np.float32))


def test_round_in_place_gives_the_range_the_checks_need():
    rng = np.random.default_rng(3)
    hu = rng.normal(0, 2000, (21, 6, 5)).astype(np.float32)
    before = hu.copy()
    assert ingest_module.round_in_place(hu) == (float(before.min()), float(before.max()))
    np.testing.assert_array_equal(hu, np.clip(np.rint(before), -1024, 32767))
    # Then _to_int16 does not round again (and casts the same values).
    np.testing.assert_array_equal(ingest_module._to_int16(hu, rounded=True), ingest_module._to_int16(before))
    frozen = before.copy()
    frozen.flags.writeable = False
    assert ingest_module.round_in_place(frozen) is None and ingest_module.round_in_place(frozen.astype(int)) is None


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_round_in_place_leaves_bad_voxels_for_check_volume_to_count(bad):
    from slicefm.data.ingest import InvalidScanError, check_volume
    from slicefm.io.volume import Volume

    hu = np.zeros((20, 4, 4), np.float32)
    hu[10, 1, :3] = bad  # past the first chunk: that one is rounded, this one stops the pass
    hu[0, 0, 0] = 300.0
    value_range = ingest_module.round_in_place(hu)
    assert not np.isfinite(value_range).all()
    vol = Volume(hu=hu, spacing_mm=(1.0, 1.0, 1.0), source="bad.nii.gz", fmt="nifti")
    with pytest.raises(InvalidScanError, match="3 NaN/inf voxels"):
        check_volume(vol, value_range)


def test_body_box_on_the_mask_grid_equals_the_full_resolution_box(tmp_path):
    generate_dataset(tmp_path / "raw", 2, "nifti", seed=2, shape_xy=128)
    import nibabel as nib

    for path in sorted((tmp_path / "raw").rglob("*.nii.gz")):
        vol = np.asarray(nib.load(path).dataobj, dtype=np.float32).transpose(2, 1, 0)
        for margin in (0, 4):
            assert body_box(vol, margin) == body_bbox(body_mask(vol), margin)
        odd = vol[:, :125, :110]  # sizes that leave a remainder block at the far edge
        assert body_box(odd, 3) == body_bbox(body_mask(odd), 3)
    air = np.full((3, 40, 40), -1024.0, np.float32)
    assert body_box(air) == body_bbox(body_mask(air)) == (0, 40, 0, 40)


@pytest.mark.parametrize("seed", range(6))
def test_body_box_skips_hole_filling_without_moving_the_box(seed):
    """body_box leaves out the hole filling (a hole lies inside its slice's box): random bodies with rings,
    lungs, islands and border contact give the box of the full mask."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.normal(size=(6, 96, 96)), (0.5, 4, 4))
    vol = np.where(noise > np.quantile(noise, 0.55), 40.0, -1000.0).astype(np.float32)
    vol[:, 30:60, 30:60] = np.where(vol[:, 30:60, 30:60] > 0, -900.0, 40.0)  # inverted core: holes and rings
    for margin in (0, 5):
        assert body_box(vol, margin) == body_bbox(body_mask(vol), margin)


@pytest.mark.parametrize(("side", "size"), [(412, 256), (97, 48), (40, 64), (64, 64)])
def test_pillow_resize_matches_torch_antialiased_bilinear(side, size):
    x = np.random.default_rng(side).normal(0, 300, (3, side, side)).astype(np.float32)
    ours = resize_hu_slices(x, size)
    ref = resize_slices(torch.from_numpy(x), size).numpy()
    assert ours.shape == ref.shape == (3, size, size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("cfg", [CFG, PreprocessConfig(size=40, normalisation="zscore", zscore=ZScoreNorm())])
def test_preprocess_volume_does_not_depend_on_its_chunking(cfg, monkeypatch):
    rng = np.random.default_rng(1)
    vol = np.full((19, 80, 80), -1000, np.int16)
    vol[:, 10:70, 15:60] = rng.normal(40, 80, (19, 60, 45)).astype(np.int16)
    chunked, box, side = preprocess_volume(vol, cfg)
    monkeypatch.setattr(stage_module, "_CHUNK_SLICES", 1000)
    whole, box2, side2 = preprocess_volume(vol, cfg)
    assert (box, side) == (box2, side2) and chunked.dtype == whole.dtype
    np.testing.assert_array_equal(chunked, whole)


def test_float16_cast_without_torch_rounds_as_torch_does():
    from slicefm.preprocess import windows

    x = np.random.default_rng(3).normal(0, 3, 20_000).astype(np.float32)
    x[:6] = [70000.0, -70000.0, 1e-8, 6.1e-5, 65519.0, 0.1]  # overflow, subnormal, the largest finite, ties
    ref = torch.from_numpy(x).to(torch.float16).numpy()
    out = np.empty(x.shape, np.float16)
    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(__import__("sys").modules, "torch")  # as in a worker that never imported torch
        windows._to_float16(x, out)
    np.testing.assert_array_equal(out.view(np.uint16), ref.view(np.uint16))


@pytest.mark.parametrize(("side", "size"), [(412, 256), (64, 32), (100, 224), (97, 64)])
def test_masks_resize_as_torch_nearest_exact_in_c_order(side, size):
    masks = {"organ": np.random.default_rng(side).integers(0, 5, (3, side, side)).astype(np.uint8)}
    out = stage_module.resize_masks(masks, (0, side, 0, side), size)["organ"]
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(masks["organ"]).unsqueeze(1), size=(size, size), mode="nearest-exact"
    ).squeeze(1)
    np.testing.assert_array_equal(out, ref.numpy())
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]  # the loader reads rows of the saved mask
