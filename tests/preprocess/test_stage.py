"""The preprocess stage on a small ingest output: stacks, slices.parquet, boxes, resume, S3, 5-cut, z-score."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from slicefm.core.shards import StackReader
from slicefm.core.store import open_store
from slicefm.data.ingest import write_manifests
from slicefm.preprocess.config import HUWindow, PreprocessConfig
from slicefm.preprocess.stage import read_slices, run_preprocess

H = W = 96
N = 12


def _volume(rng: np.random.Generator, with_table: bool = True) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    vol = np.full((N, H, W), -1000, np.int16)
    body = ((yy - 44) / 30.0) ** 2 + ((xx - 48) / 40.0) ** 2 < 1
    vol[:, body] = 40
    vol[:, 40:50, 30:45] = -850  # lung-like hole inside the body
    if with_table:
        vol[:, 88:91, 5:91] = 300  # a table bar below the body, not connected
    return (vol + rng.normal(0, 5, vol.shape)).astype(np.int16)


def make_ingest(root_uri: str, n_scans: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    store = open_store(root_uri)
    rows = []
    for i in range(n_scans):
        sid = f"S{i:016x}"
        store.write_npy(f"volumes/{sid}.npy", _volume(rng))
        rows.append(
            dict(
                scan_id=sid,
                patient_id=f"P{i:016x}",
                cohort="t",
                format="dicom",
                source=f"s{i}",
                volume=f"volumes/{sid}.npy",
                modality="CT",
                n_slices=N,
                height=H,
                width=W,
                spacing_z_mm=2.5,
                spacing_y_mm=0.8,
                spacing_x_mm=0.8,
                split="train",
                scanner="",
                label_liver=i % 2,
            )
        )
    lesions = pd.DataFrame(
        [
            dict(
                scan_id="S" + "0" * 16,
                lesion_index=0,
                key_slice=5,
                x0=40.0,
                y0=30.0,
                x1=56.0,
                y1=46.0,
                lesion_type=4,
                lesion_name="liver",
            )
        ]
    )
    write_manifests(store, pd.DataFrame(rows), lesions, pd.DataFrame(columns=["file", "reason"]))
    return pd.DataFrame(rows)


def test_stacks_index_and_boxes(tmp_path):
    make_ingest(str(tmp_path / "ing"))
    cfg = PreprocessConfig(size=64, workers=1, n_shards=2)
    res = run_preprocess(str(tmp_path / "ing"), str(tmp_path / "pre"), cfg)
    assert (res.n_scans, res.n_slices, res.channels) == (3, 3 * N, ["abdomen", "lung"])
    out = open_store(str(tmp_path / "pre"))
    slices = read_slices(out)
    assert set(slices["shard"]) <= {0, 1}
    # 2.5 mm slices -> round(12 / 2.5) = 5 per slab.
    first = slices[slices.scan_id == "S" + "0" * 16]
    assert first["slab_id"].tolist() == [0] * 5 + [1] * 5 + [2] * 2
    assert np.allclose(first["z_mm"], np.arange(N) * 2.5)
    stack = StackReader(out).read_stack(first["stack"].iloc[0])
    assert stack.shape == (N, 2, 64, 64) and stack.dtype == np.uint8
    # The body (40 HU) is mid-grey in the abdomen window, the lung hole black there and grey in the lung window.
    assert stack[:, 0].max() >= 120 and stack[:, 0].min() == 0
    # The crop removed the table and kept the whole body: the border rows are air in every slice.
    assert stack[:, 0, -1, :].max() < 10  # abdomen window: air = 0, the 300 HU table would be 255
    key = first[first.is_key_slice]
    assert key["slice_index"].tolist() == [5]
    (box,) = json.loads(key["lesion_boxes"].iloc[0])
    crop = out.read_json("index/" + "S" + "0" * 16 + ".crop.json")
    scale = 64 / crop["crop_side"]
    assert box[0] == pytest.approx((40 - crop["crop_x0"]) * scale, abs=0.02)
    assert box[3] == pytest.approx((46 - crop["crop_y0"]) * scale, abs=0.02)
    assert box[4] == 4
    meta = out.read_json("preprocess.json")
    assert meta["channels"] == ["abdomen", "lung"] and meta["n_slices"] == 3 * N


def test_rerun_skips_finished_scans_and_redoes_missing_ones(tmp_path):
    make_ingest(str(tmp_path / "ing"))
    cfg = PreprocessConfig(size=32, workers=1)
    run_preprocess(str(tmp_path / "ing"), str(tmp_path / "pre"), cfg)
    victim = next((tmp_path / "pre" / "index").glob("*.parquet"))
    victim.unlink()  # as if killed between stack and index
    res = run_preprocess(str(tmp_path / "ing"), str(tmp_path / "pre"), cfg)
    assert res.n_skipped == 2 and res.n_slices == 3 * N
    assert not list((tmp_path / "pre").rglob("*.tmp*"))


def test_a_rerun_with_other_settings_recomputes_instead_of_keeping_stale_scans(tmp_path, caplog):
    """Resume keeps finished scans only when they were made with the same settings from the same ingest
    output: a changed size recomputes every scan (and says what changed); the same settings again resume."""
    make_ingest(str(tmp_path / "ing"))
    pre = str(tmp_path / "pre")
    run_preprocess(str(tmp_path / "ing"), pre, PreprocessConfig(size=32, workers=1))
    with caplog.at_level(logging.WARNING, logger="slicefm.core.resume"):
        res = run_preprocess(str(tmp_path / "ing"), pre, PreprocessConfig(size=48, workers=2))
    assert res.n_skipped == 0 and "different config; recomputing" in caplog.text
    stacks = [np.load(p) for p in sorted((tmp_path / "pre" / "shards").rglob("*.npy"))]
    assert stacks and all(s.shape[-1] == 48 for s in stacks)  # nothing of the 32 px run survives
    again = run_preprocess(str(tmp_path / "ing"), pre, PreprocessConfig(size=48, workers=1))  # workers: no
    assert again.n_skipped == 3  # same work: resumed


def test_parallel_workers_match_serial(tmp_path):
    make_ingest(str(tmp_path / "ing"))
    a = run_preprocess(str(tmp_path / "ing"), str(tmp_path / "a"), PreprocessConfig(size=32, workers=1))
    b = run_preprocess(str(tmp_path / "ing"), str(tmp_path / "b"), PreprocessConfig(size=32, workers=2))
    assert a.n_slices == b.n_slices
    sa, sb = read_slices(open_store(a.out_uri)), read_slices(open_store(b.out_uri))
    pd.testing.assert_frame_equal(sa, sb)
    for key in sa["stack"].unique():
        assert np.array_equal(np.load(tmp_path / "a" / key), np.load(tmp_path / "b" / key))


def test_zscore_native_size_and_custom_window(tmp_path):
    make_ingest(str(tmp_path / "ing"), n_scans=1)
    cfg = PreprocessConfig(normalisation="zscore", size=None, body_crop=False, workers=1)
    run_preprocess(str(tmp_path / "ing"), str(tmp_path / "z"), cfg)
    out = open_store(str(tmp_path / "z"))
    stack = np.load(tmp_path / "z" / read_slices(out)["stack"].iloc[0])
    assert stack.shape == (N, 1, H, W) and stack.dtype == np.float16
    assert float(stack.min()) == pytest.approx((-997 + 142.39) / 360.97, abs=1e-2)
    cfg = PreprocessConfig(windows=[HUWindow(name="bone", lo=-500, hi=1300)], size=32, workers=1)
    res = run_preprocess(str(tmp_path / "ing"), str(tmp_path / "w"), cfg)
    assert res.channels == ["bone"]


def test_five_cut_tiles(tmp_path):
    make_ingest(str(tmp_path / "ing"), n_scans=1)
    res = run_preprocess(
        str(tmp_path / "ing"), str(tmp_path / "t"), PreprocessConfig(size=32, five_cut=True, workers=1)
    )
    out = open_store(res.out_uri)
    stack = np.load(tmp_path / "t" / read_slices(out)["stack"].iloc[0])
    assert stack.shape == (N, 5, 2, 32, 32)
    assert out.read_json("preprocess.json")["layout"] == "[slice, tile, channel, H, W]"


def test_reads_and_writes_s3(tmp_path, s3_env):
    make_ingest(f"{s3_env}/ing", n_scans=2)
    res = run_preprocess(f"{s3_env}/ing", f"{s3_env}/pre", PreprocessConfig(size=32, workers=1))
    assert res.out_uri.startswith("s3://") and res.n_slices == 2 * N
    out = open_store(res.out_uri)
    slices = read_slices(out)
    reader = StackReader(out)
    row = slices.iloc[7]
    one = reader.read_slice(row["stack"], int(row["row"]))
    whole = reader.read_stack(row["stack"])
    assert one.shape == (2, 32, 32) and np.array_equal(one, whole[int(row["row"])])
