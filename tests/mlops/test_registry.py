"""Model registry end to end on loopback: a real `mlflow server` (sqlite) proxying artifacts to moto S3.

Register an encoder and a head, alias, list, pull by alias/version/latest, byte-identical files verified
against MANIFEST.json, tampering detected, unknown versions reported, preflight checks. The registered
pyfunc models load and predict in a fresh virtualenv where slicefm is not installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import mlflow
import mlflow.artifacts
import numpy as np
import pytest
import torch
import yaml
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from packaging.utils import canonicalize_name

from slicefm.edge.cli import main
from slicefm.edge.tracking.mlflow_runs import TrackingError, _global_tracking_uri
from slicefm.edge.tracking.models import (
    MANIFEST_NAME,
    ModelIntegrityError,
    ModelRegistryError,
    download_encoder,
    list_models,
    pull_model,
    set_alias,
    verify_manifest,
)
from slicefm.edge.tracking.preflight import PreflightError, check_store, check_tracking_server
from slicefm.edge.tracking.registry import (
    ENCODER_REQUIREMENTS,
    pinned_requirements,
    register_encoder,
    register_head,
)
from slicefm.models.encoders import create_encoder
from slicefm.models.export_format import export_encoder, load_encoder
from tests.mlops.fresh_env import distribution_closure, make_venv, requirement_names, run_probe

ENCODER = "mlops-test-encoder"
HEAD = "mlops-test-head"
IMAGE = "registry.example.org/team/slicefm:abc1234"


@dataclass(frozen=True)
class Registered:
    uri: str
    encoder_dir: Path
    head_dir: Path
    v1: str
    v2: str
    head_version: str


@pytest.fixture(scope="module")
def tracking(mlflow_server: str) -> Iterator[str]:
    """Point MLflow's fluent API at the live server for this module, then restore."""
    with _global_tracking_uri(mlflow_server):
        yield mlflow_server


