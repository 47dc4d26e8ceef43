"""MLflow helpers shared by every pipeline stage: one parent run per pipeline, one nested run per stage.

Each Kubeflow component is its own process, so nothing here relies on a process-global active run to
link stages: the parent run is created with `MlflowClient` at pipeline start and stays RUNNING; every
stage receives its id, opens a child run tagged `mlflow.parentRunId` (which is how the MLflow UI nests
runs) and closes it; `finish_pipeline_run` closes the parent with the pipeline's final status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import unquote, urlsplit

from slicefm.edge.state import state_dir

logger = logging.getLogger(__name__)

# MLflow <= 2.x servers reject param values over 500 characters; newer ones allow 6000. A pipeline may
# log to an older server, so stay under the smaller limit.
MAX_PARAM_VALUE_CHARS = 500
MAX_PARAM_KEY_CHARS = 250
_BATCH = 100  # MLflow's per-request limit on params/tags in log_batch
_PARENT_TAG = "mlflow.parentRunId"
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingError(RuntimeError):
    """MLflow tracking is unusable (server unreachable, no active run ...)."""


# -- tracking URI --------------------------------------------------------------------------------------
def tracking_uri_default(state: str | Path) -> str:
    """`sqlite:///<abs state dir>/mlflow.db`, the tracking store when MLFLOW_TRACKING_URI is unset."""
    db = Path(state).expanduser().absolute() / "mlflow.db"
    return f"sqlite:///{db}"


def resolve_tracking_uri(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else the sqlite file in the state directory (slicefm.edge.state)."""
    env = os.environ if environ is None else environ
    return explicit or env.get("MLFLOW_TRACKING_URI") or tracking_uri_default(state_dir(env))


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :]))


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    db = _sqlite_path(tracking_uri)
    if db is not None:
        # SQLite creates the file but not its directory (.slicefm/ in a fresh checkout).
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server does not answer, before a stage spends hours training.

    Queries the server's `/health` endpoint. Any HTTP answer below 500 counts as reachable (a proxy may
    hide /health or ask for auth; MLflow itself reports those later with a clear error). Other schemes
    (sqlite, file) need no server and pass.
    """
    scheme = urlsplit(uri).scheme
    if scheme not in ("http", "https"):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            logger.debug("tracking server %s healthy (HTTP %d)", uri, resp.status)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingError(
                f"MLflow tracking server {uri} is unhealthy: HTTP {exc.code} from {url}"
            ) from exc
        logger.debug(
            "tracking server %s answered HTTP %d on /health; treating it as reachable", uri, exc.code
        )
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} unreachable within {timeout_s:g} s ({reason}); "
            "check MLFLOW_TRACKING_URI and that the server is running"
        ) from exc


# -- lineage ---------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """`default=` hook for json.dumps: pydantic models, dataclasses, paths, numpy scalars/arrays, sets."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} for hashing/logging")


def config_hash(obj: Any) -> str:
    """First 12 hex digits of the sha256 of canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def git_commit(project_dir: str | Path) -> str | None:
    """HEAD commit of the git checkout containing `project_dir`; None outside git or without git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(project_dir), "rev-parse", "--verify", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def lineage_tags(
    git_commit: str | None, config_hash: str, data_version: str | None, image: str | None
) -> dict[str, str]:
    """Tags that tie a run to code, config, data and container; unknown (None) items are left out."""
    # mlflow.source.git.commit is MLflow's own key, so the UI shows it in the run's source field.
    candidates = {
        "mlflow.source.git.commit": git_commit,
        "slicefm.config_hash": config_hash,
        "slicefm.data_version": data_version,
        "slicefm.image": image,
    }
    return {k: str(v) for k, v in candidates.items() if v is not None}


# -- params ----------------------------------------------------------------------------------------------
def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=_jsonable, ensure_ascii=False)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        logger.warning("param value truncated to %d characters: %s...", MAX_PARAM_VALUE_CHARS, text[:60])
        text = text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
    return text


