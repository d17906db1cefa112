"""The in-cluster controller: Rollout custom resources ticked by the SAME ``deploy.controller.tick``
that drives a local rollout, with the CR as the store (``deploy.cluster.cr_store``).

Level-triggered: a reconcile never asks "what changed?". It reads the CR and the world, and
``tick`` takes at most one decision from them. What triggers a reconcile only decides WHEN:

* a watch event that can change the answer: a Rollout ADDED, or its spec edited
  (``metadata.generation`` moved). Our own status writes do not bump ``generation``, so they
  do not trigger a reconcile (otherwise every write would tick again at once, a hot loop);
* a periodic resync every ``interval_s`` over every non-terminal Rollout: the requeue. Nothing
  sleeps inside a reconcile; waiting for an analysis window is "tick again next resync".

Only the holder of the Lease (``deploy.cluster.leader``) reconciles; the others keep watching so they
can take over warm. ``tick`` saves with the CR's resourceVersion, so even a stale leader that
has not yet noticed it lost the Lease cannot overwrite a newer status: it gets a 409, re-reads,
and its next decision starts from the newer state.

Why not kopf: kopf has no Lease-based leader election (its "peering" uses its own
KopfPeering resources and only pauses operators, it does not fence them), it keeps its own
progress in annotations on our objects (a second status store beside ours), and its handler
model (on.create/on.update with retries by sleeping in handlers) would wrap a state machine
that already exists as a pure ``decide``/idempotent ``tick``. A plain watch + resync loop is
~200 lines and every line of it is ours to test.

Each decision that adds to the rollout's history is recorded as a core/v1 Event on the Rollout
(``kubectl describe rollout`` shows them).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from deploy.cluster import kube as k
from deploy.cluster.cr_store import ROLLOUT, CRRolloutStore, InvalidSpec, rollout_from_cr
from deploy.cluster.leader import LeaderElector
from deploy.controller import tick
from deploy.ports import Clock, Conflict, NotFound, RolloutBackend
from deploy.rollout import WRITE_FAILED, Action, Event, Phase, Rollout
from kloop.artifact import Registry
from kloop.model_version import Version

log = logging.getLogger(__name__)

BackendFactory = Callable[[Mapping[str, Any]], RolloutBackend]
"""``backend_for(rollout_cr)``: the backend that serves this Rollout's model. A factory that
keeps backends may also have ``forget(namespace, name)``: the reconciler calls it once a Rollout
has ended or is gone."""

_WARNING_KINDS = {WRITE_FAILED, Action.ROLLBACK, Action.ABORT}
_TERMINAL = {p.value for p in Phase if p.terminal}


class Reconciler:
    """Ticks the Rollouts of ``namespaces`` while ``elector`` (if any) holds the Lease."""

    def __init__(self, kube: k.Kube, namespaces: tuple[str, ...] | list[str], registry: Registry,
                 backend_for: BackendFactory, clock: Clock, *,
                 elector: LeaderElector | None = None, interval_s: float = 5.0,
                 conflict_retries: int = 3):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if not namespaces:
            raise ValueError("at least one namespace to watch")
        self.kube, self.registry, self.clock = kube, registry, clock
        self.namespaces = tuple(namespaces)
        self.backend_for, self.elector = backend_for, elector
        self.interval_s, self.conflict_retries = interval_s, conflict_retries
        self.stores = {ns: CRRolloutStore(kube, ns, champion_of=self._champion_of)
                       for ns in self.namespaces}
        self.last_loop = clock.now()  # liveness: the loop came round recently
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self._generations: dict[tuple[str, str], int] = {}
        self._noted: set[tuple[str, ...]] = set()

    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader()

    # ---- one rollout --------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> Rollout | None:
        """One level-triggered pass over one Rollout: at most one decision. ``None`` when
        nothing was ticked (not leader, gone, terminal, invalid, or waiting for an older
        rollout of the same model)."""
        if not self.is_leader():
            return None
        store = self.stores[namespace]
        try:
            obj = store.get_object(name)
        except NotFound:
            self._forget(namespace, name)
            return None
        if (obj.get("status") or {}).get("phase") in _TERMINAL:
            self._forget(namespace, name)
            return None
        try:
            before = rollout_from_cr(obj, self._champion_of)
            first = store.active(before.model)
        except InvalidSpec as e:
            self._reject(store, obj, str(e))
            return None
        if first is not None and first.id != name:
            self._event_once(obj, "Waiting", f"model {before.model} has an older active "
                                             f"rollout {first.id}; waiting for it to finish")
            return None
        backend = self.backend_for(obj)
        for _ in range(self.conflict_retries):
            if not self.is_leader():
                return None  # lost the Lease mid-way: do not act on a stale mandate
            try:
                after = tick(store, backend, self.registry, name, self.clock)
                break
            except Conflict as e:
                log.info("rollout %s/%s: %s; re-reading", namespace, name, e)
                before = store.get(name)
        else:
            return None
        self._record(obj, before, after)
        if after.phase.terminal:
            self._forget(namespace, name)
        return after

    def resync(self) -> None:
        """Reconcile every non-terminal Rollout of every namespace (the periodic requeue)."""
        for ns in self.namespaces:
            try:
                objs = self.stores[ns].objects()
            except k.KubeError as e:
                log.warning("cannot list rollouts in %s: %s", ns, e)
                continue
            for obj in objs:
                # Renew (when due) between rollouts: a long resync must not outlive the Lease,
                # and a replica that lost it stops before the next tick.
                if self.elector is not None and not self.elector.step():
                    return
                if (obj.get("status") or {}).get("phase") not in _TERMINAL:
                    self._guarded(ns, obj["metadata"]["name"])

    # ---- the loop -----------------------------------------------------------------------

    def run(self, stop: Callable[[], bool], poll_s: float = 0.5) -> None:
        """Watch, resync every ``interval_s``, renew the Lease, until ``stop()``."""
        for ns in self.namespaces:
            threading.Thread(target=self._watch, args=(ns, stop), daemon=True,
                             name=f"watch-rollouts-{ns}").start()
        next_resync, was_leader = 0.0, False
        while not stop():
            self.last_loop = now = self.clock.now()
            leader = self.elector.step() if self.elector is not None else True
            if leader and not was_leader:
                log.info("leading: reconciling %s", ", ".join(self.namespaces))
                next_resync = now  # a new leader looks at everything first
            was_leader = leader
            if leader and now >= next_resync:
                self.resync()
                next_resync = self.clock.now() + self.interval_s
            try:
                ns, name = self._queue.get(timeout=poll_s)
            except queue.Empty:
                continue
            if self.is_leader():
                self._guarded(ns, name)

    def _watch(self, namespace: str, stop: Callable[[], bool]) -> None:
        while not stop():
            try:
                for etype, obj in self.kube.watch(ROLLOUT, namespace, stop=stop):
                    if self._wants(namespace, etype, obj):
                        self._queue.put((namespace, obj["metadata"]["name"]))
            except Exception as e:  # noqa: BLE001 - keep watching whatever broke this one
                log.warning("rollout watch in %s failed (%s); restarting", namespace, e)
                self.clock.sleep(1.0)

    def _wants(self, namespace: str, etype: str, obj: Mapping[str, Any]) -> bool:
        """Spec changes, new objects and deletions (the reconcile then finds the Rollout gone
        and forgets what it held for it), not our own status writes (generation predicate)."""
        meta = obj.get("metadata", {})
        key = (namespace, meta.get("name", ""))
        if etype == "DELETED":
            self._generations.pop(key, None)
            return True
        gen = int(meta.get("generation") or 0)
        changed = self._generations.get(key) != gen
        self._generations[key] = gen
        return changed

    def _guarded(self, namespace: str, name: str) -> None:
        """A reconcile whose failure (API server hiccup, backend bug) is logged, not fatal:
        the next resync tries again."""
        try:
            self.reconcile(namespace, name)
        except Exception:  # one broken rollout must not stop the others (logged)
            log.exception("reconcile of rollout %s/%s failed", namespace, name)

    # ---- helpers ------------------------------------------------------------------------

    def _forget(self, namespace: str, name: str) -> None:
        """Drop what this process keeps for a Rollout that ended or is gone: the backend (when
        the factory keeps one) and the conditions already announced."""
        self._noted = {key for key in self._noted if key[:2] != (namespace, name)}
        forget = getattr(self.backend_for, "forget", None)
        if forget is not None:
            forget(namespace, name)

    def _champion_of(self, model: str) -> Version | None:
        return self.registry.alias(model, "champion")

    def _record(self, obj: Mapping[str, Any], before: Rollout, after: Rollout) -> None:
        """One Event per new history entry (history only grows; a coalesced wait adds none)."""
        new = after.history[len(before.history):]
        for e in new:
            self.kube.event(dict(obj), _reason(e), _message(e),
                            type="Warning" if e.kind in _WARNING_KINDS else "Normal",
                            component="kloop-controller")

    def _event_once(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        """An Event the first time this process notices a condition (no event list: RBAC
        grants the controller create/patch on events, not reads)."""
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"], reason, message)
        if key not in self._noted:
            self._noted.add(key)
            self.kube.event(dict(obj), reason, message, component="kloop-controller")

    def _reject(self, store: CRRolloutStore, obj: Mapping[str, Any], why: str) -> None:
        """A spec the schema let through but kloop cannot run: Aborted, with the reason."""
        now = self.clock.now()
        body = {"apiVersion": ROLLOUT.api_version, "kind": ROLLOUT.kind,
                "metadata": {"name": obj["metadata"]["name"],
                             "namespace": obj["metadata"].get("namespace"),
                             "resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": {"phase": Phase.ABORTED.value, "reason": f"invalid spec: {why}",
                           "updated": now}}
        try:
            self.kube.replace_status(body, store.namespace)
        except k.KubeError as e:
            log.warning("cannot mark %s invalid: %s", obj["metadata"]["name"], e)
            return
        self.kube.event(dict(obj), "InvalidSpec", why, type="Warning",
                        component="kloop-controller")


def _reason(e: Event) -> str:
    """Event reasons in Kubernetes' CamelCase: ``set_weights`` -> ``SetWeights``."""
    return "".join(p.capitalize() for p in e.kind_name.split("_")) or "Tick"


