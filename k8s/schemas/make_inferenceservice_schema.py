"""Write k8s/schemas/inferenceservice-v1beta1.schema.json: the JSON schema of a KServe v1beta1
InferenceService that tests/k8s/schema_check.py validates serving manifests against.

Source: the v1beta1 models of the `kserve` Python SDK wheel (OpenAPI-generator classes: `openapi_types`
gives each field's type, `attribute_map` its JSON name, a setter that rejects None a required field). The
wheel is read as a zip and its model modules parsed with `ast`: nothing of it is imported or installed
(its runtime pins, pandas<3 and psutil<6, do not fit requirements.lock). Every KServe object gets
`additionalProperties: false`, so an unknown field is an error; the Kubernetes types the models use
(V1Container, V1Toleration, V1ObjectMeta, ...) are `$ref`s into the strict definitions that
kubernetes-validate (pinned in requirements.lock) ships for one Kubernetes release, where unknown fields
are errors too. `status` is left out: a manifest must not set it.

Regenerate after a KServe upgrade (and update KSERVE_RELEASE in tests/k8s/schema_check.py):
    pip download kserve==0.21.0 --no-deps -d /tmp/kserve-wheel
    python k8s/schemas/make_inferenceservice_schema.py /tmp/kserve-wheel/kserve-0.21.0-py3-none-any.whl \
        > k8s/schemas/inferenceservice-v1beta1.schema.json
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import re
import sys
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

K8S_VERSION = "v1.37.0"  # the kubernetes-validate schema set the core $refs point into
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"  # its $id
SCHEMA_ID = "urn:slicefm:schema:kserve:v1beta1:inferenceservice"
ROOT_MODEL = "V1beta1InferenceService"
PRIMITIVES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "datetime": {"type": "string"},
    "date": {"type": "string"},
    "object": {},  # free-form in the API (e.g. RawExtension)
}
_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\(str, (.+)\)$")
_REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")
# Kubernetes models named by the generator after their Go package: K8sIoApi<Group><Version><Kind>.
_K8S_IO_API = re.compile(r"^K8sIoApi([A-Z][a-z]+)(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)$")
_VERSIONED = re.compile(r"^(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)$")
_KSERVE_NAME = re.compile(r"^V1(alpha|beta)1[A-Z]")
SPECIAL_CORE = {"ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity"}


def read_models(wheel: Path) -> dict[str, dict[str, Any]]:
    """{class name: {"types": {attr: type}, "json": {attr: json key}, "required": [attr]}} of kserve/models."""
    models = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not re.fullmatch(r"kserve/models/\w+\.py", name) or name.endswith("__init__.py"):
                continue
            source = zf.read(name).decode()
            for node in ast.parse(source).body:
                if not isinstance(node, ast.ClassDef):
                    continue
                found = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                        target = stmt.targets[0]
                        if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map"):
                            found[target.id] = ast.literal_eval(stmt.value)
                if "openapi_types" in found:
                    models[node.name] = {
                        "types": found["openapi_types"],
                        "json": found["attribute_map"],
                        "required": sorted(
                            set(_REQUIRED.findall(ast.get_source_segment(source, node) or ""))
                        ),
                    }
    return models


def core_definition(type_name: str, core: set[str]) -> str:
    """The kubernetes-validate definition a Kubernetes model name of the SDK stands for."""
    if type_name in SPECIAL_CORE:
        return SPECIAL_CORE[type_name]
    if m := _K8S_IO_API.match(type_name):
        name = f"io.k8s.api.{m.group(1).lower()}.{m.group(2).lower()}.{m.group(3)}"
        if name in core:
            return name
        raise KeyError(f"{type_name}: no definition {name}")
    m = _VERSIONED.match(type_name)
    if not m:
        raise KeyError(f"{type_name}: not a KServe model and not a Kubernetes model name")
    suffix = f".{m.group(1).lower()}.{m.group(2)}"
    candidates = sorted(d for d in core if d.endswith(suffix))
    for prefix in ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta."):
        preferred = [c for c in candidates if c.startswith(prefix)]
        if len(preferred) == 1:
            return preferred[0]
    if len(candidates) == 1:
        return candidates[0]
    raise KeyError(f"{type_name}: definitions {candidates or 'none'}")


def build(wheel: Path) -> dict[str, Any]:
    models = read_models(wheel)
    k8s_dir = (
        resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"{K8S_VERSION}-local-strict"
    )
    core_defs = json.loads((k8s_dir / "_definitions.json").read_text())
    assert core_defs["$id"] == K8S_DEFINITIONS, core_defs["$id"]
    core = set(core_defs["$defs"])
    defs: dict[str, Any] = {}
    used_core: set[str] = set()
    untyped: set[str] = set()

    def schema_of(type_name: str) -> dict[str, Any]:
        if m := _LIST.match(type_name):
            return {"type": "array", "items": schema_of(m.group(1))}
        if m := _DICT.match(type_name):
            return {"type": "object", "additionalProperties": schema_of(m.group(1))}
        if type_name in PRIMITIVES:
            return dict(PRIMITIVES[type_name])
        if type_name in models:
            if type_name not in defs:
                defs[type_name] = {}  # placeholder: recursive types
                defs[type_name] = object_schema(type_name)
            return {"$ref": f"#/$defs/{type_name}"}
        if _KSERVE_NAME.match(type_name):  # referenced by the models but not generated (e.g. MetricQuantity)
            untyped.add(type_name)
            return {}
        definition = core_definition(type_name, core)
        used_core.add(definition)
        return {"$ref": f"{K8S_DEFINITIONS}#/$defs/{definition}"}

    def object_schema(name: str) -> dict[str, Any]:
        model = models[name]
        props = {
            model["json"][attr]: schema_of(t)
            for attr, t in sorted(model["types"].items())
            if not (name == ROOT_MODEL and attr == "status")
        }
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if model["required"]:
            out["required"] = [model["json"][a] for a in model["required"]]
        return out

    schema_of(ROOT_MODEL)
    root = defs[ROOT_MODEL]
    root["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    root["properties"]["kind"] = {"const": "InferenceService"}
    root["required"] = ["apiVersion", "kind", "metadata", "spec"]
    defs["V1beta1InferenceServiceSpec"]["required"] = ["predictor"]  # the CRD's `required: [predictor]`
    version = wheel.name.split("-")[1]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"InferenceService, serving.kserve.io/v1beta1 (KServe {version})",
        "description": (
            "Generated by k8s/schemas/make_inferenceservice_schema.py; do not edit. KServe objects from the "
            "v1beta1 models of the kserve Python SDK wheel below (unknown fields rejected); Kubernetes types "
            f"are $refs into kubernetes-validate's {K8S_VERSION}-local-strict definitions."
        ),
        "x-origin": {
            "kserve_wheel": wheel.name,
            "kserve_wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "kserve_version": version,
            "kubernetes_definitions": f"kubernetes-validate {importlib.metadata.version('kubernetes-validate')}, "
            f"{K8S_VERSION}-local-strict/_definitions.json",
            "kubernetes_definitions_used": sorted(used_core),
            "kserve_types_without_a_model_left_free_form": sorted(untyped),
        },
        "$ref": f"#/$defs/{ROOT_MODEL}",
        "$defs": dict(sorted(defs.items())),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    json.dump(build(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")
