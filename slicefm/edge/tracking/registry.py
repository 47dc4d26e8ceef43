"""Register pretrained encoders and evaluation heads in the MLflow model registry, with manifest and lineage.

A registered version's payload (the files a consumer needs: weights, config json, `lineage.json`) is
logged as the artifact directory of a pyfunc model, together with a MANIFEST.json of every file's sha256
and size (see `slicefm.edge.tracking.models`). Lineage (data version, git commit, config hash, image) is
written into `lineage.json` and set as `slicefm.<key>` tags on the model version, so `slicefm models
list` shows it without downloading anything.

The pyfunc model is self-contained: it carries the slicefm package (`code_paths`) and an entry script
naming its class in `slicefm.edge.tracking.pyfunc` (models from code, no pickle), and pins only packages an
index serves, so `mlflow.pyfunc.load_model` works where slicefm is not installed. An encoder has a tensor
signature and an input example from its encoder.json.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

import slicefm
from slicefm import __version__
from slicefm.core.store import open_store
from slicefm.edge.tracking import models

# Versions registered before the models carried their code pickled `slicefm.edge.tracking.registry.<class>`:
# importing the classes here keeps those loadable where slicefm is installed.
from slicefm.edge.tracking.pyfunc import EncoderModel, HeadFilesModel, HeadModel

logger = logging.getLogger(__name__)

_RESERVED = (models.MANIFEST_NAME, models.LINEAGE_NAME)


# What loading each kind's pyfunc imports beyond MLflow (the loader) and the slicefm code the model carries:
# load_encoder builds the timm trunk (timm imports torchvision) from safetensors weights; predict uses numpy.
ENCODER_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy")
HEAD_REQUIREMENTS: tuple[str, ...] = ()  # HeadFilesModel only records where its files are
# A head bundled with its encoder predicts: the encoder's needs, plus what slicefm's head code imports
# (scikit-learn: evaluation metrics beside the head classes; pandas: the output frame; pydantic: configs).
HEAD_MODEL_REQUIREMENTS = (*ENCODER_REQUIREMENTS, "scikit-learn", "pandas", "pydantic", "pyarrow")
# Models from code (no pickle): the entry script MLflow runs at load time to get the PythonModel.
_ENTRY_SCRIPT = (
    "from mlflow.models import set_model\n\n"
    "from slicefm.edge.tracking.pyfunc import {cls}\n\n"
    "set_model({cls}())\n"
)
EXAMPLE_SLICES = 2


def pinned_requirements(distributions: Sequence[str]) -> list[str]:
    """`name==version` of each installed distribution; a local label (torch's `+cu130`) is dropped, as
    package indexes serve the public version (the CUDA build is the consumer's index choice)."""
    from importlib.metadata import version

    from packaging.version import Version

    return [f"{name}=={Version(version(name)).public}" for name in distributions]


def slicefm_code_path() -> str:
    """The slicefm package directory, carried whole by every registered model (MLflow `code_paths`): no
    index serves slicefm, and a partial copy would shadow an installed slicefm's other modules."""
    return str(Path(slicefm.__file__).resolve().parent)


def encoder_signature(meta: Mapping[str, Any]) -> ModelSignature:
    """Tensor signature from encoder.json: float32 [-1, in_chans, img_size, img_size] -> [-1, embed_dim]."""
    height, width = _image_hw(meta["img_size"])
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(meta["in_chans"]), height, width))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(meta["embed_dim"])))]),
    )


def encoder_input_example(meta: Mapping[str, Any], n: int = EXAMPLE_SLICES) -> np.ndarray:
    """`n` all-zero slices of the signature's shape: it shows shape and dtype, and MLflow stores it with the
    model as JSON (twice, with the serving example), so it stays a couple of slices."""
    return np.zeros((n, int(meta["in_chans"]), *_image_hw(meta["img_size"])), dtype=np.float32)


def _image_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    height, width = img_size
    return int(height), int(width)


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
            payload,
            "encoder",
            EncoderModel,
            model_name,
            merged,
            aliases,
            source=store.uri(""),
            requirements=pinned_requirements(ENCODER_REQUIREMENTS),
            signature=encoder_signature(meta),
            input_example=encoder_input_example(meta),
        )


def head_signature(bundle: Any) -> ModelSignature:
    """One scan's stack as preprocess stores it -> one row of `p_<class>` (double) and `label_<class>` (long)."""
    cfg = bundle.preprocess
    side = cfg.size or -1
    shape = (-1, *((5,) if cfg.five_cut else ()), len(bundle.channels), side, side)
    dtype = np.dtype(np.float32 if cfg.normalisation == "zscore" else np.uint8)
    outputs = [ColSpec("double", f"p_{c}") for c in bundle.class_names]
    outputs += [ColSpec("long", f"label_{c}") for c in bundle.class_names]
    return ModelSignature(inputs=Schema([TensorSpec(dtype, shape)]), outputs=Schema(outputs))


