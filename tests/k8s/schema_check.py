"""Strict manifest validation for the tests: Kubernetes OpenAPI models (kubernetes client) + JSON schemas.

Core kinds are walked against the `openapi_types` / `attribute_map` of the kubernetes client's models:
unknown keys and wrong types are errors, and instantiating each model with client-side validation on
catches missing required fields. Resource quantities must be strings here (the models type them as
str; the API server would also take numbers). The TrainJob schema (k8s/schemas/) embeds core types
through the keyword `x-kubernetes-model`, and marks keyed lists with `x-kubernetes-list-map-keys`.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes.client as kc
import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
TRAINJOB_SCHEMA = SCHEMAS / "trainer-v2.1.0-trainjob.schema.json"
KUSTOMIZATION_SCHEMA = SCHEMAS / "kustomization.schema.json"

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


def _k8s_model_keyword(validator, model, instance, schema):  # noqa: ANN001 (jsonschema keyword API)
    for err in model_errors(instance, model):
        yield ValidationError(f"{model}: {err}")


def _list_map_keys_keyword(validator, keys, instance, schema):  # noqa: ANN001
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
    Draft202012Validator,
    {"x-kubernetes-model": _k8s_model_keyword, "x-kubernetes-list-map-keys": _list_map_keys_keyword},
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


def trainjob_errors(doc: Any) -> list[str]:
    return schema_errors(doc, TRAINJOB_SCHEMA)


def document_errors(doc: Any) -> list[str]:
    """Errors of one Kubernetes-style document, by kind: TrainJob, Kustomization or a core object."""
    if not isinstance(doc, dict):
        return [f"expected a mapping, got {type(doc).__name__}"]
    if doc.get("kind") == "TrainJob":
        return trainjob_errors(doc)
    if doc.get("kind") == "Kustomization":
        return schema_errors(doc, KUSTOMIZATION_SCHEMA)
    return core_errors(doc)


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
