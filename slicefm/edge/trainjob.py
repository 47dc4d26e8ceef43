"""Multi-node pretraining as a Kubeflow Trainer TrainJob: build the manifest, submit it, wait, explain failures.

Pinned to Kubeflow Trainer v2.3.0 (`trainer.kubeflow.org/v1alpha1`). The manifest is built from the API
models of that release (PyPI `kubeflow-trainer-api`, same version), each validated with unknown fields
forbidden, so a field the API does not have fails at build time. Pod settings (service account, node
selector, tolerations, the /dev/shm volume and its mount, image pull secrets) go through one entry of
`spec.runtimePatches`, patching the pod template of the `node` replicated job; releases v2.0 and v2.1 had
podSpecOverrides / podTemplateOverrides instead, and v2.2 is not API-compatible with v2.3. Before creating
the job, the launcher reads the cluster's TrainJob CRD and refuses a release other than v2.3 (or a missing
CRD); the job is created with fieldValidation=Strict, so the API server rejects a field it does not know
instead of silently dropping it (which is how tolerations and /dev/shm used to vanish, pods left Pending).

The job runs on the ClusterTrainingRuntime `torch-distributed`, whose one replicated job and trainer
container are both named `node`. The runtime's Torch plugin sets PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads itself, so the command is a plain
`torchrun -m slicefm pretrain-worker ...`. The TrainJob's JobSet carries the TrainJob's name and JobSet labels
every pod `jobset.sigs.k8s.io/jobset-name=<name>`: that is how the pods of a failed job are found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml
from kubeflow_trainer_api import models as api
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

TRAINER_RELEASE = "v2.3.0"  # the release of the installed kubeflow-trainer-api models (a test checks it)
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"
PATCH_MANAGER = "slicefm/launcher"  # owner of slicefm's entry in spec.runtimePatches
# Where the pod spec sits in an entry of spec.runtimePatches (in the manifest and in the CRD's schema).
POD_PATCH_PATH = tuple("trainingRuntimeSpec template spec replicatedJobs template spec template spec".split())
NODE = "node"  # replicated job and trainer container of the torch-distributed runtime
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
CONFIG_ENV = "SLICEFM_CONFIG_YAML"
CONFIG_DIR = "/tmp/slicefm"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
SHM_VOLUME = "dshm"
# JobSet pod hostnames are <job>-node-<i>-<j> and must stay DNS labels (63); leave room for the suffix.
MAX_NAME = 40
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
# Container waiting reasons that never resolve by themselves.
STUCK_REASONS = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}
# Writes the config from the environment to a file (launch.py takes a path), then hands over to torchrun.
# No $(...) in it: Kubernetes would try to expand that as a variable reference.
LAUNCH_SCRIPT = (
    f'mkdir -p {CONFIG_DIR} && printf "%s\\n" "${CONFIG_ENV}" > {CONFIG_PATH} '
    '&& exec torchrun -m slicefm pretrain-worker "$@"'
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Toleration(Strict):
    """A pod toleration; accepts the Kubernetes spelling (tolerationSeconds) as well."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, alias="tolerationSeconds")

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        return self

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class TrainJobConfig(Strict):
    """Where and how the TrainJob runs; every field maps to one launch_trainjob pipeline parameter."""

    namespace: str = "slicefm"
    image: str = "slicefm:0.1.0"  # the project image (CPU and CUDA, docker/Dockerfile)
    runtime: str = "torch-distributed"  # ClusterTrainingRuntime installed with Trainer v2.3.0
    num_nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=0)  # 0: CPU nodes, one process each (gloo)
    accelerator: str = "nvidia.com/gpu"  # extended resource name of the device plugin
    cpu_per_node: str = "8"  # request ("" = none); no CPU limit, so data loading is never throttled
    memory_per_node: str = "64Gi"  # request and limit ("" = none)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    shm_size: str = "16Gi"  # /dev/shm (DataLoader workers and NCCL share memory through it)
    service_account: str = "slicefm-trainer"  # "" = the namespace default
    image_pull_secrets: list[str] = Field(default_factory=list)
    s3_secret: str = "slicefm-s3"  # AWS_* for the artifact store ("" = workload identity instead)
    mlflow_secret: str = "slicefm-mlflow"  # optional MLFLOW_TRACKING_USERNAME/PASSWORD ("" = none)
    tracking_uri: str = ""  # MLFLOW_TRACKING_URI for the training pods ("" = unset)
    timeout_s: float = Field(48 * 3600, gt=0)
    poll_s: float = Field(30, gt=0)
    cleanup: bool = True  # delete the TrainJob (and its pods) when done, failed or not
    log_lines: int = Field(50, ge=0)  # last log lines of each failed pod in the error