def flatten_params(d: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested mapping (or pydantic model/dataclass) -> {"a.b.c": "value"} with MLflow's length limits.

    Lists and scalars become JSON text (so `None` is "null" and `[1, 2]` stays readable); values longer
    than MAX_PARAM_VALUE_CHARS are truncated with "...".
    """
    if not isinstance(d, Mapping):
        d = _jsonable(d)
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump") or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            value = _jsonable(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
            continue
        if len(name) > MAX_PARAM_KEY_CHARS:
            raise ValueError(f"param key longer than {MAX_PARAM_KEY_CHARS} characters: {name[:60]}...")
        flat[name] = _param_value(value)
    return flat


def active_mlflow() -> Any:
    """The mlflow module when a run is active, else None, without importing mlflow: no run can be active in
    a process that never imported it, so untracked stages (and `slicefm ingest`) never pay for the import."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


def _require_active_run() -> Any:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        # mlflow.log_* would silently start a fresh top-level run, detached from the pipeline.
        raise TrackingError("no active MLflow run: call this inside `stage_run(...)`")
    return run


def log_params_flat(d: Mapping[str, Any] | Any) -> dict[str, str]:
    """Flatten a nested config and log it as params of the active run; returns what was logged."""
    import mlflow

    run = _require_active_run()
    flat = flatten_params(d)
    items = list(flat.items())
    for i in range(0, len(items), _BATCH):
        mlflow.log_params(dict(items[i : i + _BATCH]))
    logger.debug("logged %d params to run %s", len(flat), run.info.run_id)
    return flat


def log_artifact_dir(local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Upload every file under `local_dir` as artifacts of the active run (under `artifact_path`)."""
    import mlflow

    _require_active_run()
    if not Path(local_dir).is_dir():
        raise NotADirectoryError(f"artifact directory {local_dir} does not exist")
    mlflow.log_artifacts(str(local_dir), artifact_path)


def log_step_metrics(metrics: Mapping[str, float], step: int) -> None:
    """A training loop's metrics callback: `mlflow.log_metrics(metrics, step=step)` into the active run, if any
    (an untracked run never imports mlflow)."""
    if (mlflow := active_mlflow()) is not None:
        mlflow.log_metrics(dict(metrics), step=step)


def log_store_files(out_uri: str, keys: Sequence[str], artifact_path: str | None = None) -> list[str]:
    """The `keys` that exist under `out_uri` (local or s3://) as artifacts of the active run (under
    `artifact_path`); nothing without an active run. Returns the keys logged."""
    import tempfile

    from slicefm.core.store import open_store

    if (mlflow := active_mlflow()) is None:
        return []
    store = open_store(out_uri)
    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            if not store.exists(key):
                continue
            local = store.local_path(key)
            if local is None:
                local = Path(tmp) / key
                store.download_file(key, local)
            mlflow.log_artifact(str(local), artifact_path=artifact_path)
            logged.append(key)
    return logged


# -- runs -----------------------------------------------------------------------------------------------
def _experiment_id(client: Any, tracking_uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    db = _sqlite_path(tracking_uri)
    # For a sqlite store MLflow's default artifact root is ./mlruns relative to the *current directory*;
    # pin artifacts beside the database so every stage process finds the same place.
    location = (db.parent / "mlartifacts" / name).as_uri() if db is not None else None
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def start_pipeline_run(tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    """Create the parent run of a pipeline execution and return its id; it stays RUNNING until
    `finish_pipeline_run`, so the UI shows a pipeline in progress while its stages run elsewhere."""
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, tracking_uri, experiment)
    run = client.create_run(exp_id, tags={**tags, "slicefm.kind": "pipeline"}, run_name=run_name)
    logger.info(
        "pipeline run %s (%s) in experiment %r at %s", run.info.run_id, run_name, experiment, tracking_uri
    )
    return str(run.info.run_id)


def tag_run(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    """Set tags on a run by id (values cut to the param limit older servers enforce on tags too)."""
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:MAX_PARAM_VALUE_CHARS])


def finish_pipeline_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Close the parent run with FINISHED, FAILED or KILLED."""
    if status not in _TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {_TERMINAL_STATUSES}, got {status!r}")
    _client(tracking_uri).set_terminated(run_id, status)


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API (mlflow.log_metric ...) at `uri` for the block, then restore."""
    import mlflow

    prev_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        # set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ; undo both.
        mlflow.set_tracking_uri(None)
        if prev_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env


@contextmanager
def stage_run(
    tracking_uri: str,
    parent_run_id: str,
    stage: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Nested child run for one stage, usable from any process; yields the mlflow ActiveRun.

    Inside the block the fluent API (`mlflow.log_metric`, `log_params_flat`, `log_artifact_dir`) logs
    to this run. The run ends FINISHED, or FAILED when the block raises (the exception propagates).
    """
    import mlflow

    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    child_tags = {**(tags or {}), _PARENT_TAG: parent_run_id, "slicefm.stage": stage, "slicefm.kind": "stage"}
    child = client.create_run(parent.info.experiment_id, tags=child_tags, run_name=stage)
    run_id = child.info.run_id
    logger.info("stage %s: run %s (parent %s)", stage, run_id, parent_run_id)
    with _global_tracking_uri(tracking_uri):
        # nested=True only matters when this process already has an active run (stages run in-process).
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as active:
            if params:
                log_params_flat(params)
            yield active


@contextmanager
def joined_run(run_id: str | None) -> Iterator[bool]:
    """Log into an existing run for the block (a TrainJob pod's rank 0 into its launcher's stage run); yields
    whether a run is active. No-op (yields False) for run_id None.

    The run is handed back still RUNNING: whoever started it ends it (FINISHED, or FAILED with the job).
    Inside a run already (in-process callers) the block logs there."""
    if not run_id:
        yield False
        return
    import mlflow

    if mlflow.active_run() is not None:
        yield True
        return
    mlflow.start_run(run_id=run_id)
    logger.info("logging to MLflow run %s", run_id)
    try:
        yield True
    finally:
        mlflow.end_run(status="RUNNING")
