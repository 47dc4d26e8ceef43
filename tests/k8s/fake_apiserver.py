"""A small fake Kubernetes API server on 127.0.0.1 for TrainJobs, pods and pod logs, driven by a script.

It speaks the real REST protocol (paths, JSON bodies, Status errors, query parameters) so the launcher is
tested through the real `kubernetes` client, not mocks. Each GET of the TrainJob returns the next status
of `statuses` (the last one repeats); `errors` queues HTTP error codes for the next TrainJob GETs;
`on_create` is called with each TrainJob created (e.g. to do what its pods would) before the API answers.

It serves the TrainJob CRD `crd` (default: Kubeflow Trainer v2.3's, derived from the API models; None: not
installed) and decodes a created TrainJob as an API server does against that CRD's schema: an unknown field
is dropped (fieldValidation Ignore, or Warn with a Warning header, the default), or the create is refused
with 400 BadRequest "strict decoding error: unknown field ..." under fieldValidation=Strict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.k8s.trainer_crd import strict_decode, trainjob_crd
from tests.loopback_http import loopback_server

TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
CRDS = re.compile(r"^/apis/apiextensions\.k8s\.io/v1/customresourcedefinitions/([^/]+)$")
T0 = "2026-01-01T00:00:00Z"
STRICT_PREFIX = 'TrainJob in version "v1alpha1" cannot be handled as a TrainJob: strict decoding error'


def condition(kind: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, Any]:
    """A metav1.Condition as the Trainer controller writes it."""
    return {
        "type": kind,
        "status": status,
        "reason": reason or kind,
        "message": message,
        "lastTransitionTime": T0,
    }


def jobs_status(active: int = 0, ready: int = 0, failed: int = 0, succeeded: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "name": "node",
            "active": active,
            "ready": ready,
            "failed": failed,
            "succeeded": succeeded,
            "suspended": 0,
        }
    ]


def container_status(
    name: str = "node",
    *,
    running: bool = False,
    terminated: tuple[str, int] | None = None,
    waiting: tuple[str, str] | None = None,
    last_terminated: tuple[str, int] | None = None,
    restarts: int = 0,
) -> dict[str, Any]:
    """A complete corev1.ContainerStatus (the client rejects one without its required fields)."""
    state: dict[str, Any] = {}
    if running:
        state["running"] = {"startedAt": T0}
    if terminated:
        state["terminated"] = {"reason": terminated[0], "exitCode": terminated[1], "finishedAt": T0}
    if waiting:
        state["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    status: dict[str, Any] = {
        "name": name,
        "image": "slicefm:0.1.0",
        "imageID": "",
        "ready": running,
        "restartCount": restarts,
        "state": state,
    }
    if last_terminated:
        status["lastState"] = {"terminated": {"reason": last_terminated[0], "exitCode": last_terminated[1]}}
    return status


def pod(
    name: str,
    job: str,
    phase: str,
    statuses: list[dict[str, Any]] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    reason: str | None = None,
    namespace: str = "slicefm",
) -> dict[str, Any]:
    """A pod of the TrainJob's JobSet, labelled as JobSet labels its pods."""
    status: dict[str, Any] = {"phase": phase, "containerStatuses": statuses or []}
    if conditions:
        status["conditions"] = conditions
    if reason:
        status["reason"] = reason
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": job,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
            },
        },
        "spec": {"containers": [{"name": "node", "image": "slicefm:0.1.0"}]},
        "status": status,
    }


