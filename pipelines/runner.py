"""Run the pipeline locally (kfp.local SubprocessRunner), compile it to YAML, or submit it to Kubeflow."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import tempfile
from pathlib import Path

import yaml

from slicefm.config import PipelineConfig, dump_config, load_config
from slicefm.edge.kfp_local_log import routed_stdout
from slicefm.edge.state import state_dir

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def data_version(source: Path) -> str:
    """The DVC md5 of the tracked data directory holding `source` (or "" when not DVC-tracked)."""
    dvc_file = ROOT / "data.dvc"
    try:
        source.resolve().relative_to((ROOT / "data").resolve())
    except ValueError:
        return ""
    if not dvc_file.exists():
        return ""
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
    return f"dvc-md5:{outs[0]['md5']}" if outs else ""


def compile_pipeline(out: Path) -> Path:
    from kfp import compiler

    from pipelines.slicefm_pipeline import slicefm_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(slicefm_pipeline, str(out))
    return out


def _arguments(
    cfg: PipelineConfig,
    source: str,
    tracking_uri: str,
    store_uri: str,
    run_name: str,
    version: str,
    external_source: str = "",
    pretrain_source: str = "",
    pretrain_version: str = "",
) -> dict:
    return {
        "config_yaml": dump_config(cfg),
        "data_source": source,
        "tracking_uri": tracking_uri,
        "store_uri": store_uri,
        "run_name": run_name,
        "experiment": cfg.experiment,
        "data_version": version,
        "external_source": external_source,
        "run_external": bool(cfg.external.enabled and external_source),
        "pretrain_source": pretrain_source,
        "pretrain_data_version": pretrain_version,
        "supervised_ceiling": cfg.supervised_ceiling.enabled,
        "extract_shards": cfg.extract.n_shards,
    }


def _local_source(data) -> Path:  # noqa: ANN001
    """A dataset directory under the checkout (relative sources) or as given; phantom-generated when absent."""
    from slicefm.edge.pipeline_data import ensure_demo_data

    return ensure_demo_data(data, ROOT / data.source if not Path(data.source).is_absolute() else None)


RUNNERS = ("subprocess", "docker")
# Credentials and endpoints the DockerRunner's steps get from this environment (with the pseudonymisation key).
DOCKER_STEP_ENV = ("MLFLOW_TRACKING_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                   "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")  # fmt: skip


def run_local(
    config_path: Path,
    run_name: str | None = None,
    runner: str = "subprocess",
    *,
    full_log: bool = False,
    cache: bool = True,
) -> int:
    """Run every stage on this machine through kfp.local, tracked in MLflow; print where results are.

    `runner`: "subprocess" (this Python environment) or "docker" (every step in the project image, as on a
    cluster; `make images` first). Prints one line per task and keeps each task's log in a file under
    `<state>/logs/<run name>/` (`full_log`: kfp.local's whole output on the terminal instead). With `cache`
    an unchanged ingest / preprocess of an earlier run in the same state directory is reused. Raises
    TrackingError / PreflightError before any data or step when MLflow / SLICEFM_STORE is unusable.
    """
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; choose one of {RUNNERS}")
    from kfp import local

    from pipelines.slicefm_pipeline import slicefm_pipeline
    from slicefm.data.pseudonym import KEY_ENV, load_key
    from slicefm.edge.tracking.mlflow_runs import resolve_tracking_uri
    from slicefm.edge.tracking.pipeline_runs import describe_run, find_parent_run
    from slicefm.edge.tracking.preflight import preflight

    cfg: PipelineConfig = load_config(config_path)  # type: ignore[assignment]
    tracking_uri = resolve_tracking_uri(None)
    store_uri = os.environ.get("SLICEFM_STORE", "")
    # An unreachable MLflow server or artifact store fails here, in seconds, before data or any stage.
    preflight(tracking_uri, store_uri or None)
    if run_name and find_parent_run(tracking_uri, cfg.experiment, run_name) is not None:
        raise SystemExit(
            f"run name {run_name!r} is taken in experiment {cfg.experiment!r} ({tracking_uri}): choose another "
            "or leave --run-name out (a timestamped name)"
        )
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    source = _local_source(cfg.data)
    external = str(_local_source(cfg.external.data).resolve()) if cfg.external.enabled else ""
    pretrain = _local_source(cfg.pretrain_data) if cfg.pretrain_data is not None else None
    # Components read the key from the environment, as they would from a Kubernetes Secret. It is never
    # created here (`slicefm key init`; `make run-pipeline` does that for the demo).
    os.environ[KEY_ENV] = load_key().decode()
    run_name = run_name or f"{cfg.name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    sources = [p for p in (source, Path(external) if external else None, pretrain) if p is not None]
    if runner == "docker":
        kfp_runner = _container_runner(state, sources, tracking_uri, store_uri)
    else:
        kfp_runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=kfp_runner, pipeline_root=str(state / "kfp"), raise_on_error=True, enable_caching=cache)
    print(
        f"running pipeline {cfg.name!r} locally (kfp.local, {runner} runner) as {run_name}; data {source}; "
        f"MLflow {tracking_uri}"
    )
    arguments = _arguments(
        cfg, str(source.resolve()), tracking_uri, store_uri, run_name, data_version(source), external,
        str(pretrain.resolve()) if pretrain else "", data_version(pretrain) if pretrain else "",
    )  # fmt: skip
    # kfp.local ignores resource requests: ask the steps for the GPUs they will see, so a GPU step never
    # demands one that is not there (they fail at once when torch sees fewer than they were given). The
    # DockerRunner's containers get no GPU devices.
    gpus = 0 if runner == "docker" else _visible_gpus()
    if full_log:
        slicefm_pipeline(**arguments, pretrain_gpus=gpus, extract_gpus=gpus)
    else:
        logs = state / "logs" / run_name
        print(f"one line per task; every task's log under {logs}/ (--full-log prints them here)")
        with routed_stdout(logs, sys.stdout):
            slicefm_pipeline(**arguments, pretrain_gpus=gpus, extract_gpus=gpus)
    print(describe_run(tracking_uri, cfg.experiment, run_name, state / "kfp"))
    return 0


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _container_runner(state: Path, sources: list[Path], tracking_uri: str, store_uri: str):  # noqa: ANN202
    """kfp.local.DockerRunner over the project image, with the data and the state directory mounted."""
    from components.settings import BASE_IMAGE
    from pipelines.docker_runner import docker_runner, ensure_engine, require_image
    from slicefm.data.pseudonym import KEY_ENV

    ensure_engine()
    require_image(BASE_IMAGE)
    passed = (KEY_ENV, *DOCKER_STEP_ENV)
    env = {k: os.environ[k] for k in passed if os.environ.get(k)} | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    network = tracking_uri.startswith(("http:", "https:")) or store_uri.startswith("s3:")
    (state / "kfp").mkdir(parents=True, exist_ok=True)  # else dockerd creates the mount source root-only
    return docker_runner(state, [s.resolve() for s in sources], env, network)


def _cluster_arguments(cfg: PipelineConfig, tracking_uri: str, run_name: str) -> dict:
    """The run's pipeline parameters: datasets and the store as the cluster's pods see them (SLICEFM_* variables,
    else the config's sources). With SLICEFM_DVC_REMOTE the ingest steps pull the checkout's data.dvc
    revision from that remote and read the (relative) sources inside it."""
    remote = os.environ.get("SLICEFM_DVC_REMOTE", "")
    dvc_file = ROOT / "data.dvc"
    if remote and not dvc_file.exists():
        raise SystemExit(f"SLICEFM_DVC_REMOTE is set but {dvc_file} is missing")
    dvc = {"data_dvc_file": dvc_file.read_text(), "dvc_remote": remote} if remote else {}
    return dvc | _arguments(
        cfg,
        os.environ.get("SLICEFM_DATA_SOURCE") or cfg.data.source,  # CI sets an unset secret to ""
        tracking_uri,
        os.environ.get("SLICEFM_STORE", ""),
        run_name,
        data_version(ROOT / cfg.data.source),
        os.environ.get("SLICEFM_EXTERNAL_SOURCE", cfg.external.data.source if cfg.external.enabled else ""),
        os.environ.get("SLICEFM_PRETRAIN_SOURCE", cfg.pretrain_data.source if cfg.pretrain_data else ""),
        data_version(ROOT / cfg.pretrain_data.source) if cfg.pretrain_data else "",
    )


def submit(
    config_path: Path,
    host: str | None,
    namespace: str | None,
    experiment: str,
    token: str | None,
    service_account: str | None = None,
    version_name: str | None = None,
) -> int:
    """Compile the pipeline, register it in Kubeflow Pipelines and start a run; prints the URLs.

    The pipeline `slicefm` (PIPELINE_NAME) is created when absent; its version is named by the checkout's git
    commit (pipelines.kfp_submit.commit_version) unless `version_name` is given, and reused when it exists (the
    same commit submitted again). The run goes to `experiment` (created when absent) under `service_account`
    (None: the namespace's default).
    """
    from pipelines import kfp_submit
    from pipelines.slicefm_pipeline import PIPELINE_DESCRIPTION, PIPELINE_NAME

    if not host:
        raise SystemExit("set KFP_HOST (or --host) to the Kubeflow Pipelines endpoint")
    cfg: PipelineConfig = load_config(config_path)  # type: ignore[assignment]
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise SystemExit("set MLFLOW_TRACKING_URI to the in-cluster MLflow server for cluster runs")
    version_name = version_name or kfp_submit.commit_version(ROOT)
    if not version_name:
        raise SystemExit(
            f"{ROOT} is not a git checkout: name the pipeline version with --version-name or KFP_PIPELINE_VERSION"
        )
    run_name = f"{cfg.name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    args = _cluster_arguments(cfg, tracking_uri, run_name)
    with tempfile.TemporaryDirectory() as tmp, kfp_submit.api_errors(host):
        package = compile_pipeline(Path(tmp) / f"{PIPELINE_NAME}.yaml")
        client = kfp_submit.connect(host, token, namespace)
        commit = kfp_submit.head_commit(ROOT)
        version = kfp_submit.register(
            client, package, PIPELINE_NAME, version_name, namespace, commit, description=PIPELINE_DESCRIPTION
        )
        run_id = kfp_submit.start_run(client, version, experiment, namespace, run_name, args, service_account)
    for line in kfp_submit.summary(
        host, PIPELINE_NAME, version, run_name, run_id, experiment, service_account
    ):
        print(line)
    return 0
