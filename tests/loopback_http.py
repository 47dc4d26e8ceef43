"""A threaded HTTP server on 127.0.0.1 whose every request goes to one handler: the base of the tests' fake
API servers (Kubernetes, Kubeflow Pipelines)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handle = Callable[[BaseHTTPRequestHandler, str], None]


def loopback_server(
    handle: Handle, methods: Sequence[str] = ("GET", "POST")
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """A server on a free loopback port passing each request of `methods` to `handle(request, method)`, and
    the (not yet started) thread that serves it."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

    for method in methods:
        setattr(Handler, f"do_{method}", lambda self, m=method: handle(self, m))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    return server, threading.Thread(target=server.serve_forever, daemon=True)
