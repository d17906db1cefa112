"""The controller's backend factory (``deploy.cluster.reconciler.KServeBackends``): one backend per
Rollout, rebuilt when its spec changes and dropped when the reconciler forgets the Rollout, so
a controller that runs for months holds backends for its live Rollouts only. (The reconciler's
calls to ``forget`` run against the real API server in tests/cluster/test_controller.py.)"""

from __future__ import annotations

from typing import Any

from deploy.cluster.kserve_backend import KServeBackend
from deploy.cluster.prometheus import PromQLMetrics, ScrapeMetrics
from deploy.cluster.reconciler import KServeBackends
from tests.support.fakes import FakeClock


def rollout(name: str, generation: int, namespace: str = "team-a",
            **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "generation": generation},
            "spec": {"model": "digits", "candidate": "2", **spec}}


def test_one_backend_per_rollout_rebuilt_on_a_new_generation_dropped_when_forgotten() -> None:
    factory = KServeBackends(None, FakeClock(),  # type: ignore[arg-type]  # never called here
                             prometheus_url="http://prometheus:9090")
    first = factory(rollout("a", 1))
    assert isinstance(first, KServeBackend) and first.config.namespace == "team-a"
    assert isinstance(first.metrics, PromQLMetrics)
    assert factory(rollout("a", 1)) is first  # status writes do not rebuild it
    assert factory(rollout("a", 1, namespace="team-b")) is not first  # another Rollout
    # A spec edit (new generation) replaces the backend; the old one is not kept beside it.
    edited = factory(rollout("a", 2, backend={"minReplicas": 2}, metrics={"scrape": True}))
    assert edited is not first and edited.config.min_replicas == 2
    assert isinstance(edited.metrics, ScrapeMetrics)
    assert len(factory) == 2  # team-a/a and team-b/a, whatever the generations seen
    for generation in range(3, 50):
        factory(rollout("a", generation))
    assert len(factory) == 2
    factory.forget("team-a", "a")
    assert len(factory) == 1
    factory.forget("team-a", "never-seen")  # forgetting what was never held is fine
    factory.forget("team-b", "a")
    assert len(factory) == 0
    assert factory(rollout("a", 50)) is not edited  # a Rollout re-created under the same name