def _message(e: Event) -> str:
    weights = ", ".join(f"v{v}={w}%" for v, w in sorted(e.weights.items()))
    verdict = f" [{e.verdict.value}]" if e.verdict else ""
    return f"{e.message}{verdict}" + (f" (weights {weights})" if weights else "")


class KServeBackends:
    """The production ``BackendFactory``: a ``KServeBackend`` per Rollout, configured from its
    ``spec.backend`` and ``spec.metrics`` (falling back to the controller's flags). One per
    Rollout: a new spec generation replaces it, and ``forget`` (the reconciler's call when a
    Rollout ends or is deleted) drops it, so a long-lived controller holds backends for its
    live Rollouts only. Imported lazily, so the controller's other parts load without the
    KServe backend. Called from the reconciler's loop thread only."""

    def __init__(self, kube: k.Kube, clock: Clock, *,
                 prometheus_url: str | None = None, scrape: bool = False) -> None:
        self.kube, self.clock = kube, clock
        self.prometheus_url, self.scrape = prometheus_url, scrape
        self._backends: dict[tuple[str, str], tuple[int, RolloutBackend]] = {}

    def __len__(self) -> int:
        return len(self._backends)

    def __call__(self, obj: Mapping[str, Any]) -> RolloutBackend:
        from deploy.cluster.kserve_backend import KServeBackend, KServeConfig
        from deploy.cluster.prometheus import PromQLMetrics, ScrapeMetrics

        meta, spec = obj["metadata"], obj.get("spec") or {}
        key = (meta.get("namespace", ""), meta["name"])
        generation = int(meta.get("generation") or 0)
        held = self._backends.get(key)
        if held is not None and held[0] == generation:
            return held[1]
        b, m = spec.get("backend") or {}, spec.get("metrics") or {}
        url = m.get("prometheusUrl") or self.prometheus_url
        metrics = ScrapeMetrics() if (m.get("scrape") or self.scrape or not url) \
            else PromQLMetrics(url)
        wanted = {"namespace": meta.get("namespace"), "mode": b.get("mode"),
                  "storage_uri_prefix": b.get("storageUriPrefix"),
                  "resources": b.get("resources"), "min_replicas": b.get("minReplicas"),
                  "max_replicas": b.get("maxReplicas"), "autoscaler": b.get("autoscaler")}
        names = {f.name for f in dataclasses.fields(KServeConfig)}
        cfg = KServeConfig(**{n: v for n, v in wanted.items() if v is not None and n in names})
        backend = KServeBackend(self.kube, cfg, metrics, now=self.clock.now)
        self._backends[key] = (generation, backend)
        return backend

    def forget(self, namespace: str, name: str) -> None:
        self._backends.pop((namespace, name), None)


__all__ = ["BackendFactory", "KServeBackends", "Reconciler"]
