"""The `slicefm pipeline` verbs: `run` (locally through kfp.local), `compile` (the YAML) and `submit` (to a
Kubeflow Pipelines endpoint). Each one's --help lists every option and every environment variable it reads."""

from __future__ import annotations

import argparse
import logging
import os
import textwrap
from pathlib import Path

log = logging.getLogger("slicefm")
DEFAULT_CONFIG = "pipelines/configs/demo-cpu.yaml"

# Read by components/settings.py when the pipeline graph is built (compile, submit, and local runs).
COMPILE_ENV = (
    ("SLICEFM_IMAGE", "the image every step runs in, on the cluster and with --runner docker (default "
     "slicefm:0.1.0; `make images`)"),
    ("SLICEFM_IMAGE_PULL_SECRETS", "comma-separated dockerconfigjson Secrets of a private registry (cluster)"),
    ("SLICEFM_SHM_SIZE", "size of the in-memory /dev/shm of the GPU steps (default 16Gi; cluster)"),
    ("SLICEFM_EXTRACT_PARALLELISM", "extract shards of one embedding set running at once (default 4, 0: no "
     "cap; cluster)"),
    ("SLICEFM_DATA_PVC", "a PersistentVolumeClaim the ingest steps mount to keep pulled data between steps and "
     "runs (default none: a temporary directory per step; cluster)"),
)  # fmt: skip
_S3_TO_DOCKER = "passed into the steps' containers with --runner docker"
RUN_ENV = (
    ("RUNNER", "default of --runner (subprocess)"),
    ("SLICEFM_HOME", "state directory: kfp.local outputs, task logs, the default MLflow database (default "
     "./.slicefm; make: the checkout's .slicefm)"),
    ("MLFLOW_TRACKING_URI", "MLflow tracking server (default: the sqlite database under $SLICEFM_HOME)"),
    ("MLFLOW_TRACKING_TOKEN", f"MLflow server token ({_S3_TO_DOCKER})"),
    ("SLICEFM_STORE", "artifact store of the step outputs, a directory or s3://bucket/prefix (default: the KFP "
     "artifact directory under $SLICEFM_HOME)"),
    ("AWS_ACCESS_KEY_ID", f"S3 credentials ({_S3_TO_DOCKER})"),
    ("AWS_SECRET_ACCESS_KEY", f"S3 credentials ({_S3_TO_DOCKER})"),
    ("AWS_ENDPOINT_URL", f"S3 endpoint ({_S3_TO_DOCKER})"),
    ("AWS_DEFAULT_REGION", f"S3 region ({_S3_TO_DOCKER})"),
    ("MLFLOW_S3_ENDPOINT_URL", f"S3 endpoint of MLflow's artifacts ({_S3_TO_DOCKER})"),
    ("SLICEFM_PSEUDONYM_KEY", "the pseudonymisation key itself (else the key file; `slicefm key init`)"),
    ("SLICEFM_PSEUDONYM_KEY_FILE", "the key file (default $XDG_CONFIG_HOME/slicefm/pseudonym.key)"),
    *COMPILE_ENV,
)  # fmt: skip
SUBMIT_ENV = (
    ("KFP_HOST", "default of --host: the Kubeflow Pipelines endpoint (required)"),
    ("KFP_NAMESPACE", "default of --namespace"),
    ("KFP_EXPERIMENT", "default of --experiment (slicefm)"),
    ("KFP_TOKEN", "default of --token"),
    ("KFP_SERVICE_ACCOUNT", "default of --service-account (none: the namespace's default)"),
    ("KFP_PIPELINE_VERSION", "default of --version-name (none: named by the git commit)"),
    ("MLFLOW_TRACKING_URI", "the MLflow server as the pipeline's pods reach it (required)"),
    ("SLICEFM_STORE", "artifact store of the step outputs, s3://bucket/prefix (pipeline parameter store_uri; "
     "default: the KFP artifacts)"),
    ("SLICEFM_DATA_SOURCE", "cohort A's dataset root as the pods see it (default: the config's data.source)"),
    ("SLICEFM_EXTERNAL_SOURCE", "the external cohort's dataset root (default: the config's, when enabled)"),
    ("SLICEFM_PRETRAIN_SOURCE", "the pretraining cohort's dataset root (default: the config's pretrain_data)"),
    ("SLICEFM_DVC_REMOTE", "URL of the DVC remote holding data/ (s3://bucket/dvcstore): the ingest steps then "
     "`dvc pull` the checkout's data.dvc revision and read the sources inside it (`make data-push` first)"),
    *COMPILE_ENV,
)  # fmt: skip
SUBMIT_DESCRIPTION = """\
Compile the pipeline, register it in Kubeflow Pipelines and start a run: the pipeline `slicefm` is created
when absent (in --namespace, else shared), a version of it named by the git commit is uploaded (`<short
sha>`, or `<short sha>-dirty-<8 hex>` with uncommitted changes to tracked files) or reused when that commit
was submitted before, and a run of that version starts in --experiment under --service-account. Prints the
pipeline version's and the run's URLs."""


def environment_epilog(variables: tuple[tuple[str, str], ...], width: int = 100) -> str:
    """The "environment variables:" section of a --help: a name column, the texts wrapped beside it."""
    column = max(len(name) for name, _ in variables) + 4
    rows = (
        textwrap.fill(text, width, initial_indent=f"  {name:<{column - 2}}", subsequent_indent=" " * column)
        for name, text in variables
    )
    return "environment variables:\n" + "\n".join(rows)


