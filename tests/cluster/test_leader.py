"""Leader election on a real coordination.k8s.io/v1 Lease: real writes and 409s, fake time."""

from __future__ import annotations

import pytest

from deploy.cluster import kube as k
from deploy.cluster.leader import LEASE, LeaderElector
from tests.support.fakes import FakeClock


def electors(kube: k.Kube, namespace: str, clock: FakeClock) -> tuple[LeaderElector, LeaderElector]:
    mk = lambda ident: LeaderElector(kube, "kloop-controller", namespace, ident, clock,  # noqa: E731
                                     lease_duration_s=15, renew_s=5)
    return mk("a"), mk("b")


def holder(kube: k.Kube, namespace: str) -> str | None:
    return kube.get(LEASE, "kloop-controller", namespace)["spec"].get("holderIdentity")


def test_one_holder_and_takeover_after_expiry(kube, namespace):
    clock = FakeClock()
    a, b = electors(kube, namespace, clock)
    assert a.step() is True
    assert b.step() is False
    lease = kube.get(LEASE, "kloop-controller", namespace)
    assert lease["spec"]["holderIdentity"] == "a" and lease["spec"]["leaseDurationSeconds"] == 15
    assert lease["spec"]["leaseTransitions"] == 0 and lease["spec"]["renewTime"]

    for _ in range(4):  # a renews every 5 s; b never gets in
        clock.advance(5)
        assert a.step() and not b.step()
    renewed = kube.get(LEASE, "kloop-controller", namespace)["spec"]["renewTime"]
    assert renewed != lease["spec"]["renewTime"]

    # a stops renewing (hung or partitioned); b takes over only after a full lease duration
    # of b's own clock since the record last changed, and never while a still thinks it leads.
    for _ in range(14):
        clock.advance(1)
        b.step()
        assert not (a.is_leader() and b.is_leader())
    assert holder(kube, namespace) == "a" and not b.is_leader()
    clock.advance(1)
    assert b.try_acquire_or_renew() is True
    assert not a.is_leader()
    spec = kube.get(LEASE, "kloop-controller", namespace)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert a.try_acquire_or_renew() is False  # a comes back: sees b's fresh record, stays out


def test_the_holder_stops_acting_before_anybody_may_take_over(kube, namespace):
    """client-go's RenewDeadline: a holder that cannot renew stops acting at two thirds of the
    lease (10 of 15 s), while a candidate may take over only when the whole lease has run out:
    a tick begun just before the deadline has the difference to finish its writes before a
    successor starts its own."""
    clock = FakeClock()
    a, b = electors(kube, namespace, clock)
    assert a.renew_deadline_s == 10
    assert a.step() and not b.step()  # b first sees a's record now; a never renews again
    clock.advance(9)
    assert a.is_leader()
    clock.advance(1)
    assert not a.is_leader()  # the deadline: a stops acting ...
    clock.advance(4)
    assert b.try_acquire_or_renew() is False  # ... and nobody acts until the lease ran out
    clock.advance(1)
    assert b.try_acquire_or_renew() is True
    assert holder(kube, namespace) == "b"
    for deadline in (5, 15):  # at most the renew interval, or at least the lease: refused
        with pytest.raises(ValueError, match="renew_deadline_s"):
            LeaderElector(kube, "kloop-controller", namespace, "c", clock, lease_duration_s=15,
                          renew_s=5, renew_deadline_s=deadline)


def test_conflicting_write_on_renew_steps_down(cluster, kube, namespace):
    clock = FakeClock()

    class Racing(k.Kube):
        """Our own wrapper: just before a's write lands, somebody else writes the Lease."""

        race = False

        def replace(self, obj, namespace=None):
            if self.race:
                other = kube.get(LEASE, obj["metadata"]["name"], namespace)
                other["metadata"].setdefault("annotations", {})["touched"] = "by-someone-else"
                kube.replace(other, namespace)
            return super().replace(obj, namespace)

    racing = Racing.connect(k.KubeConfig(kubeconfig=cluster.kubeconfig, namespace=namespace))
    a = LeaderElector(racing, "kloop-controller", namespace, "a", clock, lease_duration_s=15,
                      renew_s=5)
    assert a.step()
    clock.advance(5)
    racing.race = True
    with pytest.raises(AssertionError):  # the real API server answered 409 ...
        assert a.try_acquire_or_renew()
    assert not a.is_leader()  # ... and a stepped down at once, not at expiry


def test_release_hands_over_at_once(kube, namespace):
    clock = FakeClock()
    a, b = electors(kube, namespace, clock)
    assert a.step() and not b.step()
    a.release()
    assert not a.is_leader() and holder(kube, namespace) is None
    assert b.try_acquire_or_renew() is True  # no wait for expiry
    assert holder(kube, namespace) == "b"


def test_durations_use_the_elapsed_clock_not_the_wall_clock(kube, namespace):
    """A wall clock stepped by an hour (NTP, a VM resumed) neither expires the holder's lease
    for a candidate nor the holder's own leadership: durations come from ``elapsed``; the wall
    clock only writes the Lease's timestamps."""
    wall, mono = FakeClock(), FakeClock()
    mk = lambda ident: LeaderElector(kube, "kloop-controller", namespace, ident, wall,  # noqa: E731
                                     lease_duration_s=15, renew_s=5, elapsed=mono.now)
    a, b = mk("a"), mk("b")
    assert a.step() is True and b.step() is False
    first = kube.get(LEASE, "kloop-controller", namespace)["spec"]["renewTime"]
    wall.advance(3600)
    assert a.is_leader()  # an hour of wall time is not an hour of lease
    mono.advance(5)
    assert b.step() is False and a.step() is True
    assert kube.get(LEASE, "kloop-controller", namespace)["spec"]["renewTime"] > first
    mono.advance(16)  # a stops renewing: its own leadership lapses on the elapsed clock ...
    assert not a.is_leader()
    assert b.step() is False  # ... while b first sees a's renewed record now
    wall.advance(7200)  # more wall time changes nothing either
    mono.advance(15)  # a full lease duration of b's elapsed clock after that sight
    assert b.step() is True