@dataclass
class FakeKube:
    statuses: list[dict[str, Any] | None]
    pods: list[dict[str, Any]] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)  # "pod/container" or "pod/container/previous"
    errors: list[int] = field(default_factory=list)  # HTTP codes for the next TrainJob GETs
    forbid_pods: bool = False
    forbid_create: bool = False
    preexisting: dict[str, Any] | None = None
    vanish_after: int | None = None  # GETs after which the TrainJob is gone (404)
    on_create: Callable[[dict[str, Any]], None] | None = None
    crd: dict[str, Any] | None = field(default_factory=trainjob_crd)  # None: Trainer not installed
    forbid_crd: bool = False
    requests: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    _jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _gets: int = 0

    def __post_init__(self) -> None:
        if self.preexisting is not None:
            meta = self.preexisting["metadata"]
            self._jobs[(meta["namespace"], meta["name"])] = self.preexisting
        self._server, self._thread = loopback_server(self._handle, ("GET", "POST", "DELETE"))

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    # --- request handling -------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(req.path)
        query = parse_qs(url.query)
        self.requests.append((method, url.path, query))
        body = None
        if method == "POST":
            body = json.loads(req.rfile.read(int(req.headers.get("Content-Length", 0))) or b"null")
        elif method == "DELETE" and int(req.headers.get("Content-Length", 0)):
            req.rfile.read(int(req.headers["Content-Length"]))
        if m := TRAINJOBS.match(url.path):
            if self.crd is None:
                return self._status(req, 404, "NotFound", "the server could not find the requested resource")
            return self._trainjobs(req, method, m.group(1), m.group(2), body, query)
        if m := PODS.match(url.path):
            return self._pods(req, m.group(1), query)
        if m := LOG.match(url.path):
            return self._log(req, m.group(2), query)
        if m := CRDS.match(url.path):
            return self._crd(req, m.group(1))
        self._status(req, 404, "NotFound", f"no route {url.path}")

    def _trainjobs(
        self, req: Any, method: str, ns: str, name: str | None, body: Any, query: dict[str, list[str]]
    ) -> None:
        if method == "POST" and name is None:
            return self._create(req, ns, body, query.get("fieldValidation", ["Warn"])[0])
        key = (ns, name or "")
        if key not in self._jobs:
            return self._status(req, 404, "NotFound", f'trainjobs "{name}" not found')
        if method == "DELETE":
            del self._jobs[key]
            self.deleted.append(name or "")
            return self._json(req, 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        if self.errors:
            code = self.errors.pop(0)
            return self._status(req, code, "ServiceUnavailable", "etcd is busy")
        if self.vanish_after is not None and self._gets >= self.vanish_after:
            del self._jobs[key]
            return self._status(req, 404, "NotFound", f'trainjobs "{name}" not found')
        status = self.statuses[min(self._gets, len(self.statuses) - 1)]
        self._gets += 1
        obj = dict(self._jobs[key])
        if status is not None:
            obj["status"] = status
        self._json(req, 200, obj)

    def _create(self, req: Any, ns: str, body: dict[str, Any], validation: str) -> None:
        if self.forbid_create:
            return self._status(req, 403, "Forbidden", "trainjobs is forbidden")
        obj, unknown = strict_decode(body, self._schema())
        if unknown and validation == "Strict":
            fields = ", ".join(f'unknown field "{u}"' for u in unknown)
            message = f"{STRICT_PREFIX}: {fields}"
            return self._status(req, 400, "BadRequest", message)
        key = (ns, body["metadata"]["name"])
        if key in self._jobs:
            return self._status(req, 409, "AlreadyExists", f'trainjobs "{key[1]}" already exists')
        obj = {**obj, "metadata": {**obj["metadata"], "uid": "uid-1", "creationTimestamp": T0}}
        self._jobs[key] = obj
        self.created.append(body)
        if self.on_create is not None:
            self.on_create(body)
        warnings = [f'299 - "unknown field \\"{u}\\""' for u in unknown] if validation == "Warn" else []
        self._json(req, 201, obj, warnings)

    def _schema(self) -> dict[str, Any]:
        assert self.crd is not None
        (version,) = [v for v in self.crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        return version["schema"]["openAPIV3Schema"]

    def _crd(self, req: Any, name: str) -> None:
        if self.forbid_crd:
            return self._status(req, 403, "Forbidden", "customresourcedefinitions is forbidden")
        if self.crd is None or self.crd["metadata"]["name"] != name:
            return self._status(req, 404, "NotFound", f'customresourcedefinitions "{name}" not found')
        self._json(req, 200, self.crd)

    def stored(self, ns: str, name: str) -> dict[str, Any]:
        """The TrainJob as the server keeps it (unknown fields dropped)."""
        return self._jobs[(ns, name)]

    def _pods(self, req: Any, ns: str, query: dict[str, list[str]]) -> None:
        if self.forbid_pods:
            return self._status(req, 403, "Forbidden", 'pods is forbidden: cannot list resource "pods"')
        selector = dict(s.split("=", 1) for s in query.get("labelSelector", [""])[0].split(",") if s)
        items = [
            p
            for p in self.pods
            if p["metadata"]["namespace"] == ns
            and all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())
        ]
        self._json(req, 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})

    def _log(self, req: Any, pod_name: str, query: dict[str, list[str]]) -> None:
        container = query.get("container", ["node"])[0]
        previous = query.get("previous", ["false"])[0].lower() == "true"  # the client sends "True"
        key = f"{pod_name}/{container}" + ("/previous" if previous else "")
        if key not in self.logs:
            return self._status(req, 400, "BadRequest", f"no logs for {key}")
        lines = self.logs[key].splitlines()
        tail = int(query.get("tailLines", [len(lines)])[0])
        data = ("\n".join(lines[-tail:]) + "\n").encode()
        req.send_response(200)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _json(self, req: Any, code: int, obj: Any, warnings: list[str] | None = None) -> None:
        data = json.dumps(obj).encode()
        req.send_response(code)
        for warning in warnings or []:
            req.send_header("Warning", warning)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _status(self, req: Any, code: int, reason: str, message: str) -> None:
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}
        self._json(req, code, {**status, "message": message})
