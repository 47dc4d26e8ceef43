"""Register pretrained encoders and evaluation heads in the MLflow model registry, with manifest and lineage.

A registered version's payload (the files a consumer needs: weights, config json, `lineage.json`) is
logged as the artifact directory of a pyfunc model, together with a MANIFEST.json of every file's sha256
and size (see `slicefm.edge.tracking.models`). Lineage (data version, git commit, config hash, image) is
written into `lineage.json` and set as `slicefm.<key>` tags on the model version, so `slicefm models
list` shows it without downloading anything.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from slicefm import __version__
from slicefm.core.store import open_store
from slicefm.edge.tracking import models

logger = logging.getLogger(__name__)

_RESERVED = (models.MANIFEST_NAME, models.LINEAGE_NAME)


class EncoderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: input a float array [N, C, H, W] of preprocessed slices, output [N, D] embeddings."""

    def load_context(self, context) -> None:  # noqa: ANN001
        from slicefm.models.export_format import load_encoder

        self.encoder, self.meta = load_encoder(str(Path(context.artifacts["encoder"])))
        self.encoder.eval()

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        import numpy as np
        import torch

        with torch.no_grad():
            return self.encoder(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


class HeadFilesModel(mlflow.pyfunc.PythonModel):
    """pyfunc carrier for an evaluation head's files: heads differ in kind (ABMIL, probes) and are rebuilt
    by slicefm's evaluation code from the pulled files, so pyfunc predict is deliberately unsupported."""

    def load_context(self, context) -> None:  # noqa: ANN001
        self.files = Path(context.artifacts["head"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        raise NotImplementedError(
            "slicefm heads are not served through pyfunc: `slicefm models pull` the files and load them "
            "with slicefm's evaluation code"
        )


def _encoder_lineage(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Lineage already recorded in encoder.json by the pretraining stage."""
    from slicefm.edge.tracking.mlflow_runs import config_hash

    return {
        "data_version": meta.get("data_version"),
        "git_commit": meta.get("git_commit"),
        "config_hash": config_hash(meta["config"]) if meta.get("config") is not None else None,
    }


def register_encoder(
    encoder_uri: str,
    model_name: str,
    *,
    lineage: Mapping[str, Any] | None = None,
    aliases: Sequence[str] = (),
) -> str:
    """Log the encoder under the active run as an MLflow model and register a new version; returns it.

    Lineage defaults to what encoder.json records (data version, git commit, config hash) and the weights
    sha256 (tag `slicefm.weights_sha256`: how a head's lineage finds this version); items in
    `lineage` (e.g. `image`, `data_revision`) add to or override those.
    """
    # Imported here: slicefm.models brings torch and timm, which registering a head does not need.
    from slicefm.models.export_format import ENCODER_FILES, META_KEY, WEIGHTS_KEY

    store = open_store(encoder_uri)
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "encoder"
        for key in ENCODER_FILES:
            store.download_file(key, payload / key)
        meta = json.loads((payload / META_KEY).read_text(encoding="utf-8"))
        weights = {"weights_sha256": models.sha256_file(payload / WEIGHTS_KEY)}
        merged = {**_encoder_lineage(meta), **weights, **models.clean_lineage(lineage)}
        return _log_and_register(
            payload, "encoder", EncoderModel(), model_name, merged, aliases, source=store.uri("")
        )


def register_head(
    head_uri: str | Path,
    model_name: str,
    *,
    lineage: Mapping[str, Any] | None = None,
    aliases: Sequence[str] = (),
) -> str:
    """Log every file of an evaluation head's directory (local or s3://) as a model under the active run
    and register a new version; returns it."""
    store = open_store(head_uri)
    keys = store.list()
    if not keys:
        raise FileNotFoundError(f"no head files under {store.uri('')}")
    clash = sorted(k for k in keys if k in _RESERVED)
    if clash:
        raise ValueError(f"{store.uri('')}: {', '.join(clash)} are written by the registry; rename them")
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "head"
        for key in keys:
            store.download_file(key, payload / key)
        return _log_and_register(
            payload, "head", HeadFilesModel(), model_name, dict(lineage or {}), aliases, source=store.uri("")
        )


def _require_active_run() -> Any:
    from slicefm.edge.tracking.mlflow_runs import TrackingError

    run = mlflow.active_run()
    if run is None:
        # log_model would otherwise start a fresh top-level run, detached from the pipeline.
        raise TrackingError("no active MLflow run: register models inside a stage run")
    return run


def _log_and_register(
    payload: Path,
    kind: str,
    python_model: mlflow.pyfunc.PythonModel,
    model_name: str,
    lineage: Mapping[str, Any],
    aliases: Sequence[str],
    source: str,
) -> str:
    """Write lineage.json + MANIFEST.json into `payload`, log it as a pyfunc model, register it with tags."""
    run = _require_active_run()
    clean = models.clean_lineage(lineage)
    record = {
        "kind": kind,
        "model_name": model_name,
        "source_uri": source,
        "run_id": run.info.run_id,
        "slicefm_version": __version__,
        "lineage": clean,
    }
    (payload / models.LINEAGE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    manifest_sha = models.write_manifest(payload)
    info = mlflow.pyfunc.log_model(
        name=kind,
        python_model=python_model,
        artifacts={kind: str(payload)},
        # Explicit requirements: MLflow would otherwise infer them by importing the model in a subprocess.
        pip_requirements=[f"slicefm=={__version__}"],
    )
    tags = {
        **models.lineage_tags(clean),
        models.KIND_TAG: kind,
        models.MANIFEST_TAG: manifest_sha,
        # pyfunc copies each artifact directory to artifacts/<directory name> inside the model.
        models.PAYLOAD_TAG: f"artifacts/{payload.name}",
    }
    mv = mlflow.register_model(info.model_uri, model_name, tags=tags)
    for alias in aliases:
        models.set_alias(model_name, mv.version, alias, mlflow.get_registry_uri())
    logger.info(
        "registered %s %s version %s (manifest %s...)", kind, model_name, mv.version, manifest_sha[:12]
    )
    return str(mv.version)
