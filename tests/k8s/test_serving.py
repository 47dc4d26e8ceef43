"""k8s/serving: the KServe InferenceService of the evaluation head, and its GPU option (overlays/serving-gpu).

The manifests validate (the InferenceService against the KServe v1beta1 schema, the rest with
kubernetes-validate --strict); the predictor runs MLflow's scoring server on the directory the storage
initializer fills; it is probed, bounded and unprivileged; S3 credentials reach only the storage initializer;
the GPU option requests a GPU on the same node pool as the pretraining example. Each check is also shown to
fail on a broken copy.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import click
import jsonpatch
import pytest
import yaml

from tests.k8s.schema_check import (
    INFERENCESERVICE_SCHEMA,
    ISVC_CONTAINER,
    K8S,
    KSERVE_RELEASE,
    MODEL_MOUNT,
    STORAGE_URI_ENV,
    document_errors,
    load_docs,
)
from tests.k8s.test_manifests import _kustomize, _strict_validation

SERVING = K8S / "serving"
GPU_OVERLAY = K8S / "overlays" / "serving-gpu"
ISVC = "slicefm-head"
SERVICE_ACCOUNT = "slicefm-serving"


def _isvc(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    return isvc


def _container(isvc: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in isvc["spec"]["predictor"]["containers"] if c["name"] == ISVC_CONTAINER]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def _serve_params(container: dict[str, Any]) -> dict[str, Any]:
    """Parse the container's arguments with the installed MLflow's own `mlflow models serve` command."""
    from mlflow.models.cli import serve

    assert container["command"] == ["mlflow", "models", "serve"]
    return serve.make_context("serve", list(container["args"])).params


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {"cpu": _kustomize("serving"), "gpu": _kustomize("overlays/serving-gpu")}


# --- validation -----------------------------------------------------------------------------------------


def test_schema_records_its_origin():
    schema = json.loads(INFERENCESERVICE_SCHEMA.read_text())
    origin = schema["x-origin"]
    assert origin["kserve_wheel"] == f"kserve-{KSERVE_RELEASE[1:]}-py3-none-any.whl"
    assert len(origin["kserve_wheel_sha256"]) == 64
    assert "io.k8s.api.core.v1.Container" in origin["kubernetes_definitions_used"]
    assert KSERVE_RELEASE in (K8S / "README.md").read_text()


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_rendered_serving_objects_validate(variant, rendered, tmp_path):
    docs = rendered[variant]
    assert {d["kind"] for d in docs} == {"InferenceService", "ServiceAccount"}
    isvc = _isvc(docs)
    assert isvc["metadata"]["name"] == ISVC and isvc["metadata"]["namespace"] == "slicefm"
    assert document_errors(isvc) == []
    core = [d for d in docs if d["kind"] != "InferenceService"]
    done = _strict_validation(core, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = copy.deepcopy(core)
    broken[0]["secret"] = broken[0].pop("secrets")  # misspelt
    assert _strict_validation(broken, tmp_path).returncode != 0


# --- the model server -------------------------------------------------------------------------------------


def serving_problems(isvc: dict[str, Any]) -> list[str]:
    """The predictor serves the MLflow model directory the storage initializer downloads, on its port."""
    problems = []
    container = _container(isvc)
    params = _serve_params(container)
    if params["model_uri"] != MODEL_MOUNT:
        problems.append(f"serves {params['model_uri']}, the storage initializer fills {MODEL_MOUNT}")
    if params["env_manager"] != "local":
        problems.append(
            f"--env-manager {params['env_manager']}: the image already has the model's dependencies"
        )
    if params["host"] != "0.0.0.0":
        problems.append(f"listens on {params['host']}")
    ports = [p["containerPort"] for p in container.get("ports") or []]
    if ports != [params["port"]]:
        problems.append(f"container ports {ports}, the server listens on {params['port']}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = (container.get(probe) or {}).get("httpGet") or {}
        if get.get("path") not in ("/ping", "/health") or get.get("port") != params["port"]:
            problems.append(f"{probe}: {get or 'missing'}")
    uri = _env(container).get(STORAGE_URI_ENV, {}).get("value", "")
    if not (uri.startswith("s3://") and uri.endswith("/")):
        problems.append(f"{STORAGE_URI_ENV} {uri!r}: an s3:// MLflow model directory with a trailing slash")
    return problems


def test_predictor_serves_the_downloaded_mlflow_model(rendered):
    isvc = _isvc(rendered["cpu"])
    assert serving_problems(isvc) == []
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    predictor = isvc["spec"]["predictor"]
    assert "model" not in predictor and "storageUri" not in json.dumps(predictor)  # a custom predictor
    for mutate, expected in [
        (lambda c: c["args"].__setitem__(1, "/mnt/model"), "serves /mnt/model"),
        (lambda c: c["args"].__setitem__(-1, "8000"), "container ports [8080], the server listens on 8000"),
        (lambda c: c["readinessProbe"]["httpGet"].update(path="/invocations"), "readinessProbe"),
        (lambda c: _env(c)[STORAGE_URI_ENV].update(value="s3://b/m/head"), STORAGE_URI_ENV),
    ]:
        broken = copy.deepcopy(isvc)
        mutate(_container(broken))
        assert any(expected in p for p in serving_problems(broken)), (expected, serving_problems(broken))


def test_serve_command_rejects_a_misspelt_flag(rendered):
    container = copy.deepcopy(_container(_isvc(rendered["cpu"])))
    container["args"] = [a.replace("--env-manager", "--env-manger") for a in container["args"]]
    with pytest.raises(click.NoSuchOption):
        _serve_params(container)


def test_predictor_is_bounded_and_unprivileged(rendered):
    predictor = _isvc(rendered["cpu"])["spec"]["predictor"]
    container = _container(_isvc(rendered["cpu"]))
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    assert not any(
        "gpu" in k for k in [*container["resources"]["requests"], *container["resources"]["limits"]]
    )
    assert "nodeSelector" not in predictor and "tolerations" not in predictor  # CPU by default
    assert predictor["minReplicas"] >= 1
    assert (
        predictor["securityContext"]["runAsNonRoot"] is True
        and predictor["securityContext"]["runAsUser"] != 0
    )
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    assert MODEL_MOUNT not in {m["mountPath"] for m in container["volumeMounts"]}  # KServe mounts it
    assert predictor["automountServiceAccountToken"] is False


def test_serving_image_is_the_project_image(rendered):
    settings = yaml.safe_load((K8S / "trainjob" / "settings.yaml").read_text())
    assert _container(_isvc(rendered["cpu"]))["image"] == settings["image"]


# --- credentials ----------------------------------------------------------------------------------------


def credential_problems(docs: list[dict[str, Any]], secrets: dict[str, dict[str, Any]]) -> list[str]:
    """KServe gives the storage initializer the S3 keys of the secrets that the predictor's service account
    lists (keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, inferenceservice-config's defaults); the model
    server itself gets no credentials and no API token."""
    isvc = _isvc(docs)
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    name = isvc["spec"]["predictor"].get("serviceAccountName")
    if name not in accounts:
        return [f"service account {name!r} is not shipped with the InferenceService"]
    sa = accounts[name]
    problems = [] if sa.get("automountServiceAccountToken") is False else [f"{name} mounts an API token"]
    listed = [s["name"] for s in sa.get("secrets") or []]
    if not any({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secrets.get(s, {})) for s in listed):
        problems.append(f"{name} lists no secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: {listed}")
    if "secretKeyRef" in json.dumps(isvc["spec"]["predictor"]["containers"]):
        problems.append("the model server reads a secret")
    return problems


def test_s3_credentials_reach_only_the_storage_initializer(rendered):
    secrets = {d["metadata"]["name"]: d["stringData"] for d in load_docs(K8S / "base" / "secrets.yaml")}
    docs = rendered["cpu"]
    assert credential_problems(docs, secrets) == []
    broken = copy.deepcopy(docs)
    next(d for d in broken if d["kind"] == "ServiceAccount")["secrets"] = [{"name": "slicefm-mlflow"}]
    assert credential_problems(broken, secrets) == [
        f"{SERVICE_ACCOUNT} lists no secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: ['slicefm-mlflow']"
    ]
    leaky = copy.deepcopy(docs)
    _container(_isvc(leaky))["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "slicefm-s3", "key": "X"}}}
    )
    assert credential_problems(leaky, secrets) == ["the model server reads a secret"]


# --- GPU option -------------------------------------------------------------------------------------------


def _gpu_example_pod() -> dict[str, Any]:
    """nodeSelector and tolerations that overlays/gpu-example gives the pretraining pods."""
    ops = yaml.safe_load((K8S / "overlays" / "gpu-example" / "trainjob-gke-h100.yaml").read_text())
    return {
        op["path"].rsplit("/", 1)[1]: op["value"]
        for op in ops
        if op["path"].endswith(("/nodeSelector", "/tolerations"))
    }


def gpu_problems(isvc: dict[str, Any]) -> list[str]:
    predictor, container = isvc["spec"]["predictor"], _container(isvc)
    problems = []
    for kind in ("requests", "limits"):
        if container["resources"].get(kind, {}).get("nvidia.com/gpu") != "1":
            problems.append(f"{kind}: no nvidia.com/gpu")
    pool = _gpu_example_pod()
    for key in ("nodeSelector", "tolerations"):
        if predictor.get(key) != pool[key]:
            problems.append(f"{key} {predictor.get(key)} is not the GPU pool's {pool[key]}")
    return problems


def test_gpu_option_requests_a_gpu_on_the_gpu_pool(rendered):
    gpu = _isvc(rendered["gpu"])
    assert gpu_problems(gpu) == []
    assert gpu_problems(_isvc(rendered["cpu"]))  # the check fails without the overlay
    # kustomize applied the overlay's JSON 6902 patch as jsonpatch does, and changed nothing else
    (patch,) = yaml.safe_load((GPU_OVERLAY / "kustomization.yaml").read_text())["patches"]
    assert patch["target"] == {
        "group": "serving.kserve.io",
        "version": "v1beta1",
        "kind": "InferenceService",
        "name": ISVC,
    }
    ops = yaml.safe_load((GPU_OVERLAY / patch["path"]).read_text())
    assert jsonpatch.apply_patch(_isvc(rendered["cpu"]), ops) == gpu
    # the patch addresses containers/0: the container KServe serves must stay first
    assert _isvc(rendered["cpu"])["spec"]["predictor"]["containers"][0]["name"] == ISVC_CONTAINER