def head_input_example(bundle: Any, n: int = EXAMPLE_SLICES) -> np.ndarray:
    """`n` slices of mid-grey (windows) or zeros (z-scores) in the signature's shape and dtype."""
    cfg = bundle.preprocess
    side = cfg.size or 64
    shape = (n, *((5,) if cfg.five_cut else ()), len(bundle.channels), side, side)
    if cfg.normalisation == "zscore":
        return np.zeros(shape, dtype=np.float32)
    return np.full(shape, 128, dtype=np.uint8)


def register_head(
    head_uri: str | Path,
    model_name: str,
    *,
    lineage: Mapping[str, Any] | None = None,
    aliases: Sequence[str] = (),
    encoder_dir: str | Path | None = None,
) -> str:
    """Log every file of an evaluation head's directory (local or s3://) as a model under the active run
    and register a new version; returns it.

    With `encoder_dir` (the encoder the head's embeddings came from), the encoder's files are bundled under
    `encoder/` and the model predicts (HeadModel: one scan's stack -> class probabilities, what `slicefm
    predict` computes); the bundle is checked with slicefm.predict's loader before anything is logged.
    Without it the model only carries the head's files."""
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
        if encoder_dir is not None:
            return _register_predicting_head(payload, Path(encoder_dir), model_name, lineage, aliases, store.uri(""))
        return _log_and_register(
            payload,
            "head",
            HeadFilesModel,
            model_name,
            dict(lineage or {}),
            aliases,
            source=store.uri(""),
            requirements=pinned_requirements(HEAD_REQUIREMENTS),
            # No signature: the head model does not predict (HeadFilesModel); MLmodel says so.
            metadata={
                "pyfunc_predict": "unsupported: carries the head's files for slicefm's evaluation code"
            },
        )


def _register_predicting_head(
    payload: Path,
    encoder_dir: Path,
    model_name: str,
    lineage: Mapping[str, Any] | None,
    aliases: Sequence[str],
    source: str,
) -> str:
    import shutil

    from slicefm.models.export_format import ENCODER_FILES
    from slicefm.predict.bundle import ENCODER_DIR, load_bundle

    (payload / ENCODER_DIR).mkdir()
    for name in ENCODER_FILES:
        shutil.copyfile(encoder_dir / name, payload / ENCODER_DIR / name)
    bundle = load_bundle(payload)  # refuses heads and encoder that do not belong together
    return _log_and_register(
        payload,
        "head",
        HeadModel,
        model_name,
        dict(lineage or {}),
        aliases,
        source=source,
        requirements=pinned_requirements(HEAD_MODEL_REQUIREMENTS),
        signature=head_signature(bundle),
        input_example=head_input_example(bundle),
        metadata={"slicefm_task": bundle.task, "slicefm_protocol": bundle.protocol},
    )


_MLFLOW_PYFUNC_LOG = logging.getLogger("mlflow.pyfunc")


class _NoSignatureWarning(logging.Filter):
    """Drops MLflow's "Failed to infer model signature" warning for a model logged without one on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to infer model signature")


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
    model_class: type[mlflow.pyfunc.PythonModel],
    model_name: str,
    lineage: Mapping[str, Any],
    aliases: Sequence[str],
    source: str,
    *,
    requirements: Sequence[str],
    signature: ModelSignature | None = None,
    input_example: np.ndarray | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write lineage.json + MANIFEST.json into `payload`, log it as a self-contained pyfunc model (slicefm's
    code, an entry script instantiating `model_class`, pinned requirements), register it with tags."""
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
    entry = payload.parent / f"{kind}_model.py"
    entry.write_text(_ENTRY_SCRIPT.format(cls=model_class.__name__), encoding="utf-8")
    # Validating the input example loads the model here, which prepends its code directory to sys.path.
    sys_path = list(sys.path)
    unsigned = _NoSignatureWarning() if signature is None else None
    if unsigned:
        _MLFLOW_PYFUNC_LOG.addFilter(unsigned)
    try:
        info = mlflow.pyfunc.log_model(
            name=kind,
            python_model=str(entry),
            artifacts={kind: str(payload)},
            code_paths=[slicefm_code_path()],
            # Explicit: MLflow would otherwise infer them by importing the model in a subprocess.
            # MLflow adds its own pin (the loader).
            pip_requirements=list(requirements),
            signature=signature,
            input_example=input_example,
            metadata={"slicefm_kind": kind, "slicefm_version": __version__, **(metadata or {})},
        )
    finally:
        sys.path[:] = sys_path
        if unsigned:
            _MLFLOW_PYFUNC_LOG.removeFilter(unsigned)
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
