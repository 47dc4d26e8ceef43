"""Stage entry points shared by the CLI and the Kubeflow components.

Each takes URIs and a typed config, runs the science from the library, and (when a tracking URI is
given) records a nested MLflow run under the pipeline's parent run: params, metrics, the resolved config.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from slicefm.config import PipelineConfig, dump_config
from slicefm.data.ingest import IngestResult, ingest
from slicefm.preprocess.stage import PreprocessResult, run_preprocess
from slicefm.tracking import mlflow_runs
from slicefm.tracking.store import open_store
from slicefm.train.stage import PretrainResult, run_pretrain

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _tracked(
    tracking_uri: str | None, parent_run_id: str | None, stage: str, cfg: PipelineConfig, params: dict
) -> Iterator:
    if not tracking_uri or not parent_run_id:
        yield None
        return
    tags = {
        "slicefm.stage": stage,
        "slicefm.config_hash": mlflow_runs.config_hash(cfg.model_dump(mode="json")),
    }
    with mlflow_runs.stage_run(tracking_uri, parent_run_id, stage, params, tags) as run:
        yield run


def ingest_stage(
    cfg: PipelineConfig,
    source: str,
    out_uri: str,
    key: bytes,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    data_version: str | None = None,
) -> IngestResult:
    params = {
        "source_format": cfg.data.format,
        "workers": cfg.ingest.workers,
        "data_version": data_version or "",
    }
    with _tracked(tracking_uri, parent_run_id, "ingest", cfg, params):
        result = ingest(
            Path(source), out_uri, key, cfg.data.format, cfg.data.cohort, cfg.ingest.workers, data_version
        )
        open_store(out_uri).write_bytes("config.yaml", dump_config(cfg).encode())
        _log_metrics(
            {"n_scans": result.n_scans, "n_quarantined": result.n_quarantined, "n_lesions": result.n_lesions}
        )
        _log_artifacts(out_uri, ["dataset.json", "quarantine.csv", "config.yaml"])
    return result


def preprocess_stage(
    cfg: PipelineConfig,
    scans_uri: str,
    out_uri: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> PreprocessResult:
    params = cfg.preprocess.model_dump(mode="json")
    with _tracked(tracking_uri, parent_run_id, "preprocess", cfg, params):
        result = run_preprocess(scans_uri, out_uri, cfg.preprocess)
        open_store(out_uri).write_bytes("config.yaml", dump_config(cfg).encode())
        _log_metrics({"n_scans": result.n_scans, "n_slices": result.n_slices, "n_skipped": result.n_skipped})
        _log_artifacts(out_uri, ["preprocess.json", "config.yaml"])
    return result


def pretrain_stage(
    cfg: PipelineConfig,
    preprocessed_uri: str,
    out_uri: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    resume: bool = True,
) -> PretrainResult:
    """Self-supervised pretraining; checkpoints (resumable) and encoder.safetensors/json under out_uri."""
    params = cfg.pretrain.model_dump(mode="json")
    with _tracked(tracking_uri, parent_run_id, "pretrain", cfg, params):
        result = run_pretrain(preprocessed_uri, out_uri, cfg.pretrain, resume=resume)
        _log_metrics(
            {
                "steps": result.steps,
                "loss_first": result.loss_first,
                "loss_last": result.loss_last,
                "slices_per_s": result.slices_per_s,
                **{f"collapse_{k}": v for k, v in result.collapse.items()},
            }
        )
        _log_artifacts(out_uri, [])  # the encoder files are logged by export_encoder
        _register(out_uri, f"{cfg.name}-encoder")
    return result


def _register(encoder_uri: str, model_name: str) -> None:
    """New registry version of the encoder, tagged on the stage run (only when tracking is on)."""
    import mlflow

    from slicefm.tracking.registry import register_encoder

    if mlflow.active_run() is not None:
        version = register_encoder(encoder_uri, model_name)
        mlflow.set_tags({"slicefm.registered_model": model_name, "slicefm.model_version": version})


def _log_metrics(metrics: dict) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def _log_artifacts(out_uri: str, keys: list[str]) -> None:
    """Small summary files go to MLflow too; bulk data stays in the artifact store."""
    import tempfile

    import mlflow

    if mlflow.active_run() is None:
        return
    store = open_store(out_uri)
    mlflow.set_tag("slicefm.output_uri", store.uri(""))
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            if store.exists(key):
                path = Path(tmp) / key
                path.write_bytes(store.read_bytes(key))
                mlflow.log_artifact(str(path))


__all__ = ["ingest_stage", "preprocess_stage", "pretrain_stage"]
