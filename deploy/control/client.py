"""A client of the control plane's HTTP API, and finding the one that runs on a home.

What the CLI (``kloop runs``, ``kloop rollout promote``, ``kloop pipeline run``) and the demo
use; stdlib only, so a script can use it the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CONTROL_FILE = "control.json"
CONTROL_TOKEN = "control.token"


class ControlError(Exception):
    """The service answered with an error: ``status`` (HTTP) and its message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ControlClient:
    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    # ---- runs -----------------------------------------------------------------------------

    def create_run(self, spec: Mapping[str, Any], *, policy: Mapping[str, Any] | None = None,
                   label: str = "", inject_fault: float = 0.0,
                   pythonpath: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"spec": dict(spec), "label": label}
        if policy is not None:
            body["policy"] = dict(policy)
        if inject_fault:
            body["inject_fault"] = inject_fault
        if pythonpath:
            body["pythonpath"] = pythonpath
        return self._call("POST", "/api/v1/runs", body, timeout_s=max(self.timeout_s, 300.0))

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/runs/{_q(run_id)}")

    def list_runs(self, **query: Any) -> dict[str, Any]:
        return self._call("GET", "/api/v1/runs", query=query)

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/runs/{_q(run_id)}/cancel", {})

    def retry_run(self, run_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/runs/{_q(run_id)}/retry", {})

    def watch_run(self, run_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs until the run ends (the stream's ``end`` event is the last)."""
        yield from self._sse(f"/api/v1/runs/{_q(run_id)}/watch")

    def compare(self, ids: list[str]) -> dict[str, Any]:
        return self._call("GET", "/api/v1/compare", query={"ids": ",".join(ids)})

    # ---- rollouts -------------------------------------------------------------------------

    def create_rollout(self, model: str, candidate: str,
                       policy: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "candidate": candidate}
        if policy is not None:
            body["policy"] = dict(policy)
        return self._call("POST", "/api/v1/rollouts", body)

    def list_rollouts(self, **query: Any) -> dict[str, Any]:
        return self._call("GET", "/api/v1/rollouts", query=query)

    def get_rollout(self, rollout_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/rollouts/{_q(rollout_id)}")

    def active_rollout(self, model: str) -> dict[str, Any] | None:
        found = self.list_rollouts(model=model, active_only="true", page_size=1)["rollouts"]
        return found[0] if found else None

    def rollout_op(self, rollout_id: str, op: str, *, reason: str = "",
                   resource_version: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {}
        if reason:
            body["reason"] = reason
        if resource_version:
            body["resource_version"] = resource_version
        return self._call("POST", f"/api/v1/rollouts/{_q(rollout_id)}/{op}", body)

    def undo(self, model: str, to_version: int,
             policy: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"to_version": to_version}
        if policy:
            body["policy"] = dict(policy)
        return self._call("POST", f"/api/v1/models/{_q(model)}/undo", body)

    def watch_rollout(self, rollout_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from self._sse(f"/api/v1/rollouts/{_q(rollout_id)}/watch")

    # ---- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None,
                 query: Mapping[str, Any] | None = None) -> urllib.request.Request:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return urllib.request.Request(url, data=data, method=method, headers=headers)

    def _call(self, method: str, path: str, body: Any = None,
              query: Mapping[str, Any] | None = None,
              timeout_s: float | None = None) -> dict[str, Any]:
        """The answer's JSON; ``ControlError`` for an error answer or an unreachable service."""
        req = self._request(method, path, body, query)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
        except urllib.error.HTTPError as e:
            raise _error(e) from None
        except (urllib.error.URLError, OSError) as e:
            raise ControlError(0, f"the control plane at {self.url} did not answer: {e}") from None

    def _sse(self, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        req = self._request("GET", path)
        req.add_header("Accept", "text/event-stream")
        try:
            resp = urllib.request.urlopen(req, timeout=None)
        except urllib.error.HTTPError as e:
            raise _error(e) from None
        with resp:
            kind, data = "message", list[str]()
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\n")
                if not line:
                    if data:
                        yield kind, json.loads("\n".join(data))
                        if kind == "end":
                            return
                    kind, data = "message", list[str]()
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())


def _error(e: urllib.error.HTTPError) -> ControlError:
    try:
        message = json.loads(e.read()).get("error") or e.reason
    except (ValueError, AttributeError):
        message = str(e.reason)
    return ControlError(e.code, str(message))


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def discover(home: Path) -> ControlClient | None:
    """The control plane recorded in ``home`` (``kloop up``), if its process is alive; its
    token from the home (or ``KLOOP_CONTROL_TOKEN``)."""
    try:
        record = json.loads((home / CONTROL_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    pid = record.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    token = os.environ.get("KLOOP_CONTROL_TOKEN")
    if not token:
        with contextlib.suppress(FileNotFoundError):
            token = (home / CONTROL_TOKEN).read_text().strip()
    return ControlClient(str(record["http"]), token)
