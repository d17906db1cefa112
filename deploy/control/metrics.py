"""The control plane's own ``/metrics`` for Prometheus, read from the store at each scrape.

As Flagger exports each canary's status and weight, kloop exports, per model, the phase of its
current rollout (one series per phase, 1 for the phase it is in) and the candidate's traffic
weight, and the pipeline runs by status::

    kloop_control_runs{status="succeeded"} 12
    kloop_rollout_phase{model="digits",phase="Progressing"} 1
    kloop_rollout_canary_weight{model="digits"} 50
    kloop_rollout_paused{model="digits"} 0
    kloop_control_live_runs 1
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from deploy.local.runs import STATUSES
from deploy.rollout import Phase

if TYPE_CHECKING:
    from collections.abc import Iterator

    from deploy.control.service import ControlPlane


class _StoreCollector(Collector):
    def __init__(self, plane: ControlPlane):
        self.plane = plane

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.plane.runs.counts()
        runs = GaugeMetricFamily("kloop_control_runs", "Pipeline runs by status",
                                 labels=["status"])
        for status in sorted(set(STATUSES) | set(counts)):
            runs.add_metric([status], counts.get(status, 0))
        yield runs
        live = GaugeMetricFamily("kloop_control_live_runs",
                                 "Pipeline runs this control plane is executing now")
        live.add_metric([], len(self.plane.live_runs()))
        yield live
        phase = GaugeMetricFamily("kloop_rollout_phase", "The phase of each model's current "
                                  "(active, else latest) rollout: 1 for the phase it is in",
                                  labels=["model", "phase"])
        weight = GaugeMetricFamily("kloop_rollout_canary_weight", "Percent of the model's "
                                   "traffic its active rollout's candidate takes (0: none)",
                                   labels=["model"])
        paused = GaugeMetricFamily("kloop_rollout_paused", "1 while the model's active rollout "
                                   "is paused", labels=["model"])
        for model in self.plane.registry.models():
            latest, _ = self.plane.rollouts.page(model=model, limit=1)
            active = self.plane.rollouts.active(model)
            current = active or (latest[0] if latest else None)
            if current is None:
                continue
            for p in Phase:
                phase.add_metric([model, p.value], 1.0 if current.phase is p else 0.0)
            w = current.weights.get(current.candidate, 0) if active is not None else 0
            weight.add_metric([model], float(w))
            paused.add_metric([model], 1.0 if active is not None and bool(
                getattr(active, "paused", False)) else 0.0)
        yield phase
        yield weight
        yield paused


def metrics_text(plane: ControlPlane) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StoreCollector(plane))
    return generate_latest(registry)
