"""The one module that talks to the Kubernetes API (the ``kubernetes`` client stays behind it).

Why a wrapper: callers (training on Kubernetes, the KServe backend, the rollout controller) speak
in objects (plain dicts with apiVersion/kind/metadata) and kloop's own error tree; the client's
per-group API classes, its ``ApiException`` and the watch protocol's corner cases (expired
resourceVersions, dropped connections) are handled once, here.

Errors::

    KubeError                 any failed call; ``status`` is the HTTP status (0: no answer)
    ├── NotFound              404
    ├── Conflict              409: the object moved (resourceVersion) or already exists
    ├── Invalid               422: the server rejected the object; ``message`` says why
    ├── Forbidden             401/403: RBAC said no
    └── Gone                  410: a watch's resourceVersion is too old (handled by ``watch``)

Objects are addressed by ``Kind`` (group, version, plural, namespaced); ``KINDS`` lists the
ones kloop manages. ``autoscaling/v2`` HPAs are written as ``v2beta2`` where the server does
not serve v2 (Kubernetes < 1.23), which has the same fields for what kloop emits.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class KubeError(Exception):
    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status
        self.message = message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Invalid(KubeError):
    pass


class Forbidden(KubeError):
    pass


class Gone(KubeError):
    pass


_BY_STATUS: dict[int, type[KubeError]] = {
    401: Forbidden, 403: Forbidden, 404: NotFound, 409: Conflict, 410: Gone, 422: Invalid,
}


@dataclasses.dataclass(frozen=True)
class Kind:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


KINDS: dict[str, Kind] = {k.kind: k for k in (
    Kind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"),
    Kind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"),
    Kind("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"),
    Kind("serving.kserve.io", "v1alpha1", "servingruntimes", "ServingRuntime"),
    Kind("serving.kserve.io", "v1alpha1", "clusterservingruntimes", "ClusterServingRuntime", namespaced=False),
    Kind("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"),
    Kind("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute"),
    Kind("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
    Kind("kloop.dev", "v1alpha1", "rollouts", "Rollout"),
    Kind("coordination.k8s.io", "v1", "leases", "Lease"),
    Kind("", "v1", "pods", "Pod"),
    Kind("", "v1", "events", "Event"),
    Kind("", "v1", "namespaces", "Namespace", namespaced=False),
    Kind("", "v1", "serviceaccounts", "ServiceAccount"),
    Kind("", "v1", "configmaps", "ConfigMap"),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    Kind("", "v1", "services", "Service"),
    Kind("apps", "v1", "deployments", "Deployment"),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Kind("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    Kind("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", namespaced=False),
)}


def kind_of(obj: Mapping[str, Any]) -> Kind:
    kind = KINDS.get(str(obj.get("kind")))
    if kind is None or kind.api_version != obj.get("apiVersion"):
        raise ValueError(f"kloop does not manage {obj.get('apiVersion')} {obj.get('kind')}")
    return kind


@dataclasses.dataclass(frozen=True)
class KubeConfig:
    """Where the cluster is, as kubectl takes it: ``--kubeconfig``, ``--context``, ``-n``.
    No kubeconfig and KUBECONFIG unset: ~/.kube/config, then the in-cluster ServiceAccount."""

    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str | None = None
    impersonate: str | None = None  # user name to act as (tests: a ServiceAccount's identity)
    impersonate_group: str | None = None  # with ``impersonate``: e.g. "system:serviceaccounts"


class Kube:
    """Typed access to the API server over one ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any, namespace: str = "default"):
        self._api = api_client
        self.namespace = namespace
        self._served: dict[str, bool] = {}

    @classmethod
    def connect(cls, cfg: KubeConfig | None = None) -> Kube:
        from kubernetes import client, config

        cfg = cfg or KubeConfig()
        namespace = cfg.namespace
        try:
            conf = client.Configuration()
            config.load_kube_config(config_file=str(cfg.kubeconfig) if cfg.kubeconfig else None,
                                    context=cfg.context, client_configuration=conf)
            if namespace is None:
                _, active = config.list_kube_config_contexts(
                    config_file=str(cfg.kubeconfig) if cfg.kubeconfig else None)
                if cfg.context:
                    contexts, _ = config.list_kube_config_contexts(
                        config_file=str(cfg.kubeconfig) if cfg.kubeconfig else None)
                    active = next((c for c in contexts if c["name"] == cfg.context), active)
                namespace = (active or {}).get("context", {}).get("namespace")
        except config.ConfigException:
            if cfg.kubeconfig:
                raise
            conf = client.Configuration()
            config.load_incluster_config(client_configuration=conf)
            ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            namespace = namespace or (ns_file.read_text().strip() if ns_file.exists() else None)
        api = client.ApiClient(conf)
        if cfg.impersonate:
            api.set_default_header("Impersonate-User", cfg.impersonate)
            if cfg.impersonate_group:
                api.set_default_header("Impersonate-Group", cfg.impersonate_group)
        return cls(api, namespace or "default")

    def close(self) -> None:
        """Close the client's pooled connections (and its thread pool, if one was started)."""
        self._api.close()

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- raw calls ----------------------------------------------------------------------

    def _call(self, method: str, path: str, *, body: Any = None,
              query: Mapping[str, Any] | None = None,
              content_type: str = "application/json") -> Obj:
        """One request; its JSON object answer (``{}`` for an empty body)."""
        data = self._send(method, path, body=body, query=query, content_type=content_type).read()
        doc = json.loads(data) if data else {}
        if not isinstance(doc, dict):
            raise KubeError(f"{method} {path}: the answer is not a JSON object")
        return doc

    def _stream(self, path: str, *, query: Mapping[str, Any],
                read_timeout: float | None = None) -> Any:
        """A GET whose body is read incrementally (by ``_lines``): the urllib3 response.
        ``read_timeout``: seconds without a byte before the connection counts as dead (a
        half-open TCP connection never ends by itself); None waits forever."""
        return self._send("GET", path, query=query, stream=True, read_timeout=read_timeout).response

    def _send(self, method: str, path: str, *, body: Any = None,
              query: Mapping[str, Any] | None = None, content_type: str = "application/json",
              stream: bool = False, read_timeout: float | None = None) -> Any:
        """The client's response object for a 2xx answer; ``KubeError`` otherwise."""
        # kubernetes >= 31 (the OpenAPI generator v7 client): param_serialize builds the URL,
        # auth and headers; call_api sends it and returns the raw response for any status.
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            m, url, hdrs, payload, _ = self._api.param_serialize(
                method, path, query_params=list((query or {}).items()), header_params=headers,
                body=body, auth_settings=["BearerToken"],
            )
            resp = self._api.call_api(m, url, header_params=hdrs, body=payload,
                                      _request_timeout=(10, read_timeout) if stream else 30)
        except ApiException as e:
            raise _translate(e) from e
        except (OSError, HTTPError) as e:
            raise KubeError(f"{method} {path}: {e}") from e
        if not 200 <= resp.status <= 299:
            raise _translate(resp, resp.read())
        return resp

    def served(self, kind: Kind) -> bool:
        """Whether the server serves ``kind``'s group/version (discovery, cached)."""
        gv = kind.api_version
        if gv not in self._served:
            path = f"/apis/{gv}" if kind.group else f"/api/{kind.version}"
            try:
                doc = self._call("GET", path)
                self._served[gv] = any(r.get("name") == kind.plural for r in doc.get("resources", []))
            except NotFound:
                self._served[gv] = False
        return self._served[gv]

    def _effective(self, kind: Kind) -> Kind:
        """autoscaling/v2 → v2beta2 on servers older than 1.23."""
        if kind.kind == "HorizontalPodAutoscaler" and kind.version == "v2" and not self.served(kind):
            return dataclasses.replace(kind, version="v2beta2")
        return kind

    def _effective_obj(self, obj: Obj) -> tuple[Kind, Obj]:
        """``obj``'s kind as the server serves it, and ``obj`` in that apiVersion."""
        kind = self._effective(kind_of(obj))
        if kind.api_version != obj.get("apiVersion"):
            obj = {**obj, "apiVersion": kind.api_version}
        return kind, obj

    # ---- objects ------------------------------------------------------------------------

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj:
        kind = self._effective(kind)
        return self._call("GET", kind.path(self._ns(kind, namespace), name))

    def list(self, kind: Kind, namespace: str | None = None, *, label_selector: str | None = None) -> Obj:
        kind = self._effective(kind)
        q = {"labelSelector": label_selector} if label_selector else None
        return self._call("GET", kind.path(self._ns(kind, namespace)), query=q)

    def create(self, obj: Obj, namespace: str | None = None) -> Obj:
        kind, obj = self._effective_obj(obj)
        return self._call("POST", kind.path(self._ns(kind, namespace or _meta_ns(obj))), body=obj)

    def replace(self, obj: Obj, namespace: str | None = None) -> Obj:
        """PUT: fails with ``Conflict`` when metadata.resourceVersion is stale."""
        kind, obj = self._effective_obj(obj)
        ns = self._ns(kind, namespace or _meta_ns(obj))
        return self._call("PUT", kind.path(ns, obj["metadata"]["name"]), body=obj)

    def replace_status(self, obj: Obj, namespace: str | None = None) -> Obj:
        """PUT to /status: writes only status, with the same optimistic concurrency."""
        kind, obj = self._effective_obj(obj)
        ns = self._ns(kind, namespace or _meta_ns(obj))
        return self._call("PUT", kind.path(ns, obj["metadata"]["name"], "status"), body=obj)

    def patch(self, kind: Kind, name: str, patch: Obj, namespace: str | None = None,
              *, status: bool = False) -> Obj:
        """JSON merge patch (RFC 7386) of the object or its /status."""
        kind = self._effective(kind)
        return self._call("PATCH", kind.path(self._ns(kind, namespace), name, "status" if status else None),
                          body=patch, content_type="application/merge-patch+json")

    def delete(self, kind: Kind, name: str, namespace: str | None = None,
               *, propagation: str = "Foreground") -> None:
        kind = self._effective(kind)
        try:
            self._call("DELETE", kind.path(self._ns(kind, namespace), name),
                       body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
        except NotFound:
            pass

    def apply(self, obj: Obj, namespace: str | None = None, *, attempts: int = 3) -> Obj:
        """Create, or update ``spec``/labels/annotations of the existing object (status kept).
        Idempotent: an unchanged object is not written. A 409 (another writer, e.g. KServe
        updating the status, moved the object between our read and write) reads again and
        retries, up to ``attempts`` times."""
        for attempt in range(attempts):
            try:
                return self._apply_once(obj, namespace)
            except Conflict:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _apply_once(self, obj: Obj, namespace: str | None) -> Obj:
        kind, obj = self._effective_obj(obj)
        ns = self._ns(kind, namespace or _meta_ns(obj))
        try:
            current = self._call("GET", kind.path(ns, obj["metadata"]["name"]))
        except NotFound:
            return self._call("POST", kind.path(ns), body=obj)
        desired = dict(current)
        meta = dict(current["metadata"])
        for key in ("labels", "annotations"):
            if obj["metadata"].get(key):
                meta[key] = {**meta.get(key, {}), **obj["metadata"][key]}
        desired["metadata"] = meta
        for key, value in obj.items():
            if key not in ("apiVersion", "kind", "metadata", "status"):
                desired[key] = value
        if desired == current:
            return current
        return self._call("PUT", kind.path(ns, obj["metadata"]["name"]), body=desired)

    # ---- watch --------------------------------------------------------------------------

    def watch(self, kind: Kind, namespace: str | None = None, *, name: str | None = None,
              label_selector: str | None = None, timeout_s: float | None = None,
              stop: Callable[[], bool] | None = None,
              resource_version: str | None = None) -> Iterator[tuple[str, Obj]]:
        """Events ``(type, object)`` for ``kind``, forever or until ``timeout_s``/``stop()``.

        Starts with a list (each existing object as a synthetic ``ADDED``), then watches from
        the list's resourceVersion. A watch that ends (server timeout, dropped connection) is
        resumed from the last seen resourceVersion; one whose version expired (410 Gone) lists
        again, so no change is missed, at the cost of repeating current objects as ``ADDED``.
        ``resource_version`` resumes a watch from a version seen earlier instead of listing first
        (when it has expired, the 410 path lists as above).
        """
        kind = self._effective(kind)
        ns = self._ns(kind, namespace)
        selectors = {}
        if name:
            selectors["fieldSelector"] = f"metadata.name={name}"
        if label_selector:
            selectors["labelSelector"] = label_selector
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        version: str | None = resource_version
        while not (stop and stop()) and (deadline is None or time.monotonic() < deadline):
            if version is None:
                listing = self._call("GET", kind.path(ns), query=selectors)
                version = listing["metadata"]["resourceVersion"]
                for item in listing.get("items", []):
                    item.setdefault("apiVersion", kind.api_version)
                    item.setdefault("kind", kind.kind)
                    yield "ADDED", item
            window = 30 if deadline is None else max(1, min(30, int(deadline - time.monotonic()) + 1))
            query = {**selectors, "watch": "true", "resourceVersion": version,
                     "timeoutSeconds": window, "allowWatchBookmarks": "true"}
            try:
                # The server ends the watch after `window` seconds; silence well past that means
                # the connection is gone (failover, NAT drop): time out and resume.
                resp = self._stream(kind.path(ns), query=query, read_timeout=window + 15)
                for line in _lines(resp):
                    event = json.loads(line)
                    etype, obj = event["type"], event["object"]
                    if etype == "ERROR":
                        if obj.get("code") == 410:
                            raise Gone(obj.get("message", "resourceVersion too old"), 410)
                        raise _translate_status(obj)
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if etype == "BOOKMARK":
                        continue
                    yield etype, obj
                    if (stop and stop()) or (deadline is not None and time.monotonic() >= deadline):
                        return
            except Gone:
                log.info("watch of %s: resourceVersion %s expired; listing again", kind.plural, version)
                version = None
            except KubeError as e:
                if e.status not in (0, 500, 503, 504):
                    raise
                log.warning("watch of %s dropped (%s); resuming from %s", kind.plural, e, version)
                time.sleep(0.5)

    # ---- core helpers -------------------------------------------------------------------

    def pod_log(self, name: str, namespace: str | None = None, *, container: str | None = None,
                follow: bool = True) -> Iterator[str]:
        query: dict[str, Any] = {"follow": "true" if follow else "false"}
        if container:
            query["container"] = container
        pod = KINDS["Pod"]
        resp = self._stream(pod.path(self._ns(pod, namespace), name, "log"), query=query)
        yield from _lines(resp, decode_json=False)

    def event(self, involved: Obj, reason: str, message: str, *, type: str = "Normal",
              component: str = "kloop") -> None:
        """Record a core/v1 Event on ``involved`` (what ``kubectl describe`` shows). Best effort:
        an event that cannot be written is logged, never raised."""
        meta = involved["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ev = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace", self.namespace)},
            "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"],
                               "name": meta["name"], "namespace": meta.get("namespace", self.namespace),
                               "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message[:1024], "type": type,
            "source": {"component": component}, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.create(ev)
        except KubeError as e:
            log.warning("could not record event %s on %s: %s", reason, meta["name"], e)

    def events_for(self, involved: Obj) -> builtins.list[Obj]:
        meta = involved["metadata"]
        sel = f"involvedObject.name={meta['name']},involvedObject.kind={involved['kind']}"
        ev = KINDS["Event"]
        items = self._call("GET", ev.path(meta.get("namespace", self.namespace)),
                           query={"fieldSelector": sel}).get("items", [])
        return sorted(items, key=lambda e: e.get("lastTimestamp") or "")

    def _ns(self, kind: Kind, namespace: str | None) -> str | None:
        return (namespace or self.namespace) if kind.namespaced else None


