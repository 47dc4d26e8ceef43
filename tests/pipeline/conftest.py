"""The tiny pipeline config the local end-to-end runs share (8 phantom scans at 32-64 px, 4 pretraining steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slicefm.config import PipelineConfig, dump_config
from slicefm.data.pseudonym import KEY_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_inherited_pseudonym_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_local exports the key for its steps (os.environ); undo that after each test so every run
    resolves its own key under its SLICEFM_HOME (an empty value counts as unset)."""
    monkeypatch.setenv(KEY_ENV, "")


def bucket_keys(s3_admin, bucket: str, prefix: str, relative: bool = False) -> list[str]:  # noqa: ANN001
    """Sorted object keys under `prefix` (without the prefix when `relative`)."""
    pages = s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = (obj["Key"] for page in pages for obj in page.get("Contents", []))
    return sorted(k[len(prefix) :] if relative else k for k in keys)


def local_run_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A local pipeline run's environment under tmp_path (state folder, sqlite MLflow, local artifact store);
    returns the tracking URI."""
    tracking = f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    monkeypatch.setenv("SLICEFM_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.delenv("SLICEFM_STORE", raising=False)
    return tracking


def tiny_pipeline_config(
    tmp_path: Path, external: bool = True, pretrain_cohort: bool = False, supervised_ceiling: bool = False
) -> Path:
    """Write a CPU-sized pipeline config (demo-cpu's pretrain section, shrunk) under tmp_path; returns its path.

    Cohort A is generated into tmp_path/data, cohort B (when `external`) into tmp_path/external, the
    pretraining cohort P (when `pretrain_cohort`, 6 scans) into tmp_path/pretrain.
    """
    pretrain = yaml.safe_load((ROOT / "pipelines/configs/demo-cpu.yaml").read_text())["pretrain"]
    pretrain["encoder"]["img_size"] = 32
    pretrain["input_channels"] = "per_window"  # CLEAR: one single-channel image per HU window
    pretrain["lejepa"]["local_size"] = 16
    # The demo pretrains without auxiliary supervision; the pipeline tests keep DALE-CT's typed 2S path covered.
    pretrain["aux"] = {"mode": "2S", "alpha": 0.1, "lesion_classes": "typed", "freq_sample_scans": 16}
    pretrain["schedule"] = {"max_steps": 4, "warmup_steps": 1}
    pretrain["loader"] = {"batch_size": 8, "workers": 0}
    pretrain["logging"] = {"every_steps": 2, "collapse_every": 2, "collapse_batch": 8}
    pretrain["checkpoint"] = {"every_steps": 2}
    cfg = PipelineConfig.model_validate(
        {
            "pretrain": pretrain,
            "name": "t",
            "experiment": "pipeline-test",
            "data": {"source": str(tmp_path / "data"), "phantom_scans": 8, "phantom_size": 64},
            "ingest": {"workers": 1},
            "preprocess": {"size": 32, "workers": 1, "n_shards": 2},
            "extract": {"workers": 0, "batch_size": 64, "n_shards": 1},
            "evaluate": {
                "tasks": [
                    {"name": "location", "labels": ["location_*"], "protocols": ["abmil"]},
                    {"name": "findings", "labels": ["finding_*"], "windows": ["lung"], "protocols": ["probe"]},
                ],
                "splits": {"n_folds": 2},
                "abmil": {"epochs": 2, "patience": 1, "batch_size": 4},
                "probe": {"poolings": ["mean"], "lrs": [0.1], "steps": 4, "eval_every": 2},
                "attention_plots": 1,
            },
            "pretrain_data": (
                {"source": str(tmp_path / "pretrain"), "phantom_scans": 6, "phantom_size": 64, "phantom_seed": 5}
                if pretrain_cohort
                else None
            ),
            "supervised_ceiling": {"enabled": supervised_ceiling, "steps": 6, "batch_size": 8},
            "external": {
                "enabled": external,
                "tasks": ["location"],
                "data": {"source": str(tmp_path / "external"), "phantom_scans": 6, "phantom_size": 64,
                         "phantom_profile": "shifted", "phantom_seed": 1},
            },
        }
    )  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(cfg))
    return path
