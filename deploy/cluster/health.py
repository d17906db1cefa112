"""The controller's liveness and readiness probes: ``/healthz`` and ``/readyz`` over plain HTTP
(the stdlib's server: a probe needs nothing more)."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any

from deploy.cluster.reconciler import Reconciler
from deploy.ports import Clock


def serve_health(port: int, rec: Reconciler, clock: Clock, stale_s: float,
                 host: str = "0.0.0.0") -> http.server.ThreadingHTTPServer:
    """/healthz: the loop came round within ``stale_s``; /readyz: connected (leader or not,
    a standby is healthy). Binds every address by default: probes come from the kubelet, on
    the pod's IP. Returns the server (its thread is a daemon)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path in ("/readyz", "/healthz") and \
                (self.path == "/readyz" or clock.now() - rec.last_loop < stale_s)
            body = json.dumps({"ok": ok, "leader": rec.is_leader()}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="health").start()
    return server