def trainjob_name(run_name: str, stage: str = "pretrain") -> str:
    """A valid, stable TrainJob name for a pipeline run (so a retried step finds its own job)."""
    raw = f"{run_name}-{stage}"
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"j-{name}".rstrip("-")
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"
    return name


M = TypeVar("M", bound=BaseModel)


def _api(model: type[M], **fields: Any) -> M:
    """An instance of a Trainer API model; None fields are left out. A field the model does not have raises
    (the generated models would silently drop it), as does a value of the wrong type."""
    return model.model_validate({k: v for k, v in fields.items() if v is not None}, extra="forbid")


def _quantity(value: str) -> api.IoK8sApimachineryPkgApiResourceQuantity:
    return api.IoK8sApimachineryPkgApiResourceQuantity(value)


def _value_env(var: str, value: str) -> api.IoK8sApiCoreV1EnvVar:
    return _api(api.IoK8sApiCoreV1EnvVar, name=var, value=value)


def _secret_env(var: str, secret: str, optional: bool) -> api.IoK8sApiCoreV1EnvVar:
    ref = _api(api.IoK8sApiCoreV1SecretKeySelector, name=secret, key=var, optional=optional)
    source = _api(api.IoK8sApiCoreV1EnvVarSource, secret_key_ref=ref)
    return _api(api.IoK8sApiCoreV1EnvVar, name=var, value_from=source)