def _meta_ns(obj: Obj) -> str | None:
    ns = obj.get("metadata", {}).get("namespace")
    return ns if isinstance(ns, str) else None


def _lines(resp: Any, decode_json: bool = True) -> Iterator[str]:
    from urllib3.exceptions import HTTPError

    buf = b""
    done = False
    try:
        for chunk in resp.stream(4096, decode_content=True):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line.decode()
        if buf.strip():
            yield buf.decode()
        done = True
    except (OSError, HTTPError) as e:  # connection dropped mid-stream (urllib3: ProtocolError)
        raise KubeError(f"stream interrupted: {e}") from e
    finally:
        if not done:  # the caller stopped early: a half-read stream must not go back to the pool
            resp.close()
        resp.release_conn()


def _translate(e: Any, body: Any = None) -> KubeError:
    """A ``KubeError`` from an ``ApiException`` or a raw response (``body``: its bytes)."""
    status = int(getattr(e, "status", 0) or 0)
    message = getattr(e, "reason", "") or ""
    body = body if body is not None else getattr(e, "body", None)
    if body:
        try:
            doc = json.loads(body)
            message = doc.get("message", message)
        except (ValueError, TypeError):
            message = str(body)[:500]
    return _BY_STATUS.get(status, KubeError)(message or f"HTTP {status}", status)


def _translate_status(obj: Mapping[str, Any]) -> KubeError:
    status = int(obj.get("code", 0) or 0)
    return _BY_STATUS.get(status, KubeError)(obj.get("message", "watch error"), status)
