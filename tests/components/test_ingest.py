"""ingest: a raw phantom DICOM dataset -> pseudonymised volumes and manifests in the step's output artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from components.ingest import ingest
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


def test_ingest_writes_pseudonymised_volumes_and_manifests(raw_dicom, tmp_path, tracking_uri, parent_run):
    config_yaml = component_config(tmp_path, "ingest-test")
    scans = dataset(tmp_path, "scans")
    n = ingest.python_func(
        config_yaml=config_yaml, data_source=str(raw_dicom), store_uri="", data_version="md5:1234", scans=scans,
    )  # fmt: skip
    out = Path(scans.path)
    table = pd.read_parquet(out / "scans.parquet")
    assert n == len(table) == 3
    assert scans.metadata == {"uri": scans.path, "n_scans": 3, "n_quarantined": 1, "data_version": "md5:1234"}
    quarantined = pd.read_csv(out / "quarantine.csv")
    assert list(quarantined["file"]) == ["notes.txt"] and "not a DICOM" in quarantined["reason"][0]
    # Pseudonyms, never the headers' identifiers; one volume per scan with the scan's slices.
    raw_ids = {pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in raw_dicom.rglob("*.dcm")}
    assert len(raw_ids) == 2 and table["patient_id"].nunique() == 2
    assert not raw_ids & set(table["patient_id"]) and all(s.startswith("S") for s in table["scan_id"])
    for row in table.itertuples():
        volume = np.load(out / row.volume, mmap_mode="r")
        assert volume.shape == (row.n_slices, row.height, row.width) == (row.n_slices, 64, 64)
    summary = json.loads((out / "dataset.json").read_text())
    assert (summary["n_scans"], summary["n_quarantined"], summary["data_version"]) == (3, 1, "md5:1234")
    assert config_from_yaml((out / "config.yaml").read_text()) == config_from_yaml(config_yaml)
    # The stage run under the pipeline's parent, logged by the record step from the step's own record:
    # metrics, lineage params, where the output went.
    assert record_stage.python_func(tracking_uri=tracking_uri, parent_run_id=parent_run, output=scans) == "ingest"
    run = stage_runs(tracking_uri, parent_run)["ingest"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_scans"] == 3 and run.data.metrics["n_quarantined"] == 1
    assert run.data.params["data_version"] == "md5:1234"
    assert run.data.params["pseudonym_key_fingerprint"] == key_fingerprint(load_key())
    assert run.data.tags["slicefm.output"] == scans.path and run.data.tags["slicefm.cached"] == "false"


def test_ingest_cohorts_name_their_stage_and_need_their_section(
    raw_dicom, tmp_path, tracking_uri, parent_run
):
    config_yaml = component_config(tmp_path, "ingest-test")  # no pretrain_data section
    store = tmp_path / "store"
    scans = dataset(tmp_path, "scans-b")
    n = ingest.python_func(
        config_yaml=config_yaml, data_source=str(raw_dicom), store_uri=str(store), data_version="", scans=scans,
        cohort="b",
    )  # fmt: skip
    # With a store the data goes to <store>/cache/ingest-b/<content hash> (no run name: a later run with the
    # same data and settings is a cache hit pointing there) and the artifact only points there.
    (written,) = (store / "cache" / "ingest-b").iterdir()
    assert n == 3 and scans.metadata["uri"] == f"{store}/cache/ingest-b/{written.name}"
    assert len(pd.read_parquet(written / "scans.parquet")) == 3
    assert not Path(scans.path).exists()
    record_stage.python_func(tracking_uri=tracking_uri, parent_run_id=parent_run, output=scans)
    assert set(stage_runs(tracking_uri, parent_run)) == {"ingest-b"}
    with pytest.raises(ValueError, match="pretrain_data"):
        ingest.python_func(
            config_yaml=config_yaml, data_source=str(raw_dicom), store_uri=str(store), data_version="",
            scans=dataset(tmp_path, "p"), cohort="p",
        )  # fmt: skip
    assert not (store / "cache" / "ingest-p").exists()
