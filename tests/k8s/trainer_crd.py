"""The TrainJob CRD of a Kubeflow Trainer release as the fake API server serves it, derived from the models.

No CRD YAML ships with kubeflow-trainer-api, so the v2.3 CRD is built from its models: every model becomes a
structural OpenAPI schema with exactly its fields (what an API server prunes, or rejects under
fieldValidation=Strict), ObjectMeta stays an open `type: object` as in controller-gen's CRDs, Quantity and
IntOrString are int-or-string. Older releases are the v2.3 CRD with the fields those releases lacked
(or had) edited in: enough for the launcher's release check, which reads exactly those fields.
"""

from __future__ import annotations

import copy
import types
from datetime import date, datetime
from functools import cache
from typing import Annotated, Any, Union, get_args, get_origin

from kubeflow_trainer_api import models as api
from pydantic import BaseModel

from slicefm.edge.trainjob import CRD_NAME, GROUP, PLURAL, POD_PATCH_PATH, VERSION

_INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
_OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_SCALARS = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    datetime: "string",
    date: "string",
}


def openapi_schema(tp: Any, _seen: frozenset[type] = frozenset()) -> dict[str, Any]:
    """The structural schema of a type annotation of the API models."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return openapi_schema(args[0], _seen)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if {get_args(a)[0] if get_origin(a) is Annotated else a for a in options} == {int, float}:
            return {"type": "number"}
        (only,) = options
        return openapi_schema(only, _seen)
    if origin is list:
        return {"type": "array", "items": openapi_schema(args[0], _seen)}
    if origin is dict:
        if args[1] is Any:
            return dict(_OPEN)
        return {"type": "object", "additionalProperties": openapi_schema(args[1], _seen)}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if tp is Any:
        return dict(_OPEN)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _model_schema(tp, _seen)
    raise TypeError(f"no OpenAPI schema for {tp!r}")


def _model_schema(model: type[BaseModel], seen: frozenset[type]) -> dict[str, Any]:
    if "actual_instance" in model.model_fields:  # oneOf wrappers: Quantity, IntOrString
        return dict(_INT_OR_STRING)
    if model is api.IoK8sApimachineryPkgApisMetaV1ObjectMeta:
        return {"type": "object"}  # as controller-gen writes embedded metadata
    if model in seen:
        return dict(_OPEN)  # a recursive type stays open
    fields = model.model_fields.items()
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {f.alias or n: openapi_schema(f.annotation, seen | {model}) for n, f in fields},
    }
    required = sorted(f.alias or n for n, f in fields if f.is_required())
    if required:
        schema["required"] = required
    return schema


@cache
def _v23_schema() -> dict[str, Any]:
    schema = openapi_schema(api.TrainerV1alpha1TrainJob)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def _props(schema: dict[str, Any], *path: str) -> dict[str, Any]:
    """The `properties` at `path` (list items stepped through), to edit in place."""
    node = schema
    for key in path:
        node = node.get("items", node)["properties"][key]
    return node.get("items", node)["properties"]


def trainjob_crd(
    shape: str = "v2.3",
    labels: dict[str, str] | None = None,
    served: tuple[str, ...] = (VERSION,),
) -> dict[str, Any]:
    """The TrainJob CRD whose v1alpha1 schema has the spec of release `shape` (v2.1, v2.2 or v2.3)."""
    schema = copy.deepcopy(_v23_schema())
    spec = _props(schema, "spec")
    if shape in ("v2.1", "v2.2"):
        del _props(spec["runtimePatches"], *POD_PATCH_PATH)["terminationGracePeriodSeconds"]
    if shape == "v2.1":
        spec.pop("runtimePatches")
        spec["podTemplateOverrides"] = {"type": "array", "items": dict(_OPEN)}
    elif shape != "v2.2" and shape != "v2.3":
        raise ValueError(f"no CRD for release {shape}")
    names = sorted({*served, VERSION})
    versions = [
        {
            "name": v,
            "served": v in served,
            "storage": v == VERSION,
            "schema": {"openAPIV3Schema": schema},
            "subresources": {"status": {}},
        }
        for v in names
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": dict(labels or {}),
            "annotations": {"controller-gen.kubebuilder.io/version": "v0.21.0"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": "TrainJob",
                "listKind": "TrainJobList",
                "plural": PLURAL,
                "singular": "trainjob",
            },
            "scope": "Namespaced",
            "versions": versions,
        },
        "status": {
            "acceptedNames": {"kind": "TrainJob", "plural": PLURAL},
            "conditions": [{"type": "Established", "status": "True", "reason": "InitialNamesAccepted"}],
            "storedVersions": [VERSION],
        },
    }


def strict_decode(value: Any, schema: dict[str, Any], path: str = "") -> tuple[Any, list[str]]:
    """(value pruned to the schema, paths of the unknown fields): what the API server drops, or rejects under
    fieldValidation=Strict. Paths as the server writes them: spec.trainer.foo, spec.runtimePatches[0].bar."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value, []
    if isinstance(value, list) and "items" in schema:
        decoded = [strict_decode(v, schema["items"], f"{path}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in decoded], [u for _, unknown in decoded for u in unknown]
    if not isinstance(value, dict):
        return value, []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    if props is None and not isinstance(extra, dict):
        return value, []  # an open object (metadata)
    pruned, unknown = {}, []
    for key, sub in value.items():
        sub_path = f"{path}.{key}" if path else key
        sub_schema = props.get(key) if props is not None else extra
        if sub_schema is None:
            unknown.append(sub_path)
            continue
        pruned[key], more = strict_decode(sub, sub_schema, sub_path)
        unknown += more
    return pruned, unknown
