"""Model specs, manifests and lineage without a server (the live registry is in test_registry.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slicefm.edge.cli import build_parser, main
from slicefm.edge.tracking.models import (
    MANIFEST_NAME,
    ModelIntegrityError,
    ModelSpec,
    clean_lineage,
    edge_lineage,
    lineage_tags,
    parse_spec,
    verify_manifest,
    write_manifest,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("enc", ModelSpec("enc")),
        ("demo-encoder@champion", ModelSpec("demo-encoder", alias="champion")),
        ("demo-encoder:3", ModelSpec("demo-encoder", version="3")),
        ("demo-encoder:007", ModelSpec("demo-encoder", version="7")),
    ],
)
def test_parse_spec(spec: str, expected: ModelSpec) -> None:
    assert parse_spec(spec) == expected
    assert str(expected) in (spec, "demo-encoder:7")


@pytest.mark.parametrize("bad", ["", "enc:", "enc:latest", "enc:0", "@champion", "enc@", "a/b", "x'y"])
def test_parse_spec_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="model spec"):
        parse_spec(bad)


def _payload(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (root / "sub" / "config.json").write_text('{"a": 1}\n')
    return root


def test_manifest_roundtrip(tmp_path: Path) -> None:
    root = _payload(tmp_path / "m")
    sha = write_manifest(root)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert [f["path"] for f in manifest["files"]] == ["sub/config.json", "weights.bin"]
    assert manifest["files"][1]["size"] == 2000
    assert verify_manifest(root, sha) == ["sub/config.json", "weights.bin"]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda r: (r / "weights.bin").write_bytes(b"\x00\x02" * 1000), r"weights\.bin: sha256 mismatch"),
        (lambda r: (r / "weights.bin").write_bytes(b"\x00"), r"weights\.bin: size 1 bytes, expected 2000"),
        (lambda r: (r / "sub" / "config.json").unlink(), r"sub/config\.json: missing"),
        (lambda r: (r / "extra.py").write_text("import os"), r"extra\.py: not listed in MANIFEST\.json"),
        (lambda r: (r / MANIFEST_NAME).unlink(), r"MANIFEST\.json missing"),
    ],
)
def test_manifest_detects_tampering(tmp_path: Path, tamper, message: str) -> None:
    root = _payload(tmp_path / "m")
    write_manifest(root)
    tamper(root)
    with pytest.raises(ModelIntegrityError, match=rf"enc:1: .*{message}"):
        verify_manifest(root, label="enc:1")


def test_manifest_hash_must_match_registry_record(tmp_path: Path) -> None:
    root = _payload(tmp_path / "m")
    write_manifest(root)
    with pytest.raises(ModelIntegrityError, match="differs from the one recorded in the registry"):
        verify_manifest(root, expected_sha256="0" * 64)


def test_lineage_cleaning_and_tags() -> None:
    lineage = clean_lineage({"git_commit": "abc", "image": None, "data_version": "", "config_hash": 12})
    assert lineage == {"git_commit": "abc", "config_hash": "12"}
    assert lineage_tags(lineage) == {"slicefm.git_commit": "abc", "slicefm.config_hash": "12"}
    with pytest.raises(ValueError, match="lineage key"):
        clean_lineage({"Bad Key": "x"})


def test_edge_lineage_reads_only_the_given_environment() -> None:
    env = {"SLICEFM_IMAGE": "reg/slicefm:abc", "SLICEFM_GIT_COMMIT": "0123"}
    assert edge_lineage(env) == {"image": "reg/slicefm:abc", "git_commit": "0123"}
    assert edge_lineage({}) == {}


def test_cli_has_models_verbs() -> None:
    args = build_parser().parse_args(["models", "pull", "enc@champion", "--dest", "/tmp/x", "--force"])
    assert (args.spec, args.dest, args.force) == ("enc@champion", "/tmp/x", True)
    assert build_parser().parse_args(["models", "list", "--json"]).json


@pytest.mark.parametrize("verb", [["list"], ["pull", "enc@champion", "--dest", "unused"]])
def test_cli_fails_fast_when_the_tracking_server_is_down(verb: list[str], closed_port: int, caplog) -> None:
    uri = f"http://127.0.0.1:{closed_port}"
    assert main(["models", *verb, "--tracking-uri", uri]) == 1
    assert f"{uri} unreachable" in caplog.text


def test_pull_resolves_the_model_in_the_given_registry_not_the_global_one(
    tmp_path: Path, monkeypatch
) -> None:
    """An explicit tracking URI wins over MLFLOW_TRACKING_URI (MLflow resolves models:/ URIs globally)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from slicefm.edge.tracking.mlflow_runs import _global_tracking_uri
    from slicefm.edge.tracking.models import pull_model
    from slicefm.edge.tracking.registry import register_head

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    head = _payload(tmp_path / "head")
    exp = MlflowClient(registry).create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    with _global_tracking_uri(registry), mlflow.start_run(experiment_id=exp):
        version = register_head(head, "h")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    pulled = pull_model(f"h:{version}", tmp_path / "pulled", registry)
    assert (pulled.path / "weights.bin").read_bytes() == (head / "weights.bin").read_bytes()


def test_encoder_signature_and_input_example_follow_encoder_json() -> None:
    import numpy as np

    from slicefm.edge.tracking.registry import encoder_input_example, encoder_signature

    meta = {"encoder": "vit_conv_base", "in_chans": 3, "img_size": 48, "embed_dim": 768}
    signature = encoder_signature(meta)
    (inputs,), (outputs,) = signature.inputs.inputs, signature.outputs.inputs
    assert (inputs.type, inputs.shape) == (np.dtype("float32"), (-1, 3, 48, 48))
    assert (outputs.type, outputs.shape) == (np.dtype("float32"), (-1, 768))
    example = encoder_input_example(meta)
    assert example.shape == (2, 3, 48, 48) and example.dtype == np.float32
    assert encoder_input_example({**meta, "img_size": [32, 64]}, n=1).shape == (1, 3, 32, 64)


def test_pinned_requirements_use_the_public_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's local label (+cu130) names a build only the PyTorch index serves; pins are index-neutral."""
    import importlib.metadata

    from slicefm.edge.tracking.registry import pinned_requirements

    versions = {"torch": "2.14.1+cu130", "timm": "1.0.31"}
    monkeypatch.setattr(importlib.metadata, "version", versions.__getitem__)
    assert pinned_requirements(["torch", "timm"]) == ["torch==2.14.1", "timm==1.0.31"]
