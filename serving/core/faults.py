"""Fault injection per model version, set through the management API.

It exists so a canary's live analysis can be demonstrated and tested: make version 2 fail half
its requests (or answer 300 ms late) and watch the rollout controller roll it back, the way
Istio's fault injection is used. What a fault is (``Fault``) is the management API's contract,
defined once in ``kloop.faults``. The random source is injected so tests decide the outcome.
"""

from __future__ import annotations

import asyncio
import random
import threading

from kloop.faults import Fault
from serving.core.errors import InferenceFailed

__all__ = ["FaultInjector"]


class FaultInjector:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._faults: dict[tuple[str, int], Fault] = {}
        self._lock = threading.Lock()
        self.generation = 0  # bumped by every set and clear

    def set(self, model: str, version: int, fault: Fault) -> None:
        with self._lock:
            self._faults[(model, version)] = fault
            self.generation += 1

    def clear(self, model: str, version: int) -> None:
        with self._lock:
            self._faults.pop((model, version), None)
            self.generation += 1

    @property
    def active(self) -> bool:
        """Whether any version has a fault (the hot path skips ``apply`` when none has)."""
        return bool(self._faults)

    def get(self, model: str, version: int) -> Fault | None:
        with self._lock:
            return self._faults.get((model, version))

    async def apply(self, model: str, version: int) -> None:
        """Delay and/or fail this request as the version's fault says; no-op without one."""
        fault = self.get(model, version)
        if fault is None:
            return
        if fault.extra_latency_ms > 0:
            await asyncio.sleep(fault.extra_latency_ms / 1000)
        if fault.error_rate > 0 and self._rng.random() < fault.error_rate:
            raise InferenceFailed("injected fault")
