"""Strict manifest validation for the tests: Kubernetes OpenAPI models (kubernetes client), the Kubeflow
Trainer API models (kubeflow-trainer-api), the KServe InferenceService schema and the Kustomization JSON
schema.

Core kinds are walked against the `openapi_types` / `attribute_map` of the kubernetes client's models:
unknown keys and wrong types are errors, and instantiating each model with client-side validation on
catches missing required fields. Resource quantities must be strings here (the models type them as
str; the API server would also take numbers). A TrainJob is read with the Trainer v2.3.0 models
(`from_dict`: wrong types, missing required fields) and compared with what they read back (`to_dict`):
a field the API does not have is dropped by the models, and reported. The rules the CRD and the Trainer
webhook add to the types (name format, keyed lists, reserved env) are checked on top. An InferenceService
is validated against k8s/schemas/inferenceservice-v1beta1.schema.json (generated from the KServe SDK's
v1beta1 models; its Kubernetes types are $refs into kubernetes-validate's strict definitions), then against
the rules KServe applies to a custom predictor (see inferenceservice_rule_errors).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import kubernetes.client as kc
import yaml
from jsonschema import Draft202012Validator, ValidationError, validators
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from pydantic import BaseModel
from referencing import Registry, Resource

from slicefm.edge.trainjob import API_VERSION, POD_PATCH_PATH

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
KUSTOMIZATION_SCHEMA = SCHEMAS / "kustomization.schema.json"
INFERENCESERVICE_SCHEMA = SCHEMAS / "inferenceservice-v1beta1.schema.json"
KSERVE_RELEASE = "v0.21.0"  # the KServe release the schema and k8s/serving/ target

# (apiVersion, kind) of the core objects slicefm ships -> kubernetes client model.
CORE_KINDS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Secret"): "V1Secret",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Service"): "V1Service",
    ("v1", "Pod"): "V1Pod",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
}
_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\(str, (.+)\)$")
# 'object' fields of the models slicefm touches are IntOrString (ports, maxSurge).
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "object": (str, int),
}


@cache
def _client_config() -> kc.Configuration:
    cfg = kc.Configuration()
    cfg.client_side_validation = True
    return cfg


def _check(value: Any, type_name: str, path: str, errors: list[str]) -> Any:
    if m := _LIST.match(type_name):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list ({type_name}), got {type(value).__name__}")
            return value
        return [_check(v, m.group(1), f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if m := _DICT.match(type_name):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map ({type_name}), got {type(value).__name__}")
            return value
        for key, sub in value.items():
            if not isinstance(key, str):
                errors.append(f"{path}: map key {key!r} is not a string")
            _check(sub, m.group(1), f"{path}.{key}", errors)
        return value
    if type_name in _PRIMITIVES:
        allowed = _PRIMITIVES[type_name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    cls = getattr(kc, type_name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        errors.append(f"{path}: no kubernetes model {type_name}")
        return value
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
        return value
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    kwargs = {}
    for key, sub in value.items():
        attr = by_json.get(key)
        if attr is None:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        elif sub is not None:
            kwargs[attr] = _check(sub, cls.openapi_types[attr], f"{path}.{key}", errors)
    try:
        return cls(local_vars_configuration=_client_config(), **kwargs)
    except (ValueError, TypeError) as exc:  # the generated setters reject a missing required field
        errors.append(f"{path or '<root>'}: {type_name}: {exc}")
        return value


def model_errors(value: Any, model: str, path: str = "") -> list[str]:
    """Every schema error of `value` as the kubernetes model `model` (e.g. V1Deployment, V1EnvVar)."""
    errors: list[str] = []
    _check(value, model, path, errors)
    return errors


def core_errors(doc: dict[str, Any]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in CORE_KINDS:
        return [f"no core model for apiVersion/kind {key}"]
    return model_errors(doc, CORE_KINDS[key])


def _list_map_keys_keyword(validator, keys, instance, schema):  # noqa: ANN001 (jsonschema keyword API)
    if not isinstance(instance, list):
        return
    seen: set[tuple] = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        ident = tuple(item.get(k) for k in keys)
        if ident in seen:
            yield ValidationError(f"duplicate list-map key {dict(zip(keys, ident, strict=True))}")
        seen.add(ident)


K8sSchemaValidator = validators.extend(
    Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys_keyword}
)


@cache
def _validator(schema_path: Path) -> Any:
    schema = json.loads(schema_path.read_text())
    K8sSchemaValidator.check_schema(schema)
    return K8sSchemaValidator(schema)


def schema_errors(doc: Any, schema_path: Path) -> list[str]:
    errs = sorted(_validator(schema_path).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {_clip(e.message)}" for e in errs]


def _clip(text: str, n: int = 400) -> str:
    return text if len(text) <= n else f"{text[: n // 2]} ... {text[-n // 2 :]}"


# --- TrainJob: the Trainer API models and the rules on top of them --------------------------------------

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The Torch plugin webhook rejects the torchrun variables it sets itself.
RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
# Containers whose env only spec.trainer / spec.initializer may set (the webhook rejects it in a patch).
NO_PATCH_ENV = {"node", "dataset-initializer", "model-initializer"}
# Lists the CRD keys by a field (x-kubernetes-list-type: map): a duplicate key is invalid.
LIST_KEYS = {
    "runtimePatches": "manager",
    **dict.fromkeys(
        [
            "replicatedJobs",
            "containers",
            "initContainers",
            "volumes",
            "volumeMounts",
            "env",
            "imagePullSecrets",
        ],
        "name",
    ),
}


def _same(original: Any, read: Any) -> bool:
    if isinstance(read, datetime) and isinstance(original, str):  # metav1.Time comes back parsed
        return datetime.fromisoformat(original) == read
    return original == read and type(original) is type(read)


def _dropped(original: Any, read: Any, path: str) -> list[str]:
    """Where `read` (the models' to_dict) lost or changed something of `original`."""
    if isinstance(original, dict) and isinstance(read, dict):
        return [
            err
            for key, value in original.items()
            for err in (
                _dropped(value, read[key], f"{path}.{key}" if path else key)
                if key in read
                else [f"{path}.{key}: unknown field" if path else f"{key}: unknown field"]
            )
        ]
    if isinstance(original, list) and isinstance(read, list) and len(original) == len(read):
        return [
            e
            for i, (o, r) in enumerate(zip(original, read, strict=True))
            for e in _dropped(o, r, f"{path}[{i}]")
        ]
    return [] if _same(original, read) else [f"{path}: {original!r} was read as {read!r}"]


def api_errors(doc: Any, model: type[BaseModel] = TrainerV1alpha1TrainJob) -> list[str]:
    """Errors of `doc` as the Trainer API model: wrong types and missing required fields (the model's
    validation), and every field it does not have (the model drops it, the round trip shows it)."""
    if not isinstance(doc, dict):
        return [f"expected a mapping, got {type(doc).__name__}"]
    try:
        parsed = model.from_dict(doc)  # type: ignore[attr-defined]
    except ValueError as exc:  # pydantic's ValidationError, or a oneOf wrapper's (Quantity)
        return [f"{model.__name__}: {_clip(str(exc))}"]
    return _dropped(doc, parsed.to_dict(), "")


def _keyed_list_errors(node: Any, path: str) -> list[str]:
    if isinstance(node, list):
        return [e for i, item in enumerate(node) for e in _keyed_list_errors(item, f"{path}[{i}]")]
    if not isinstance(node, dict):
        return []
    errors = []
    for key, value in node.items():
        if key in LIST_KEYS and isinstance(value, list):
            names = [item.get(LIST_KEYS[key]) for item in value if isinstance(item, dict)]
            errors += [
                f"{path}.{key}: duplicate {LIST_KEYS[key]} {n!r}"
                for n in sorted({n for n in names if names.count(n) > 1})
            ]
        errors += _keyed_list_errors(value, f"{path}.{key}" if path else key)
    return errors


def pod_patch(doc: dict[str, Any], job: str = "node", manager: str | None = None) -> dict[str, Any]:
    """The pod spec a TrainJob's runtime patch (the first, or `manager`'s) sets for replicated job `job`."""
    patches = [p for p in doc["spec"]["runtimePatches"] if manager in (None, p["manager"])]
    node: Any = patches[0]
    for key in POD_PATCH_PATH:
        node = node[key]
        if key == "replicatedJobs":
            (node,) = [j for j in node if j["name"] == job]
    return node


def _pod_patches(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, patch in enumerate((doc.get("spec") or {}).get("runtimePatches") or []):
        jobs = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for job in jobs.get("replicatedJobs") or []:
            pod = (((job.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
            out.append((f"spec.runtimePatches[{i}] job {job.get('name')}", pod))
    return out


def trainjob_rule_errors(doc: dict[str, Any]) -> list[str]:
    """What the CRD and the Trainer webhook require beyond the models' types."""
    errors = []
    if (doc.get("apiVersion"), doc.get("kind")) != (API_VERSION, "TrainJob"):
        errors.append(
            f"apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}: {API_VERSION}/TrainJob expected"
        )
    name = str((doc.get("metadata") or {}).get("name") or "")
    if not DNS_LABEL.match(name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} does not match a DNS-1035 label of at most 63 chars")
    trainer = (doc.get("spec") or {}).get("trainer") or {}
    for var in sorted(RESERVED_ENV & {e.get("name") for e in trainer.get("env") or []}):
        errors.append(f"spec.trainer.env: {var} is set by the runtime's Torch plugin")
    for key in ("numNodes", "numProcPerNode"):
        if key in trainer and not (isinstance(trainer[key], int) and trainer[key] >= 1):
            errors.append(f"spec.trainer.{key}: {trainer[key]!r} is not a positive integer")
    for where, pod in _pod_patches(doc):
        for c in [*(pod.get("containers") or []), *(pod.get("initContainers") or [])]:
            if c.get("name") in NO_PATCH_ENV and "env" in c:
                errors.append(f"{where}: env of container {c['name']} may only be set through spec.trainer")
    return errors + _keyed_list_errors(doc, "")


def trainjob_errors(doc: Any) -> list[str]:
    """Every error of a TrainJob manifest (or object) against Kubeflow Trainer v2.3.0."""
    errors = api_errors(doc)
    return errors + trainjob_rule_errors(doc) if isinstance(doc, dict) else errors


# --- InferenceService: the KServe schema and the rules of a custom predictor ------------------------------

ISVC_CONTAINER = "kserve-container"  # the container KServe serves and gives the model to
STORAGE_URI_ENV = "STORAGE_URI"  # a custom predictor's storageUri: the storage initializer downloads it
MODEL_MOUNT = "/mnt/models"  # where the storage initializer puts the model (read-only in kserve-container)
DEPLOYMENT_MODES = {"Standard", "Knative"}  # KServe >= 0.16 names (RawDeployment / Serverless are legacy)


@cache
def _inferenceservice_validator() -> Any:
    schema = json.loads(INFERENCESERVICE_SCHEMA.read_text())
    origin = schema["x-origin"]
    assert "v" + origin["kserve_version"] == KSERVE_RELEASE, (origin["kserve_version"], KSERVE_RELEASE)
    strict_dir = origin["kubernetes_definitions"].split(", ")[1].split("/")[0]
    defs = json.loads(
        (resources.files("kubernetes_validate") / "kubernetes-json-schema" / strict_dir / "_definitions.json").read_text()
    )
    registry = Registry().with_resources(
        [(schema["$id"], Resource.from_contents(schema)), (defs["$id"], Resource.from_contents(defs))]
    )
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry)


def _json_path(error: ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")


def _schema_messages(error: ValidationError) -> list[str]:
    """The leaf errors of `error`: a oneOf/anyOf failure (a core $ref's nullable types) says which branch."""
    if error.context:
        return [m for sub in error.context for m in _schema_messages(sub)]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties") or {})
        return [f"{_json_path(error)}.{k}: unknown field".lstrip(".") for k in error.instance if k not in known]
    return [f"{_json_path(error) or '<root>'}: {_clip(error.message)}"]


def inferenceservice_schema_errors(doc: Any) -> list[str]:
    errs = sorted(_inferenceservice_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return sorted({m for e in errs for m in _schema_messages(e)})


def inferenceservice_rule_errors(doc: dict[str, Any]) -> list[str]:
    """What KServe's webhook and controller require of a custom predictor beyond the schema's types."""
    errors = []
    meta = doc.get("metadata") or {}
    name = str(meta.get("name") or "")
    if not DNS_LABEL.match(name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} does not match a DNS-1035 label of at most 63 chars")
    mode = (meta.get("annotations") or {}).get("serving.kserve.io/deploymentMode")
    if mode is not None and mode not in DEPLOYMENT_MODES:
        errors.append(f"serving.kserve.io/deploymentMode {mode!r}: one of {sorted(DEPLOYMENT_MODES)}")
    predictor = (doc.get("spec") or {}).get("predictor") or {}
    containers = predictor.get("containers") or []
    if containers:
        names = [c.get("name") for c in containers]
        if ISVC_CONTAINER not in names:
            errors.append(f"spec.predictor.containers: no container named {ISVC_CONTAINER} (the one KServe serves)")
        errors += [f"spec.predictor.containers: duplicate name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
        for c in containers:
            env_names = [e.get("name") for e in c.get("env") or []]
            if STORAGE_URI_ENV in env_names and c.get("name") != ISVC_CONTAINER:
                errors.append(f"container {c.get('name')}: {STORAGE_URI_ENV} is read from {ISVC_CONTAINER} only")
            mounts = [m.get("mountPath") for m in c.get("volumeMounts") or []]
            if c.get("name") == ISVC_CONTAINER and STORAGE_URI_ENV in env_names and MODEL_MOUNT in mounts:
                errors.append(f"container {ISVC_CONTAINER}: {MODEL_MOUNT} is mounted by the storage initializer")
        if "model" in predictor:
            errors.append("spec.predictor: containers and model are exclusive (a custom predictor has no model)")
    return errors + _keyed_list_errors(doc, "")


def inferenceservice_errors(doc: Any) -> list[str]:
    """Every error of an InferenceService manifest against KServe's v1beta1 API and custom-predictor rules."""
    errors = inferenceservice_schema_errors(doc)
    return errors + inferenceservice_rule_errors(doc) if isinstance(doc, dict) else errors


def document_errors(doc: Any) -> list[str]:
    """Errors of one Kubernetes-style document, by kind: TrainJob, InferenceService, Kustomization or a core
    object."""
    if not isinstance(doc, dict):
        return [f"expected a mapping, got {type(doc).__name__}"]
    if doc.get("kind") == "TrainJob":
        return trainjob_errors(doc)
    if doc.get("kind") == "InferenceService":
        return inferenceservice_errors(doc)
    if doc.get("kind") == "Kustomization":
        return schema_errors(doc, KUSTOMIZATION_SCHEMA)
    return core_errors(doc)


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
