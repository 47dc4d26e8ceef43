"""The data step: a raw phantom DICOM dataset -> pseudonymised manifests and slice stacks, in one pass,
with the two MLflow stage runs its record steps log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from components.ingest_preprocess import ingest_preprocess
from components.tracking import record_stage
from slicefm.config import config_from_yaml
from slicefm.data.pseudonym import key_fingerprint, load_key
from slicefm.phantom.dataset import generate_dataset
from tests.components.conftest import component_config, dataset, stage_runs


@pytest.fixture(scope="module")
def raw_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 phantom scans (2 patients) at 64 px, plus a stray non-DICOM file to quarantine."""
    root = generate_dataset(tmp_path_factory.mktemp("raw") / "dicom", 3, "dicom", seed=3, shape_xy=64)
    (root / "notes.txt").write_text("not a scan")
    return root


def test_data_step_writes_pseudonymised_manifests_and_slice_stacks(raw_dicom, tmp_path, tracking_uri, parent_run):
    config_yaml = component_config(tmp_path, "data-test")  # 32 px, abdomen + lung, 2 shards
    scans, slices = dataset(tmp_path, "scans"), dataset(tmp_path, "slices")
    n = ingest_preprocess.python_func(
        config_yaml=config_yaml, data_source=str(raw_dicom), store_uri="", data_version="md5:1234", scans=scans,
        slices=slices,
    )  # fmt: skip
    # Ingest's output: manifests, no canonical volumes (ingest.keep_volumes is false by default).
    out = Path(scans.path)
    table = pd.read_parquet(out / "scans.parquet")
    assert len(table) == 3 and not (out / "volumes").exists() and set(table["volume"]) == {""}
    assert scans.metadata == {"uri": scans.path, "n_scans": 3, "n_quarantined": 1, "data_version": "md5:1234"}
    quarantined = pd.read_csv(out / "quarantine.csv")
    assert list(quarantined["file"]) == ["notes.txt"] and "not a DICOM" in quarantined["reason"][0]
    raw_ids = {pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in raw_dicom.rglob("*.dcm")}
    assert len(raw_ids) == 2 and table["patient_id"].nunique() == 2
    assert not raw_ids & set(table["patient_id"]) and all(s.startswith("S") for s in table["scan_id"])
    summary = json.loads((out / "dataset.json").read_text())
    assert (summary["n_scans"], summary["n_quarantined"], summary["data_version"]) == (3, 1, "md5:1234")
    assert summary["volumes"] is False
    assert config_from_yaml((out / "config.yaml").read_text()) == config_from_yaml(config_yaml)
    # Preprocess's output: every scan with all its slices, stacked [slice, channel, 32, 32] in 2 shards.
    pre = Path(slices.path)
    sl = pd.read_parquet(pre / "slices.parquet")
    meta = json.loads((pre / "preprocess.json").read_text())
    assert n == len(sl) == meta["n_slices"] == table["n_slices"].sum()
    assert slices.metadata == {"uri": slices.path, "n_slices": n, "channels": "abdomen,lung"}
    assert sl.groupby("scan_id").size().sort_index().to_dict() == table.set_index("scan_id")["n_slices"].to_dict()
    for stack, rows in sl.groupby("stack"):
        array = np.load(pre / stack, mmap_mode="r")
        assert array.shape == (len(rows), 2, 32, 32) and array.dtype == np.uint8 and array.max() > 0
    shards = {p.name for p in (pre / "shards").iterdir()}
    assert {Path(k).parent.name for k in sl["stack"]} == shards and shards <= {"shard-000", "shard-001"}
    # The two stage runs under the pipeline's parent, logged by the record steps from the step's records.
    for output, stage in ((scans, "ingest"), (slices, "preprocess")):
        assert record_stage.python_func(tracking_uri=tracking_uri, parent_run_id=parent_run, output=output) == stage
    runs = stage_runs(tracking_uri, parent_run)
    ing, prep = runs["ingest"], runs["preprocess"]
    assert ing.info.status == prep.info.status == "FINISHED"
    assert ing.data.metrics["n_scans"] == 3 and ing.data.metrics["n_quarantined"] == 1
    assert ing.data.params["data_version"] == "md5:1234" and ing.data.params["pass"] == "fused"
    assert ing.data.params["pseudonym_key_fingerprint"] == key_fingerprint(load_key())
    assert ing.data.tags["slicefm.output"] == scans.path and ing.data.tags["slicefm.cached"] == "false"
    assert prep.data.params["size"] == "32" and (prep.data.metrics["n_slices"], prep.data.metrics["n_scans"]) == (n, 3)


def test_data_step_of_other_cohorts_writes_to_the_store_under_their_stages(raw_dicom, tmp_path, tracking_uri, parent_run):
    config_yaml = component_config(tmp_path, "data-test", ingest={"keep_volumes": True})  # no pretrain_data
    store = tmp_path / "store"
    scans, slices = dataset(tmp_path, "scans-b"), dataset(tmp_path, "slices-b")
    n = ingest_preprocess.python_func(
        config_yaml=config_yaml, data_source=str(raw_dicom), store_uri=str(store), data_version="", scans=scans,
        slices=slices, cohort="b",
    )  # fmt: skip
    # With a store the data goes to <store>/cache/<stage>/<content hash> (no run name: a later run with the
    # same data and settings is a cache hit pointing there) and the artifacts only point there.
    (ing,) = (store / "cache" / "ingest-b").iterdir()
    (pre,) = (store / "cache" / "preprocess-b").iterdir()
    assert scans.metadata["uri"] == f"{store}/cache/ingest-b/{ing.name}"
    assert slices.metadata["uri"] == f"{store}/cache/preprocess-b/{pre.name}"
    assert not Path(scans.path).exists() and not Path(slices.path).exists()
    assert len(pd.read_parquet(pre / "slices.parquet")) == n > 0
    # keep_volumes: the canonical volumes too, so preprocess could re-run alone on this ingest output.
    table = pd.read_parquet(ing / "scans.parquet")
    for row in table.itertuples():
        assert np.load(ing / row.volume, mmap_mode="r").shape == (row.n_slices, row.height, row.width)
    for output in (scans, slices):
        record_stage.python_func(tracking_uri=tracking_uri, parent_run_id=parent_run, output=output)
    assert set(stage_runs(tracking_uri, parent_run)) == {"ingest-b", "preprocess-b"}
    with pytest.raises(ValueError, match="pretrain_data"):
        ingest_preprocess.python_func(
            config_yaml=config_yaml, data_source=str(raw_dicom), store_uri=str(store), data_version="",
            scans=dataset(tmp_path, "p"), slices=dataset(tmp_path, "p-slices"), cohort="p",
        )  # fmt: skip
    assert not (store / "cache" / "ingest-p").exists()