def _env(
    cfg: TrainJobConfig, config_yaml: str, mlflow_run_id: str | None = None
) -> list[api.IoK8sApiCoreV1EnvVar]:
    env = [_value_env(CONFIG_ENV, config_yaml)]
    if cfg.s3_secret:
        env += [_secret_env(v, cfg.s3_secret, False) for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        env += [_secret_env(v, cfg.s3_secret, True) for v in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")]
    if cfg.tracking_uri:
        env.append(_value_env("MLFLOW_TRACKING_URI", cfg.tracking_uri))
        if mlflow_run_id:
            # rank 0 logs its per-step metrics into the launcher's stage run (`slicefm pretrain-worker`, slicefm.edge.launch)
            env.append(_value_env("MLFLOW_RUN_ID", mlflow_run_id))
    if cfg.mlflow_secret:
        env += [
            _secret_env(v, cfg.mlflow_secret, True)
            for v in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        ]
    return env


def _resources(cfg: TrainJobConfig) -> api.IoK8sApiCoreV1ResourceRequirements | None:
    """Requests (CPU, memory, GPUs) and limits (memory, GPUs) per node; None when nothing is asked for."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cfg.cpu_per_node:
        requests["cpu"] = cfg.cpu_per_node
    if cfg.memory_per_node:
        requests["memory"] = limits["memory"] = cfg.memory_per_node
    if cfg.gpus_per_node:
        requests[cfg.accelerator] = limits[cfg.accelerator] = str(cfg.gpus_per_node)
    if not requests:
        return None
    return _api(
        api.IoK8sApiCoreV1ResourceRequirements,
        requests={k: _quantity(v) for k, v in requests.items()},
        limits={k: _quantity(v) for k, v in limits.items()} or None,
    )


def _pod_patch(cfg: TrainJobConfig) -> api.TrainerV1alpha1PodSpecPatch:
    """Pod settings of the `node` pods. Env of the `node` container may only be set through spec.trainer;
    volume mounts are allowed here."""
    shm = _api(api.IoK8sApiCoreV1EmptyDirVolumeSource, medium="Memory", size_limit=_quantity(cfg.shm_size))
    mount = _api(api.IoK8sApiCoreV1VolumeMount, name=SHM_VOLUME, mount_path="/dev/shm")
    return _api(
        api.TrainerV1alpha1PodSpecPatch,
        service_account_name=cfg.service_account or None,
        node_selector=dict(cfg.node_selector) or None,
        tolerations=[_api(api.IoK8sApiCoreV1Toleration, **t.manifest()) for t in cfg.tolerations] or None,
        volumes=[_api(api.IoK8sApiCoreV1Volume, name=SHM_VOLUME, empty_dir=shm)],
        containers=[_api(api.TrainerV1alpha1ContainerPatch, name=NODE, volume_mounts=[mount])],
        image_pull_secrets=[
            _api(api.IoK8sApiCoreV1LocalObjectReference, name=s) for s in cfg.image_pull_secrets
        ]
        or None,
    )


def _runtime_patch(cfg: TrainJobConfig) -> api.TrainerV1alpha1RuntimePatch:
    """slicefm's runtimePatches entry: the pod patch, on the pod template of the `node` replicated job."""
    pod_template = _api(api.TrainerV1alpha1PodTemplatePatch, spec=_pod_patch(cfg))
    job_template = _api(
        api.TrainerV1alpha1JobTemplatePatch, spec=_api(api.TrainerV1alpha1JobSpecPatch, template=pod_template)
    )
    node = _api(api.TrainerV1alpha1ReplicatedJobPatch, name=NODE, template=job_template)
    jobset = _api(
        api.TrainerV1alpha1JobSetTemplatePatch,
        spec=_api(api.TrainerV1alpha1JobSetSpecPatch, replicated_jobs=[node]),
    )
    return _api(
        api.TrainerV1alpha1RuntimePatch,
        manager=PATCH_MANAGER,
        training_runtime_spec=_api(api.TrainerV1alpha1TrainingRuntimeSpecPatch, template=jobset),
    )


def _trainer(
    cfg: TrainJobConfig, preprocessed_uri: str, out_uri: str, config_yaml: str, mlflow_run_id: str | None
) -> api.TrainerV1alpha1Trainer:
    return _api(
        api.TrainerV1alpha1Trainer,
        image=cfg.image,
        command=["/bin/sh", "-c", LAUNCH_SCRIPT, "slicefm-launch"],
        args=["--preprocessed", preprocessed_uri, "--out", out_uri, "--config", CONFIG_PATH],
        env=_env(cfg, config_yaml, mlflow_run_id),
        num_nodes=cfg.num_nodes,
        num_proc_per_node=cfg.gpus_per_node or 1,
        resources_per_node=_resources(cfg),
    )


def build_trainjob(
    cfg: TrainJobConfig,
    name: str,
    preprocessed_uri: str,
    out_uri: str,
    config_yaml: str,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """The TrainJob manifest: torchrun of `slicefm pretrain-worker` on cfg.num_nodes pods of the runtime.

    Built from the Kubeflow Trainer v2.3.0 API models and returned as their dict (camelCase, ready to send).
    `mlflow_run_id` (with cfg.tracking_uri): the stage run the pods' rank 0 logs its training metrics to."""
    if not NAME_RE.match(name) or len(name) > MAX_NAME:
        raise ValueError(f"TrainJob name {name!r}: lower-case DNS label of at most {MAX_NAME} chars expected")
    for label, uri in (("preprocessed", preprocessed_uri), ("out", out_uri)):
        if not uri.startswith("s3://"):
            raise ValueError(f"{label} location {uri!r}: every node must reach it, use s3://bucket/prefix")
    metadata = _api(
        api.IoK8sApimachineryPkgApisMetaV1ObjectMeta,
        name=name,
        namespace=cfg.namespace,
        labels={"app.kubernetes.io/part-of": "slicefm", "app.kubernetes.io/component": "pretrain"},
    )
    spec = _api(
        api.TrainerV1alpha1TrainJobSpec,
        runtime_ref=_api(
            api.TrainerV1alpha1RuntimeRef, api_group=GROUP, kind="ClusterTrainingRuntime", name=cfg.runtime
        ),
        trainer=_trainer(cfg, preprocessed_uri, out_uri, config_yaml, mlflow_run_id),
        runtime_patches=[_runtime_patch(cfg)],
    )
    job = _api(
        api.TrainerV1alpha1TrainJob, api_version=API_VERSION, kind="TrainJob", metadata=metadata, spec=spec
    )
    return job.to_dict()


# --- status and failure diagnosis ------------------------------------------------------------------


def terminal_condition(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The Failed or Complete condition whose status is "True" (Failed wins), else None."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    for kind in ("Failed", "Complete"):
        for cond in conditions:
            if cond.get("type") == kind and cond.get("status") == "True":
                return cond
    return None


def _progress(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    jobs = ", ".join(
        f"{j.get('name')}: {j.get('active', 0)} active, {j.get('ready', 0)} ready, {j.get('failed', 0)} failed"
        for j in status.get("jobsStatus") or []
    )
    conds = [c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"]
    return f"conditions {conds or '-'}; jobs {jobs or '-'}"


@dataclass(frozen=True)
class PodReport:
    """What went wrong in one pod of the job (or, when nothing did, its phase)."""

    name: str
    phase: str
    reason: str = ""
    exit_code: int | None = None
    log_tail: list[str] = field(default_factory=list)

    def describe(self) -> str:
        head = f"pod {self.name} ({self.phase})"
        if self.reason:
            head += f": {self.reason}"
        if self.exit_code is not None:
            head += f", exit code {self.exit_code}"
        return "\n".join([head, *(f"    | {line}" for line in self.log_tail)])


def _container_problem(cs: Any) -> tuple[str, int | None, bool] | None:
    """(reason, exit code, logs of the previous run?) of a failed container status, else None."""
    state, last = cs.state, cs.last_state
    last_term = last.terminated if last is not None else None
    if state is not None and state.terminated is not None and state.terminated.exit_code != 0:
        term = state.terminated
        return f"container {cs.name} {term.reason or 'Error'}", term.exit_code, False
    if state is not None and state.waiting is not None and state.waiting.reason in STUCK_REASONS:
        msg = f"container {cs.name} {state.waiting.reason}"
        if state.waiting.message:
            msg += f" ({state.waiting.message})"
        return msg, last_term.exit_code if last_term else None, last_term is not None
    if last_term is not None and last_term.exit_code != 0:
        return f"container {cs.name} restarted after {last_term.reason or 'Error'}", last_term.exit_code, True
    return None


def _pod_report(core: Any, pod: Any, namespace: str, log_lines: int) -> tuple[PodReport, bool]:
    status = pod.status
    phase = (status.phase if status else None) or "Unknown"
    statuses = [*(status.init_container_statuses or []), *(status.container_statuses or [])] if status else []
    for cs in statuses:
        problem = _container_problem(cs)
        if problem is not None:
            reason, code, previous = problem
            logs = _log_tail(core, pod.metadata.name, namespace, cs.name, log_lines, previous)
            return PodReport(pod.metadata.name, phase, reason, code, logs), True
    if phase == "Failed":
        reason = ": ".join(x for x in (status.reason, status.message) if x) or "pod failed"
        logs = _log_tail(core, pod.metadata.name, namespace, NODE, log_lines, False)
        return PodReport(pod.metadata.name, phase, reason, None, logs), True
    for cond in (status.conditions or []) if status else []:
        if cond.type == "PodScheduled" and cond.status == "False":
            reason = ": ".join(x for x in (cond.reason, cond.message) if x)
            return PodReport(pod.metadata.name, phase, reason), False
    return PodReport(pod.metadata.name, phase), False


def _log_tail(core: Any, pod: str, namespace: str, container: str, n: int, previous: bool) -> list[str]:
    if n <= 0:
        return []
    try:
        text = core.read_namespaced_pod_log(
            pod, namespace, container=container, tail_lines=n, previous=previous or None
        )
    except Exception as exc:  # logs are a courtesy: never hide the failure behind a log error
        return [f"<logs unavailable: {_short(exc)}>"]
    return str(text).splitlines()[-n:]


def _short(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    return f"HTTP {status} {reason}" if status else f"{type(exc).__name__}: {exc}"


def diagnose_pods(core: Any, namespace: str, name: str, log_lines: int = 50) -> list[PodReport]:
    """Reports of the job's pods that failed or are stuck; every pod's phase when none did."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_NAME_LABEL}={name}").items
    reports = [_pod_report(core, pod, namespace, log_lines) for pod in pods]
    bad = [r for r, failed in reports if failed]
    return bad or [r for r, _ in reports]


class TrainJobFailed(RuntimeError):
    """The TrainJob ended in Failed (or vanished); the message names the failed pods, reasons and logs."""

    def __init__(self, namespace: str, name: str, summary: str, pods: list[PodReport], note: str = ""):
        self.namespace, self.name, self.summary, self.pods = namespace, name, summary, pods
        lines = [f"TrainJob {namespace}/{name} {summary}"]
        lines += [f"  {p.describe()}" for p in pods]
        if not pods:
            lines.append(f"  no pods found with label {JOBSET_NAME_LABEL}={name}")
        if note:
            lines.append(f"  {note}")
        super().__init__("\n".join(lines))


class TrainJobTimeout(TrainJobFailed):
    """The TrainJob reached no terminal condition in time (pods may be Pending: see the message)."""


def _failure(
    exc_type: type[TrainJobFailed], core: Any, namespace: str, name: str, summary: str, log_lines: int
) -> TrainJobFailed:
    try:
        return exc_type(namespace, name, summary, diagnose_pods(core, namespace, name, log_lines))
    except Exception as exc:  # e.g. no RBAC on pods: still report the job's own reason
        return exc_type(namespace, name, summary, [], note=f"could not list pods: {_short(exc)}")


# --- the cluster's Trainer release -----------------------------------------------------------------

# Labels / annotations through which an installation may declare the Trainer release of its CRDs (the Helm
# chart labels its objects helm.sh/chart=kubeflow-trainer-<version>; the upstream CRDs carry neither).
RELEASE_KEYS = ("app.kubernetes.io/version", "helm.sh/chart")
_RELEASE_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


class TrainerAPIMismatch(RuntimeError):
    """The cluster's TrainJob API is not the one slicefm builds for (a Kubeflow Trainer 2.3 release)."""


@dataclass(frozen=True)
class InstalledTrainer:
    """What the cluster's TrainJob CRD says about the Trainer release installed."""

    served: tuple[str, ...]  # API versions served
    storage: str | None  # the storage version
    declared: str | None  # release declared by a label / annotation (RELEASE_KEYS), e.g. "v2.3.0"
    shape: str  # release whose TrainJob spec the served v1alpha1 schema has: v2.0 ... v2.3, or "unknown"

    def describe(self) -> str:
        declared = f", declares release {self.declared}" if self.declared else ", declares no release"
        return (
            f"serves {list(self.served) or 'nothing'} (storage {self.storage}){declared}, "
            f"spec shape of release {self.shape}"
        )


def _schema_props(schema: dict[str, Any], *path: str) -> dict[str, Any]:
    """The `properties` of the OpenAPI schema at `path` (list items are stepped through); {} if absent."""
    node: dict[str, Any] = schema
    for key in path:
        node = (node.get("items", node).get("properties") or {}).get(key) or {}
    return node.get("items", node).get("properties") or {}


def _spec_shape(schema: dict[str, Any]) -> str:
    """The release whose TrainJob spec this schema has. v2.3 added terminationGracePeriodSeconds to the pod
    patch of runtimePatches (kubeflow-trainer-api 2.2.0 vs 2.3.0); v2.1 had podTemplateOverrides, v2.0
    podSpecOverrides."""
    spec = _schema_props(schema, "spec")
    if "runtimePatches" in spec:
        pod = _schema_props(spec["runtimePatches"], *POD_PATCH_PATH)
        return "v2.3" if "terminationGracePeriodSeconds" in pod else "v2.2"
    if "podTemplateOverrides" in spec:
        return "v2.1"
    if "podSpecOverrides" in spec:
        return "v2.0"
    return "unknown"


def _declared_release(meta: dict[str, Any]) -> str | None:
    for key in RELEASE_KEYS:
        for source in (meta.get("labels") or {}, meta.get("annotations") or {}):
            if key in source and (m := _RELEASE_RE.search(str(source[key]))):
                return "v" + ".".join(m.groups())
    return None


def installed_trainer(crd: dict[str, Any]) -> InstalledTrainer:
    """Served / storage versions, declared release and the spec shape of a TrainJob CRD object."""
    versions = (crd.get("spec") or {}).get("versions") or []
    ours = next((v for v in versions if v.get("name") == VERSION), {})
    schema = (ours.get("schema") or {}).get("openAPIV3Schema") or {}
    return InstalledTrainer(
        served=tuple(v["name"] for v in versions if v.get("served")),
        storage=next((v["name"] for v in versions if v.get("storage")), None),
        declared=_declared_release(crd.get("metadata") or {}),
        shape=_spec_shape(schema) if ours else "unknown",
    )


def trainer_problems(found: InstalledTrainer) -> list[str]:
    """Why the installed TrainJob API is not the one slicefm builds for ([] when it is)."""
    wanted = TRAINER_RELEASE.rsplit(".", 1)[0]  # v2.3: any patch release
    problems = []
    if VERSION not in found.served:
        problems.append(f"{API_VERSION} is not served")
    if found.declared and found.declared.rsplit(".", 1)[0] != wanted:
        problems.append(f"the CRD declares release {found.declared}")
    if found.shape != wanted and not (found.shape == "unknown" and found.declared):
        problems.append(f"its TrainJob spec is the one of release {found.shape}")
    return problems


def _read_crd(api_client: Any) -> dict[str, Any] | None:
    """The TrainJob CRD as a plain dict, None when it is not installed (raw JSON: the client's CRD models
    choke on some real schemas)."""
    from kubernetes import client

    try:
        resp = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(
            CRD_NAME, _preload_content=False
        )
    except _api_exception() as exc:
        if exc.status == 404:
            return None
        raise
    return json.loads(resp.data)


def check_trainer_api(api_client: Any) -> InstalledTrainer | None:
    """Raise TrainerAPIMismatch unless the cluster's TrainJob CRD is the one of a Trainer 2.3 release.

    None when the CRD may not be read (no RBAC for it): the strict creation still rejects unknown fields."""
    needed = (
        f"slicefm needs Kubeflow Trainer {TRAINER_RELEASE} ({API_VERSION}, spec.runtimePatches); "
        "see k8s/README.md"
    )
    try:
        crd = _read_crd(api_client)
    except _api_exception() as exc:
        if exc.status not in (401, 403):
            raise
        log.warning("cannot read CRD %s (%s): Trainer release not checked", CRD_NAME, _short(exc))
        return None
    if crd is None:
        raise TrainerAPIMismatch(
            f"no TrainJob CRD ({CRD_NAME}) in the cluster: Trainer is not installed; {needed}"
        )
    found = installed_trainer(crd)
    problems = trainer_problems(found)
    if problems:
        raise TrainerAPIMismatch(
            f"the cluster's TrainJob CRD {CRD_NAME} {found.describe()}: {'; '.join(problems)}; {needed}"
        )
    log.info("TrainJob CRD %s %s", CRD_NAME, found.describe())
    return found


# --- submit / wait / cleanup ----------------------------------------------------------------------


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


def _status_message(exc: Exception) -> str:
    try:
        return str(json.loads(getattr(exc, "body", "") or "{}").get("message") or _short(exc))
    except ValueError:
        return _short(exc)


def _create(api: Any, namespace: str, manifest: dict[str, Any]) -> None:
    """Create with fieldValidation=Strict: the API server rejects (400) a field its TrainJob schema does not
    have instead of dropping it silently."""
    name = manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest, field_validation="Strict"
        )
        log.info("created TrainJob %s/%s (Kubeflow Trainer %s)", namespace, name, TRAINER_RELEASE)
    except _api_exception() as exc:
        message = _status_message(exc)
        if exc.status == 400 and "unknown field" in message:
            raise TrainerAPIMismatch(
                f"the API server rejected TrainJob {namespace}/{name}: {message} "
                f"(built for Kubeflow Trainer {TRAINER_RELEASE})"
            ) from exc
        if exc.status != 409:
            raise
        # Same name = same pipeline run (a retried step): follow the job that is already there.
        log.warning("TrainJob %s/%s already exists: waiting for it instead", namespace, name)


def delete_trainjob(api: Any, namespace: str, name: str) -> bool:
    """Delete the TrainJob (its JobSet and pods go with it); False when it was already gone."""
    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body={"propagationPolicy": "Background"}
        )
    except _api_exception() as exc:
        if exc.status == 404:
            return False
        raise
    log.info("deleted TrainJob %s/%s", namespace, name)
    return True


def _get(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """The TrainJob, or None after a transient error (the poll loop retries until its deadline)."""
    from urllib3.exceptions import HTTPError

    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except _api_exception() as exc:
        if exc.status not in RETRYABLE_STATUS:
            raise
        log.warning("polling TrainJob %s/%s: %s (retrying)", namespace, name, _short(exc))
    except HTTPError as exc:
        log.warning("polling TrainJob %s/%s: %s (retrying)", namespace, name, _short(exc))
    return None


class Terminated(BaseException):
    """SIGTERM reached the launcher (the pipeline run was cancelled): the TrainJob is deleted."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into Terminated so `finally` blocks run (Python's default would just exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_for(
    api: Any,
    core: Any,
    namespace: str,
    name: str,
    timeout_s: float,
    poll_s: float,
    log_lines: int,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> dict[str, Any]:
    deadline = clock() + timeout_s
    last = ""
    while True:
        try:
            obj = _get(api, namespace, name)
        except _api_exception() as exc:
            if exc.status != 404:
                raise
            summary = "disappeared while running (deleted by someone else?)"
            raise _failure(TrainJobFailed, core, namespace, name, summary, log_lines) from exc
        if obj is not None:
            cond = terminal_condition(obj)
            if cond is not None and cond["type"] == "Complete":
                log.info("TrainJob %s/%s complete", namespace, name)
                return obj
            if cond is not None:
                detail = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
                summary = f"failed: {detail}" if detail else "failed"
                raise _failure(TrainJobFailed, core, namespace, name, summary, log_lines)
            progress = _progress(obj)
            if progress != last:
                log.info("TrainJob %s/%s: %s", namespace, name, progress)
                last = progress
        remaining = deadline - clock()
        if remaining <= 0:
            summary = f"did not finish within {timeout_s:g} s (last seen: {last or 'nothing'})"
            raise _failure(TrainJobTimeout, core, namespace, name, summary, log_lines)
        sleep(min(poll_s, remaining))


def submit_and_wait(
    api: Any,
    manifest: dict[str, Any],
    *,
    core: Any = None,
    timeout_s: float = 48 * 3600,
    poll_s: float = 30,
    cleanup: bool = True,
    log_lines: int = 50,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    check_api: bool = True,
) -> dict[str, Any]:
    """Create the TrainJob, poll until Complete (returned) or Failed / timeout (TrainJobFailed).

    `api` is a kubernetes.client.CustomObjectsApi; `core` a CoreV1Api (default: on the same ApiClient),
    used only to explain a failure. With `check_api`, the cluster's TrainJob CRD is checked first
    (TrainerAPIMismatch unless it is a Trainer 2.3 release); the job is created with strict field
    validation. With `cleanup`, the TrainJob is deleted however the wait ends; on SIGTERM (a cancelled
    pipeline run) it is deleted in any case, so no GPU keeps training for nobody.
    """
    from kubernetes import client

    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    core = core if core is not None else client.CoreV1Api(api.api_client)
    if check_api:
        check_trainer_api(api.api_client)
    with _sigterm_raises():
        _create(api, namespace, manifest)
        cancelled = False
        try:
            return _wait_for(api, core, namespace, name, timeout_s, poll_s, log_lines, sleep, clock)
        except Terminated:
            cancelled = True
            raise
        finally:
            if cleanup or cancelled:
                try:
                    delete_trainjob(api, namespace, name)
                except Exception as exc:  # never replace the real outcome with a cleanup error
                    log.warning("could not delete TrainJob %s/%s: %s", namespace, name, _short(exc))


def kube_api_client() -> Any:
    """An ApiClient: the pod's service account inside a cluster, else the local kubeconfig ($KUBECONFIG)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # The client reads $KUBECONFIG once, at import: read it now so a later setting counts.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


def run_trainjob(
    cfg: TrainJobConfig,
    *,
    name: str,
    preprocessed_uri: str,
    out_uri: str,
    config_yaml: str,
    api_client: Any = None,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Build, submit and wait for one pretraining TrainJob; returns the finished TrainJob object."""
    from kubernetes import client

    manifest = build_trainjob(cfg, name, preprocessed_uri, out_uri, config_yaml, mlflow_run_id)
    api_client = api_client if api_client is not None else kube_api_client()
    return submit_and_wait(
        client.CustomObjectsApi(api_client),
        manifest,
        core=client.CoreV1Api(api_client),
        timeout_s=cfg.timeout_s,
        poll_s=cfg.poll_s,
        cleanup=cfg.cleanup,
        log_lines=cfg.log_lines,
    )


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the config YAML in the env) as readable literal blocks."""


_BlockDumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def to_yaml(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False, width=1000)