def _export(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    enc = create_encoder("vit_tiny_test", 32, 1)
    meta = {
        "method": "moco",
        "config": {"seed": seed},
        "data_version": "c0fa0a6a.dir",
        "git_commit": "0123abc",
    }
    export_encoder(enc, str(out), meta)
    return out


@pytest.fixture(scope="module")
def registered(tracking: str, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """Two encoder versions (v1 gets alias `champion`) and one head, in one experiment on the server."""
    tmp = tmp_path_factory.mktemp("registry")
    enc1, enc2 = _export(tmp / "enc1", 1), _export(tmp / "enc2", 2)
    head = tmp / "head"
    (head / "fold0").mkdir(parents=True)
    (head / "head.safetensors").write_bytes(bytes(range(256)) * 8)
    (head / "fold0" / "thresholds.json").write_text('{"nodule": 0.41}\n')
    exp = MlflowClient(tracking).create_experiment("mlops-registry-test")
    with mlflow.start_run(experiment_id=exp):
        v1 = register_encoder(str(enc1), ENCODER, lineage={"image": IMAGE, "data_revision": "v1.0"})
        v2 = register_encoder(str(enc2), ENCODER)
        hv = register_head(head, HEAD, lineage={"config_hash": "feedbeef0001", "encoder": f"{ENCODER}:{v1}"})
    set_alias(ENCODER, v1, "champion", tracking)
    return Registered(tracking, enc1, head, v1, v2, hv)


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_register_sets_lineage_tags_and_manifest(registered: Registered) -> None:
    mv = MlflowClient(registered.uri).get_model_version(ENCODER, registered.v1)
    assert mv.tags["slicefm.image"] == IMAGE
    assert mv.tags["slicefm.data_version"] == "c0fa0a6a.dir"  # from encoder.json
    assert mv.tags["slicefm.git_commit"] == "0123abc"
    assert mv.tags["slicefm.data_revision"] == "v1.0"
    assert len(mv.tags["slicefm.config_hash"]) == 12
    assert len(mv.tags["slicefm.manifest_sha256"]) == 64
    assert "slicefm.image" not in MlflowClient(registered.uri).get_model_version(ENCODER, registered.v2).tags


def test_cli_list_shows_versions_aliases_lineage(registered: Registered, capsys) -> None:
    assert main(["models", "list", "--tracking-uri", registered.uri]) == 0
    out = capsys.readouterr().out
    line_v1 = next(ln for ln in out.splitlines() if ln.startswith(ENCODER) and f" {registered.v1} " in ln)
    assert "champion" in line_v1 and f"image={IMAGE}" in line_v1 and "encoder" in line_v1
    assert any(ln.startswith(HEAD) for ln in out.splitlines())
    rows = list_models(registered.uri)
    assert [(r.name, r.version) for r in rows if r.name == ENCODER] == [
        (ENCODER, registered.v2),
        (ENCODER, registered.v1),
    ]


def test_cli_pull_by_alias_is_byte_identical_and_verified(
    registered: Registered, tmp_path: Path, capsys
) -> None:
    dest = tmp_path / "champion"
    rc = main(
        ["models", "pull", f"{ENCODER}@champion", "--dest", str(dest), "--tracking-uri", registered.uri]
    )
    assert rc == 0
    assert f"{ENCODER}:{registered.v1}" in capsys.readouterr().out
    _same_files(registered.encoder_dir, dest, ["encoder.safetensors", "encoder.json"])
    assert sorted(p.name for p in dest.iterdir()) == [
        MANIFEST_NAME,
        "encoder.json",
        "encoder.safetensors",
        "lineage.json",
    ]
    assert verify_manifest(dest) == ["encoder.json", "encoder.safetensors", "lineage.json"]
    lineage = json.loads((dest / "lineage.json").read_text())
    assert lineage["lineage"]["image"] == IMAGE and lineage["model_name"] == ENCODER
    # The pulled directory is a loadable encoder, equal to the registered one.
    pulled, _ = load_encoder(str(dest))
    original, _ = load_encoder(str(registered.encoder_dir))
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(pulled(x), original(x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_download_encoder_for_extraction(registered: Registered) -> None:
    """What `slicefm extract --encoder models:/NAME@ALIAS` loads: the registered encoder's directory."""
    got, _ = load_encoder(download_encoder(f"models:/{ENCODER}@champion"))
    original, _ = load_encoder(str(registered.encoder_dir))
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(got(x), original(x))
    with pytest.raises(FileNotFoundError, match="no encoder.json"):
        download_encoder(f"models:/{HEAD}/{registered.head_version}")


def test_pull_latest_and_explicit_version(registered: Registered, tmp_path: Path) -> None:
    latest = pull_model(ENCODER, tmp_path / "latest", registered.uri)
    assert latest.version == registered.v2
    _same_files(registered.encoder_dir.parent / "enc2", latest.path, ["encoder.safetensors"])
    first = pull_model(f"{ENCODER}:{registered.v1}", tmp_path / "v1", registered.uri)
    assert first.version == registered.v1 and first.lineage["image"] == IMAGE


def test_pull_head_directory(registered: Registered, tmp_path: Path) -> None:
    res = pull_model(HEAD, tmp_path / "head", registered.uri)
    assert res.files == ("fold0/thresholds.json", "head.safetensors", "lineage.json")
    _same_files(registered.head_dir, res.path, ["head.safetensors", "fold0/thresholds.json"])
    assert res.lineage == {"config_hash": "feedbeef0001", "encoder": f"{ENCODER}:{registered.v1}"}


def test_pull_unknown_version_fails_clearly(registered: Registered, tmp_path: Path, caplog) -> None:
    with pytest.raises(ModelRegistryError, match=rf"{ENCODER}:999 not found.*versions 1, 2.*champion"):
        pull_model(f"{ENCODER}:999", tmp_path / "x", registered.uri)
    with pytest.raises(ModelRegistryError, match="no registered model named 'no-such-model'"):
        pull_model("no-such-model@champion", tmp_path / "x", registered.uri)
    rc = main(
        ["models", "pull", f"{ENCODER}:999", "--dest", str(tmp_path / "x"), "--tracking-uri", registered.uri]
    )
    assert rc == 1 and f"{ENCODER}:999 not found" in caplog.text
    assert not (tmp_path / "x").exists()


def test_pull_refuses_existing_dest_without_force(registered: Registered, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        pull_model(ENCODER, dest, registered.uri)
    res = pull_model(ENCODER, dest, registered.uri, overwrite=True)
    assert not (dest / "old.txt").exists() and (res.path / "encoder.safetensors").is_file()


def _download_model(uri: str, name: str, version: str, dest: Path) -> Path:
    """The whole MLflow model directory of a version (MLmodel, code/, requirements, artifacts/)."""
    root = MlflowClient(uri).get_model_version_download_uri(name, version)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=root, dst_path=str(dest), tracking_uri=uri))


def test_registered_models_declare_signature_requirements_and_code(
    registered: Registered, tmp_path: Path
) -> None:
    encoder = _download_model(registered.uri, ENCODER, registered.v1, tmp_path / "encoder")
    mlmodel = yaml.safe_load((encoder / "MLmodel").read_text())
    assert json.loads(mlmodel["signature"]["inputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 32, 32]}}
    ]
    assert json.loads(mlmodel["signature"]["outputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 64]}}
    ]
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    assert "python_model" not in mlmodel["flavors"]["python_function"]  # models from code: no pickle
    example = Model.load(str(encoder)).load_input_example(str(encoder))
    assert example.shape == (2, 1, 32, 32) and example.dtype == np.float32
    requirements = (encoder / "requirements.txt").read_text().split()
    assert requirements == [f"mlflow=={mlflow.__version__}", *pinned_requirements(ENCODER_REQUIREMENTS)]
    assert (encoder / "code" / "slicefm" / "edge" / "tracking" / "pyfunc.py").is_file()
    head = _download_model(registered.uri, HEAD, registered.head_version, tmp_path / "head")
    assert "signature" not in yaml.safe_load((head / "MLmodel").read_text())
    assert (head / "requirements.txt").read_text().split() == [f"mlflow=={mlflow.__version__}"]
    for model in (encoder, head):
        assert "slicefm" not in (model / "requirements.txt").read_text() + (model / "conda.yaml").read_text()


def test_registered_models_load_and_predict_in_a_fresh_venv(registered: Registered, tmp_path: Path) -> None:
    """A consumer's environment: the encoder's declared requirements (with their dependencies; MLflow,
    the loader, is one of them) and nothing else. slicefm comes only from the code a model carries."""
    encoder = _download_model(registered.uri, ENCODER, registered.v1, tmp_path / "encoder")
    head = _download_model(registered.uri, HEAD, registered.head_version, tmp_path / "head")
    no_code = tmp_path / "no-code"  # control: the encoder model without the code it carries
    shutil.copytree(encoder, no_code)
    shutil.rmtree(no_code / "code", ignore_errors=True)
    meta = Model.load(str(no_code))
    meta.flavors["python_function"]["code"] = None
    meta.save(str(no_code / "MLmodel"))
    declared = requirement_names((encoder / "requirements.txt").read_text().splitlines())
    assert "slicefm" not in distribution_closure(declared)
    python = make_venv(tmp_path / "venv", declared)
    batch = np.random.default_rng(0).standard_normal((3, 1, 32, 32), dtype=np.float32)
    np.save(tmp_path / "batch.npy", batch)

    got = run_probe(python, "head", head, no_code, tmp_path / "out-head", cwd=tmp_path)
    assert got["slicefm_importable"] is False
    assert "No module named 'slicefm'" in got["no_code_error"]
    assert got["torch_imported"] is False  # the head model needs MLflow only
    assert "slicefm models pull" in got["head_predict_error"]

    got = run_probe(python, "encoder", encoder, tmp_path / "batch.npy", tmp_path / "out-encoder", cwd=tmp_path)
    assert got["slicefm_importable"] is False
    assert Path(got["slicefm_file"]) == encoder / "code" / "slicefm" / "__init__.py"
    outputs = np.load(tmp_path / "out-encoder" / "outputs.npz")
    reference, _ = load_encoder(str(registered.encoder_dir))
    with torch.no_grad():
        for x, y in ((outputs["example"], outputs["example_out"]), (batch, outputs["batch_out"])):
            np.testing.assert_allclose(y, reference(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_loading_an_encoder_imports_nothing_only_mlflow_brings(tmp_path: Path) -> None:
    """load_encoder + forward in a clean interpreter imports no distribution that the fresh venv above
    holds only as MLflow's dependency (pandas, pyarrow, sklearn...), nor kfp or boto3: what the encoder
    needs is declared. (Optional imports such as colorama may come along: the fresh venv lacks them.)"""
    enc = _export(tmp_path / "enc", 4)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from slicefm.models.export_format import load_encoder
        enc, meta = load_encoder({str(enc)!r})
        enc(torch.zeros(1, meta["in_chans"], meta["img_size"], meta["img_size"]))
        print(*sorted({{name.split(".")[0] for name in sys.modules}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    owners = packages_distributions()
    imported = {
        canonicalize_name(dist): module
        for module in proc.stdout.split()
        if module not in sys.stdlib_module_names
        for dist in owners.get(module, [])
    }
    assert {"torch", "timm", "safetensors", "numpy"} <= imported.keys()
    declared = distribution_closure(ENCODER_REQUIREMENTS)
    loader_only = set(distribution_closure(["mlflow"])) - set(declared)
    assert {"pandas", "pyarrow", "scikit-learn"} <= loader_only
    assert not {d: m for d, m in imported.items() if d in loader_only or d in ("kfp", "boto3")}


def _model_object_key(s3_admin, bucket: str, uri: str, name: str, version: str, filename: str) -> str:
    mv = MlflowClient(uri).get_model_version(name, version)
    # Over REST the version may carry only `source` (models:/m-<id>), not model_id.
    model_id = mv.model_id or mv.source.rstrip("/").rsplit("/", 1)[-1]
    keys = [
        obj["Key"]
        for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="mlflow/")
        for obj in page.get("Contents", [])
    ]
    (key,) = [k for k in keys if model_id in k and k.endswith(f"/artifacts/encoder/{filename}")]
    return key


@pytest.fixture
def tamperable(tracking: str, tmp_path: Path) -> tuple[str, str, Path]:
    """A fresh model of its own (tampering must not break the other tests' versions)."""
    enc = _export(tmp_path / "enc", 3)
    name = f"{ENCODER}-tamper-{tmp_path.name}"
    with mlflow.start_run(experiment_id=MlflowClient(tracking).create_experiment(name)):
        version = register_encoder(str(enc), name)
    return name, version, enc


def test_tampered_weights_fail_naming_the_file(
    registered: Registered, tamperable, s3_admin, mlflow_bucket: str, tmp_path: Path
) -> None:
    name, version, _ = tamperable
    key = _model_object_key(s3_admin, mlflow_bucket, registered.uri, name, version, "encoder.safetensors")
    data = bytearray(s3_admin.get_object(Bucket=mlflow_bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF  # same size, different content
    s3_admin.put_object(Bucket=mlflow_bucket, Key=key, Body=bytes(data))
    dest = tmp_path / "pulled"
    with pytest.raises(ModelIntegrityError, match=r"encoder\.safetensors: sha256 mismatch"):
        pull_model(f"{name}:{version}", dest, registered.uri)
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pulled")], "temp dir left behind"


def test_rewritten_manifest_is_caught_by_the_registry_record(
    registered: Registered, tamperable, s3_admin, mlflow_bucket: str, tmp_path: Path
) -> None:
    """Swapping a file *and* rewriting MANIFEST.json to match still fails: the registry holds its hash."""
    name, version, _ = tamperable
    weights_key = _model_object_key(
        s3_admin, mlflow_bucket, registered.uri, name, version, "encoder.safetensors"
    )
    manifest_key = _model_object_key(s3_admin, mlflow_bucket, registered.uri, name, version, MANIFEST_NAME)
    data = bytearray(s3_admin.get_object(Bucket=mlflow_bucket, Key=weights_key)["Body"].read())
    data[-1] ^= 0xFF
    manifest = json.loads(s3_admin.get_object(Bucket=mlflow_bucket, Key=manifest_key)["Body"].read())
    for entry in manifest["files"]:
        if entry["path"] == "encoder.safetensors":
            entry["sha256"] = hashlib.sha256(data).hexdigest()
    s3_admin.put_object(Bucket=mlflow_bucket, Key=weights_key, Body=bytes(data))
    s3_admin.put_object(
        Bucket=mlflow_bucket,
        Key=manifest_key,
        Body=(json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
    )
    with pytest.raises(
        ModelIntegrityError, match="MANIFEST.json differs from the one recorded in the registry"
    ):
        pull_model(f"{name}:{version}", tmp_path / "pulled", registered.uri)


def test_preflight_tracking_server(mlflow_server: str, closed_port: int) -> None:
    check_tracking_server(mlflow_server, timeout_s=5)
    with pytest.raises(TrackingError, match=rf"127\.0\.0\.1:{closed_port}.*unreachable"):
        check_tracking_server(f"http://127.0.0.1:{closed_port}", timeout_s=2)


def test_check_store_live_s3_and_local(s3_env: str, s3_admin, tmp_path: Path) -> None:
    check_store(f"{s3_env}/runs")
    bucket = s3_env.removeprefix("s3://")
    assert "Contents" not in s3_admin.list_objects_v2(Bucket=bucket), "probe object left behind"
    check_store(str(tmp_path / "store"))
    assert list((tmp_path / "store").iterdir()) == []


def test_check_store_unreachable_endpoint_fails_after_retries(
    s3_env: str, closed_port: int, monkeypatch: pytest.MonkeyPatch, requested_sleeps: list[float]
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(
        PreflightError, match=rf"{s3_env}/runs is not usable.*127\.0\.0\.1:{closed_port}.*unreachable"
    ):
        check_store(f"{s3_env}/runs", max_attempts=2, connect_timeout_s=1)
    assert len(requested_sleeps) == 1, requested_sleeps  # max_attempts=2: one back-off, then the error


def test_check_store_missing_bucket(s3_env: str) -> None:
    with pytest.raises(PreflightError, match="NoSuchBucket"):
        check_store("s3://no-such-bucket-slicefm/x", max_attempts=1)
