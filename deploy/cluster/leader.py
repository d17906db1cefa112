"""Leader election on a ``coordination.k8s.io/v1`` Lease, so two controller replicas never act.

The protocol is client-go's ``leaderelection`` with a Lease lock, written out small:

* The Lease holds ``holderIdentity``, ``leaseDurationSeconds``, ``acquireTime``,
  ``renewTime`` and ``leaseTransitions``. Every write is a PUT carrying the resourceVersion
  that was read, so of two replicas writing at once exactly one wins; the other gets 409.
* A candidate takes the Lease when it is absent, released (no holder), or EXPIRED: its record
  has not changed for ``leaseDurationSeconds`` of the candidate's OWN clock since it first
  saw that record. Measuring from local observation, not from the holder's ``renewTime``, makes
  the decision immune to skew between the replicas' clocks (client-go does the same).
* The holder renews every ``renew_s``. A renew that fails with 409 (somebody else wrote the
  Lease) means it has lost it: it steps down at once. A renew that fails otherwise (API
  server unreachable) keeps it leader only until its last successful renew is
  ``renew_deadline_s`` old (client-go's RenewDeadline; two thirds of the lease by default).
  Nobody else may take over before ``lease_duration_s``: the difference is the time a tick
  that began just before the deadline has to finish its writes before a successor may start
  its own (a leader that stopped at the lease's very end would leave no such margin).
* ``release()`` (on SIGTERM) clears ``holderIdentity`` so a successor need not wait.

``is_leader()`` is what the reconciler checks before every action. Time is a ``Clock`` for the
timestamps written into the Lease, and ``elapsed`` (``time.monotonic`` in the controller) for
every duration: a wall clock stepped by NTP must not shorten or stretch a lease.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from deploy.cluster import kube as k
from deploy.ports import Clock

log = logging.getLogger(__name__)
LEASE = k.KINDS["Lease"]


class LeaderElector:
    def __init__(self, kube: k.Kube, name: str, namespace: str, identity: str, clock: Clock, *,
                 lease_duration_s: float = 15.0, renew_s: float = 5.0,
                 renew_deadline_s: float | None = None,
                 elapsed: Callable[[], float] | None = None):
        """``renew_deadline_s``: how long after its last successful renew the holder still
        acts (default two thirds of ``lease_duration_s``). ``elapsed``: seconds from any fixed
        origin, for durations (default: ``clock.now``, which tests drive; the controller passes
        ``time.monotonic``)."""
        deadline = lease_duration_s * 2 / 3 if renew_deadline_s is None else renew_deadline_s
        if not 0 < renew_s < deadline < lease_duration_s:
            raise ValueError(
                f"need 0 < renew_s ({renew_s}) < renew_deadline_s ({deadline:g}) < "
                f"lease_duration_s ({lease_duration_s}): a holder must renew before it stops "
                "acting, and stop acting before anybody else may take over")
        self.kube, self.name, self.namespace = kube, name, namespace
        self.identity, self.clock = identity, clock
        self._elapsed = elapsed or clock.now
        self.lease_duration_s, self.renew_s = lease_duration_s, renew_s
        self.renew_deadline_s = deadline
        self._renewed_at: float | None = None  # last successful write as holder (our clock)
        self._observed: tuple[Any, ...] | None = None  # the other holder's record as last seen
        self._observed_at = 0.0
        self._next_try = 0.0

    # ---- state --------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Holding the Lease, renewed within ``renew_deadline_s`` (our clock)."""
        return (self._renewed_at is not None
                and self._elapsed() - self._renewed_at < self.renew_deadline_s)

    def step(self) -> bool:
        """Acquire or renew when due (every ``renew_s``); returns ``is_leader()``. Call it often."""
        if self._elapsed() >= self._next_try:
            self.try_acquire_or_renew()
        return self.is_leader()

    # ---- the protocol -------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        now = self._elapsed()  # durations; the Lease's timestamps use self.clock
        self._next_try = now + self.renew_s
        try:
            lease = self.kube.get(LEASE, self.name, self.namespace)
        except k.NotFound:
            return self._create(now)
        except k.KubeError as e:
            log.warning("lease %s/%s unreadable: %s", self.namespace, self.name, e)
            return self.is_leader()
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder == self.identity:
            return self._write(lease, now, acquired=False)
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"),
                  lease["metadata"].get("resourceVersion"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if self._renewed_at is not None:
            log.warning("lease %s taken by %s: stepping down", self.name, holder)
            self._renewed_at = None
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and now - self._observed_at < duration:
            return False  # held by someone else, not expired by our clock
        return self._write(lease, now, acquired=True)

    def release(self) -> None:
        """Give the Lease up (clear the holder) if we hold it; best effort."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        try:
            lease = self.kube.get(LEASE, self.name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1,
                             "renewTime": _micro(self.clock.now())}
            self.kube.replace(lease, self.namespace)
            log.info("released lease %s/%s", self.namespace, self.name)
        except k.KubeError as e:
            log.warning("could not release lease %s: %s", self.name, e)

    def _create(self, now: float) -> bool:
        body = {
            "apiVersion": LEASE.api_version, "kind": LEASE.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self._spec(acquire_time=_micro(self.clock.now()), transitions=0),
        }
        try:
            self.kube.create(body, self.namespace)
        except k.Conflict:
            return False  # another candidate created it first
        except k.KubeError as e:
            log.warning("cannot create lease %s: %s", self.name, e)
            return False
        self._became(now)
        return True

    def _write(self, lease: dict[str, Any], now: float, *, acquired: bool) -> bool:
        spec = lease.get("spec") or {}
        transitions = int(spec.get("leaseTransitions") or 0)
        wall = _micro(self.clock.now())
        if acquired:
            body_spec = self._spec(acquire_time=wall, transitions=transitions + 1)
        else:
            body_spec = self._spec(acquire_time=spec.get("acquireTime") or wall,
                                   transitions=transitions)
        body = {**lease, "spec": body_spec}  # carries metadata.resourceVersion: the CAS token
        try:
            self.kube.replace(body, self.namespace)
        except k.Conflict:
            if self._renewed_at is not None:
                log.warning("lease %s: conflicting write while renewing; stepping down", self.name)
            self._renewed_at = None
            return False
        except k.KubeError as e:
            log.warning("lease %s: write failed: %s", self.name, e)
            return self.is_leader()
        if acquired:
            self._became(now)
        else:
            self._renewed_at = now
        return True

    def _became(self, now: float) -> None:
        log.info("%s acquired lease %s/%s", self.identity, self.namespace, self.name)
        self._renewed_at = now
        self._observed = None

    def _spec(self, *, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
                "acquireTime": acquire_time, "renewTime": _micro(self.clock.now()),
                "leaseTransitions": transitions}


def _micro(t: float) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


__all__ = ["LeaderElector"]
