"""A small fake Kubeflow Pipelines API server (REST v2beta1) on 127.0.0.1, as far as `slicefm pipeline submit`
uses it through the real kfp.Client.

It serves the paths, query parameters, JSON bodies and multipart uploads of the real API: healthz, pipelines
(list with a display_name filter and a namespace, create), pipeline versions (multipart upload, list), experiments
(list, create) and runs (create). Names are unique as on the real server (a pipeline per namespace, a version per
pipeline: 409 AlreadyExists). It keeps every request, the uploaded files and the created runs' request bodies
for the tests to look at; `fail` maps "METHOD path" to an HTTP status to answer with instead.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.loopback_http import loopback_server

API = "/apis/v2beta1"
VERSIONS = re.compile(rf"^{API}/pipelines/([^/]+)/versions$")
T0 = "2026-01-01T00:00:00Z"
# google.rpc.Code of the HTTP statuses the fake answers with.
GRPC_CODES = {400: 3, 403: 7, 404: 5, 409: 6}



class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """One multipart upload: its query parameters, the file's name and bytes, and the YAML documents in it."""

    query: dict[str, str]
    filename: str
    data: bytes
    documents: list[Any]


@dataclass
class FakeKfp:
    multi_user: bool = False
    fail: dict[str, int] = field(default_factory=dict)  # "POST /apis/v2beta1/runs" -> 403
    requests: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # the request bodies, as sent
    run_ids: list[str] = field(default_factory=list)  # the ids the runs were given

    def __post_init__(self) -> None:
        self._server, self._thread = loopback_server(self._handle, ("GET", "POST"))
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeKfp:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p == path)

    def add_pipeline(self, name: str, namespace: str = "") -> str:
        """A pipeline that exists before the test (no versions); its id."""
        return self._create_pipeline({"display_name": name, "namespace": namespace})["pipeline_id"]

    def add_version(self, pipeline_id: str, name: str, description: str = "") -> str:
        """A version that exists before the test; its id."""
        version = self._version(pipeline_id, name, description)
        return version["pipeline_version_id"]

    # --- request handling -------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(req.path)
        query = parse_qs(url.query)
        body = req.rfile.read(int(req.headers.get("Content-Length", 0)))
        with self._lock:
            self.requests.append((method, url.path, query))
            try:
                if f"{method} {url.path}" in self.fail:
                    raise ApiError(self.fail[f"{method} {url.path}"], "refused by the test")
                status, answer = self._route(
                    method, url.path, query, req.headers.get("Content-Type", ""), body
                )
            except ApiError as err:
                status, answer = err.status, {"code": GRPC_CODES.get(err.status, 2), "message": str(err)}
        data = json.dumps(answer).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], content_type: str, body: bytes
    ) -> tuple[int, Any]:
        one = {k: v[0] for k, v in query.items()}
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
        if (method, path) == ("GET", f"{API}/pipelines"):
            found = self._filtered(self.pipelines.values(), one, namespaced=True)
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", f"{API}/pipelines"):
            return 200, self._create_pipeline(json.loads(body))
        if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
            return 200, self._upload_version(one, content_type, body)
        if method == "GET" and (m := VERSIONS.match(path)):
            if m.group(1) not in self.pipelines:
                raise ApiError(404, f"pipeline {m.group(1)} not found")
            of_pipeline = [v for v in self.versions.values() if v["pipeline_id"] == m.group(1)]
            found = self._filtered(of_pipeline, one, namespaced=False)
            return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
        if (method, path) == ("GET", f"{API}/experiments"):
            found = self._filtered(self.experiments.values(), one, namespaced=True)
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", f"{API}/experiments"):
            return 200, self._create_experiment(json.loads(body))
        if (method, path) == ("POST", f"{API}/runs"):
            return 200, self._create_run(json.loads(body))
        raise ApiError(404, f"no route {method} {path}")

    def _filtered(self, items: Any, query: dict[str, str], namespaced: bool) -> list[dict[str, Any]]:
        """The items matching the `filter` query parameter (EQUALS predicates only) and the `namespace`."""
        predicates = json.loads(query["filter"])["predicates"] if query.get("filter") else []
        for p in predicates:
            if p.get("operation") not in (1, "EQUALS") or p.get("key") not in ("display_name", "name"):
                raise ApiError(400, f"unsupported filter predicate {p}")
        found = [
            item
            for item in items
            if all(item[p["key"]] == p.get("stringValue", p.get("string_value")) for p in predicates)
            and (not namespaced or item.get("namespace", "") == query.get("namespace", ""))
        ]
        return found[: int(query.get("page_size", 20))]

    def _create_pipeline(self, body: dict[str, Any]) -> dict[str, Any]:
        name, namespace = body.get("display_name", ""), body.get("namespace", "")
        if not name:
            raise ApiError(400, "pipeline display_name is required")
        if any(p["display_name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise ApiError(409, f"pipeline {name} already exists in namespace {namespace!r}")
        pipeline = {
            "pipeline_id": str(uuid.uuid4()),
            "display_name": name,
            "name": name,
            "description": body.get("description", ""),
            "namespace": namespace,
            "created_at": T0,
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return pipeline

    def _version(self, pipeline_id: str, name: str, description: str) -> dict[str, Any]:
        if pipeline_id not in self.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id} not found")
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
            raise ApiError(409, f"pipeline version {name} already exists")
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": T0,
            "an_unknown_field": {"the client": "ignores it"},
        }
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _upload_version(self, query: dict[str, str], content_type: str, body: bytes) -> dict[str, Any]:
        if not query.get("pipelineid"):
            raise ApiError(400, "Please specify a pipeline id when creating versions.")
        files = multipart_files(content_type, body)
        if "uploadfile" not in files:
            raise ApiError(400, "no uploadfile in the request")
        filename, data = files["uploadfile"]
        try:
            documents = list(yaml.safe_load_all(data))
        except yaml.YAMLError as err:
            raise ApiError(400, f"invalid pipeline spec: {err}") from err
        if not documents or "pipelineInfo" not in (documents[0] or {}):
            raise ApiError(400, "invalid pipeline spec: no pipelineInfo")
        version = self._version(
            query["pipelineid"], query.get("name", filename), query.get("description", "")
        )
        self.uploads.append(Upload(query, filename, data, documents))
        return version

    def _create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        name, namespace = body.get("display_name", ""), body.get("namespace", "")
        if any(e["display_name"] == name and e["namespace"] == namespace for e in self.experiments.values()):
            raise ApiError(409, f"experiment {name} already exists")
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": body.get("description", ""),
            "namespace": namespace,
            "created_at": T0,
            "storage_state": "AVAILABLE",
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        ref = body.get("pipeline_version_reference") or {}
        version = self.versions.get(ref.get("pipeline_version_id", ""))
        if version is None or version["pipeline_id"] != ref.get("pipeline_id"):
            raise ApiError(404, f"pipeline version {ref} not found")
        if body.get("experiment_id") not in self.experiments:
            raise ApiError(404, f"experiment {body.get('experiment_id')} not found")
        self.runs.append(body)
        self.run_ids.append(str(uuid.uuid4()))
        return {**body, "run_id": self.run_ids[-1], "state": "PENDING", "created_at": T0}


def multipart_files(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """The file fields of a multipart/form-data body: field name -> (file name, bytes)."""
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, f"expected multipart/form-data, got {content_type!r}")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    files = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename():
            files[str(name)] = (part.get_filename(), part.get_payload(decode=True))
    return files
