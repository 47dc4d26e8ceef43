"""preprocess: an ingest output -> windowed, cropped, resized slice stacks and slices.parquet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.preprocess import preprocess
from components.tracking import record_stage
from tests.components.conftest import component_config, dataset, stage_runs


def test_preprocess_writes_one_stack_per_scan_and_skips_finished_scans_on_retry(
    ingested, tmp_path, tracking_uri, parent_run
):
    config_yaml = component_config(tmp_path, "preprocess-test")  # 32 px, abdomen + lung, 2 shards
    scans = dataset(tmp_path, "scans", uri=ingested)
    slices = dataset(tmp_path, "slices")

    def run() -> int:
        return preprocess.python_func(config_yaml=config_yaml, store_uri="", scans=scans, slices=slices)

    n = run()
    out = Path(slices.path)
    table = pd.read_parquet(out / "slices.parquet")
    meta = json.loads((out / "preprocess.json").read_text())
    assert n == len(table) == meta["n_slices"] > 0
    assert slices.metadata == {"uri": slices.path, "n_slices": n, "channels": "abdomen,lung"}
    assert meta["channels"] == ["abdomen", "lung"]
    # Every ingested scan keeps all its slices, stacked [slice, channel, 32, 32] in one of the 2 shards.
    ingested_scans = pd.read_parquet(Path(ingested) / "scans.parquet").set_index("scan_id")["n_slices"]
    assert table.groupby("scan_id").size().sort_index().to_dict() == ingested_scans.sort_index().to_dict()
    for stack, rows in table.groupby("stack"):
        array = np.load(out / stack, mmap_mode="r")
        assert array.shape == (len(rows), 2, 32, 32) and array.dtype == np.uint8 and array.max() > 0
        assert sorted(rows["row"]) == list(range(len(rows)))
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000", "shard-001"]
    record_stage.python_func(tracking_uri=tracking_uri, parent_run_id=parent_run, output=slices)
    run_ = stage_runs(tracking_uri, parent_run)["preprocess"]
    assert run_.info.status == "FINISHED" and run_.data.params["size"] == "32"
    assert (run_.data.metrics["n_slices"], run_.data.metrics["n_scans"]) == (n, len(ingested_scans))
    # A retried step finds every scan finished: nothing is rewritten, the same slices come back.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.npy")}
    assert run() == n
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.npy")} == stamps
    pd.testing.assert_frame_equal(pd.read_parquet(out / "slices.parquet"), table)


def test_preprocess_of_another_cohort_writes_to_the_store_under_its_stage(ingested, tmp_path):
    config_yaml = component_config(tmp_path, "preprocess-test")
    store = tmp_path / "store"
    slices = dataset(tmp_path, "slices-p")
    n = preprocess.python_func(
        config_yaml=config_yaml, store_uri=f"{store}/", scans=dataset(tmp_path, "scans", uri=ingested),
        slices=slices, cohort="p",
    )  # fmt: skip
    (written,) = (store / "cache" / "preprocess-p").iterdir()
    assert slices.metadata["uri"] == f"{store}/cache/preprocess-p/{written.name}" and not Path(slices.path).exists()
    assert len(pd.read_parquet(written / "slices.parquet")) == n > 0