def _pipeline_runner():  # noqa: ANN202
    """pipelines.runner (the graph and its runner ship with a checkout: `pip install -e .` installs them)."""
    try:
        from pipelines import runner
    except ModuleNotFoundError as err:
        raise SystemExit(
            f"the pipeline commands need the pipelines/ and components/ packages of a slicefm checkout "
            f"installed with `pip install -e .` ({err})"
        ) from err
    return runner


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from slicefm.edge.tracking.preflight import PreflightError, TrackingError

    try:
        return _pipeline_runner().run_local(
            Path(args.config), run_name=args.run_name, runner=args.runner, full_log=args.full_log,
            cache=not args.no_cache,
        )  # fmt: skip
    except (TrackingError, PreflightError) as err:  # MLflow or the store unusable: nothing was run
        log.error("%s", err)
        return 1


def cmd_pipeline_compile(args: argparse.Namespace) -> int:
    path = _pipeline_runner().compile_pipeline(Path(args.out))
    print(f"compiled pipeline -> {path}")
    return 0


def cmd_pipeline_submit(args: argparse.Namespace) -> int:
    return _pipeline_runner().submit(
        Path(args.config),
        host=args.host,
        namespace=args.namespace,
        experiment=args.experiment,
        token=args.token,
        service_account=args.service_account,
        version_name=args.version_name,
    )


def _parser(verbs: argparse._SubParsersAction, name: str, help_: str, env: tuple, description: str = ""):  # noqa: ANN202
    return verbs.add_parser(
        name,
        help=help_,
        description=description or help_,
        epilog=environment_epilog(env),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_run_parser(verbs: argparse._SubParsersAction) -> None:
    s = _parser(
        verbs,
        "run",
        "run locally with kfp.local (SubprocessRunner, or DockerRunner with --runner docker)",
        RUN_ENV,
    )
    s.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"pipeline config YAML (default {DEFAULT_CONFIG})"
    )
    s.add_argument(
        "--run-name", help="the run's name in MLflow and its logs (default <config name>-<UTC time>)"
    )
    s.add_argument(
        "--runner",
        choices=["subprocess", "docker"],
        default=os.environ.get("RUNNER") or "subprocess",
        help="subprocess: steps in this Python environment; docker: every step in the project image "
        "(build it with `make images`). Default $RUNNER or subprocess",
    )
    s.add_argument(
        "--full-log", action="store_true",
        help="print kfp.local's whole output (every step's log) instead of one line per task",
    )  # fmt: skip
    s.add_argument(
        "--no-cache", action="store_true",
        help="recompute every step (by default an unchanged ingest / preprocess of an earlier run in the same "
        "state directory is reused)",
    )  # fmt: skip
    s.set_defaults(func=cmd_pipeline_run)


def add_compile_parser(verbs: argparse._SubParsersAction) -> None:
    s = _parser(verbs, "compile", "write the pipeline YAML", COMPILE_ENV)
    s.add_argument(
        "--out", default="pipelines/slicefm_pipeline.yaml", help="where to write it (default %(default)s)"
    )
    s.set_defaults(func=cmd_pipeline_compile)


def add_submit_parser(verbs: argparse._SubParsersAction) -> None:
    """`pipeline submit`; an empty variable counts as unset (CI sets unset secrets to "")."""
    s = _parser(
        verbs, "submit", "compile and submit to a Kubeflow Pipelines endpoint", SUBMIT_ENV, SUBMIT_DESCRIPTION
    )
    s.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"pipeline config YAML (default {DEFAULT_CONFIG})"
    )
    s.add_argument(
        "--host", default=os.environ.get("KFP_HOST") or None,
        help="Kubeflow Pipelines endpoint, e.g. https://kubeflow.example.org/pipeline (default $KFP_HOST)",
    )  # fmt: skip
    s.add_argument(
        "--namespace", default=os.environ.get("KFP_NAMESPACE") or None,
        help="Kubernetes namespace of the pipeline, experiment and run on a multi-user cluster "
        "(default $KFP_NAMESPACE; none: single-user, the pipeline is shared)",
    )  # fmt: skip
    s.add_argument(
        "--experiment", default=os.environ.get("KFP_EXPERIMENT") or "slicefm",
        help="Kubeflow experiment of the run, created when absent (default $KFP_EXPERIMENT or slicefm)",
    )  # fmt: skip
    s.add_argument(
        "--token", default=os.environ.get("KFP_TOKEN") or None,
        help="bearer token for the endpoint (default $KFP_TOKEN; none: no Authorization header)",
    )  # fmt: skip
    s.add_argument(
        "--service-account", default=os.environ.get("KFP_SERVICE_ACCOUNT") or None,
        help="Kubernetes service account the run's pods use (default $KFP_SERVICE_ACCOUNT; none: the "
        "namespace's default, e.g. default-editor)",
    )  # fmt: skip
    s.add_argument(
        "--version-name", default=os.environ.get("KFP_PIPELINE_VERSION") or None,
        help="name of the pipeline version instead of the git commit (default $KFP_PIPELINE_VERSION)",
    )  # fmt: skip
    s.set_defaults(func=cmd_pipeline_submit)


def add_pipeline_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `pipeline run|compile|submit` to the top-level `slicefm` parser."""
    verbs = subparsers.add_parser("pipeline", help="the Kubeflow pipeline").add_subparsers(
        dest="pipeline_verb", required=True
    )
    add_run_parser(verbs)
    add_compile_parser(verbs)
    add_submit_parser(verbs)
