"""The data step (ingest + preprocess) on a cluster reads data it fetches itself: a `dvc pull` of a data.dvc revision from the DVC
remote, or an s3:// prefix; the lineage names the version of what it read (a real DVC and a loopback S3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.ingest_preprocess import ingest_preprocess
from slicefm.config import (
    DataConfig,  # noqa: I001 (moves to slicefm.data.config with issue 16.1)
    PipelineConfig,
)
from slicefm.core.store import open_store
from slicefm.edge.data_fetch import DataFetchError, fetch_source
from slicefm.edge.pipeline_data import ensure_demo_data
from slicefm.edge.stages import data_config_yaml
from tests.components.conftest import dataset

DVC = str(Path(sys.executable).with_name("dvc"))
PHANTOM = DataConfig(phantom_scans=2, phantom_size=64)


def _dvc(repo: Path, *args: str) -> None:
    res = subprocess.run([DVC, *args], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.fixture
def dvc_env(tmp_path, monkeypatch, s3_env):
    for var, sub in (("DVC_GLOBAL_CONFIG_DIR", "dvc-global"), ("DVC_SITE_CACHE_DIR", "dvc-site")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return s3_env


def _config() -> str:
    return data_config_yaml(
        PipelineConfig(data={"source": "unused", "format": "dicom"}, ingest={"workers": 1}, preprocess={"size": 32})
    )


def test_ingest_pulls_a_dvc_revision_and_records_its_md5(dvc_env, tmp_path, s3_server):
    repo = tmp_path / "checkout"
    ensure_demo_data(PHANTOM, repo / "data" / "demo")
    _dvc(repo, "init", "--no-scm", "-q")
    _dvc(repo, "add", "data")
    remote = f"{dvc_env}/dvcstore"
    _dvc(repo, "remote", "add", "-d", "origin", remote)
    _dvc(repo, "remote", "modify", "origin", "endpointurl", s3_server)
    _dvc(repo, "push")
    dvc_file = (repo / "data.dvc").read_text()
    md5 = yaml.safe_load(dvc_file)["outs"][0]["md5"]

    workspace = tmp_path / "pvc"  # as a mounted volume: the second step reuses the pull
    outputs = []
    for i in range(2):
        scans = dataset(tmp_path, f"scans-{i}")
        ingest_preprocess.python_func(
            config_yaml=_config(), data_source="data/demo", store_uri="", data_version="", scans=scans,
            slices=dataset(tmp_path, f"slices-{i}"), dvc_file=dvc_file, dvc_remote=remote, workspace=str(workspace),
        )  # fmt: skip
        assert scans.metadata["n_scans"] == 2 and scans.metadata["data_version"] == f"dvc-md5:{md5}"
        assert json.loads((Path(scans.path) / "dataset.json").read_text())["data_version"] == f"dvc-md5:{md5}"
        outputs.append(scans)
        if i == 0:
            pulled = next(workspace.glob("dvc-*"))
            stamp = (pulled / ".slicefm-fetched.json").stat().st_mtime_ns
    assert (pulled / ".slicefm-fetched.json").stat().st_mtime_ns == stamp  # pulled once
    same = [open_store(o.path).read_parquet("scans.parquet")["scan_id"].tolist() for o in outputs]
    assert same[0] == same[1]

    with pytest.raises(DataFetchError, match="a path inside data/"):
        fetch_source("elsewhere/demo", tmp_path / "ws", dvc_file=dvc_file, dvc_remote=remote)
    with pytest.raises(DataFetchError, match="needs the DVC remote"):
        fetch_source("data/demo", tmp_path / "ws", dvc_file=dvc_file)


def test_ingest_reads_an_s3_prefix_and_versions_what_it_read(s3_env, tmp_path):
    local = ensure_demo_data(PHANTOM, tmp_path / "raw")
    store = open_store(f"{s3_env}/datasets/demo")
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload_file(f, f.relative_to(local).as_posix())
    scans = dataset(tmp_path, "scans")
    ingest_preprocess.python_func(
        config_yaml=_config(), data_source=f"{s3_env}/datasets/demo", store_uri="", data_version="release-1",
        scans=scans, slices=dataset(tmp_path, "slices"),
    )  # fmt: skip
    version = scans.metadata["data_version"]
    assert scans.metadata["n_scans"] == 2 and version.startswith("s3-sha256:")
    again = fetch_source(f"{s3_env}/datasets/demo", tmp_path / "ws")
    assert again.version == version  # the same objects: the same version
    first = store.list()[0]
    store.write_bytes(first, store.read_bytes(first) + b"\0")
    assert fetch_source(f"{s3_env}/datasets/demo", tmp_path / "ws").version != version
    with pytest.raises(DataFetchError, match="no objects under this prefix"):
        fetch_source(f"{s3_env}/nothing-here", tmp_path / "ws")
