"""Management: what is served and how traffic splits, the surface the admin routes drive.

Loads, unloads, traffic weights, fault injection, the status view and the refused versions.
They change (or read) what the request path (``serving.core.dataplane.DataPlane``) serves from:
the repository and the fault injector it shares with this class, and its batchers, one per
version (an unloaded version's is retired through ``DataPlane.retire``). Kept out of the request
path's class so that the inference adapters, which hold a ``DataPlane``, have no way to change
what is served: only the HTTP admin routes and the app's start-up hold a ``Management``.

A version whose files fail verification, or whose model file does not load, is remembered with
the reason (``rejected``) until a later load of it succeeds: the admin view and the repository
index report it, so a server that fell back to an older version at start says why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

import torch

from kloop.faults import Fault
from serving.core.dataplane import DataPlane
from serving.core.errors import ArtifactRejected, ModelNotFound
from serving.core.repository import LoadedVersion


class ModelStatus(TypedDict):
    """One model in the management view: its loaded versions and their traffic weights."""

    versions: list[str]
    weights: dict[str, int]


class Management:
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane
        self.repository = dataplane.repository
        self._faults = dataplane.faults
        # Loads (hashing, deserialising, tracing and checking the traced graph) get their own
        # thread, so a slow load never takes an inference worker away while a canary's latency
        # is being measured; concurrent loads of one version share a single future.
        self._load_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kloop-load",
            initializer=torch.set_num_threads, initargs=(1,),  # no OpenMP team of its own
        )
        self._loading: dict[tuple[str, int], asyncio.Future[LoadedVersion]] = {}
        # Versions refused since start, with why (ArtifactRejected's message), by model.
        self._rejected: dict[str, dict[int, str]] = {}

    async def load(self, model: str, version: int) -> LoadedVersion:
        """Verify and load a version without blocking the loop (hashing and torch are slow).
        A refusal (``ArtifactRejected``) is recorded in ``rejected``, a success clears it."""
        key = (model, version)
        pending = self._loading.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(
                loop.run_in_executor(self._load_executor, self.repository.load, model, version))
            self._loading[key] = pending
            pending.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(pending)

    def _settled(self, key: tuple[str, int], done: asyncio.Future[LoadedVersion]) -> None:
        self._loading.pop(key, None)
        if done.cancelled():
            return
        model, version = key
        error = done.exception()
        if isinstance(error, ArtifactRejected):
            self._rejected.setdefault(model, {})[version] = str(error)
        elif error is None and version in self._rejected.get(model, {}):
            del self._rejected[model][version]
            if not self._rejected[model]:
                del self._rejected[model]

    async def load_dir(self, version_dir: Path) -> LoadedVersion:
        """Verify and load one version directory (KServe's /mnt/models) in the loader thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._load_executor, self.repository.load_dir, version_dir)

    def unload(self, model: str, version: int) -> None:
        self.repository.unload(model, version)
        self._faults.clear(model, version)
        self._dataplane.retire(model, version)

    def weights(self, model: str) -> dict[int, int]:
        return self.repository.weights(model)

    def set_weights(self, model: str, weights: Mapping[str | int, int]) -> dict[int, int]:
        return self.repository.set_weights(model, weights)

    def set_fault(self, model: str, version: int, fault: Fault) -> None:
        self.repository.get(model, version)
        self._faults.set(model, version, fault)

    def clear_fault(self, model: str, version: int) -> None:
        self.repository.get(model, version)
        self._faults.clear(model, version)

    def status(self) -> dict[str, ModelStatus]:
        """What is loaded and how traffic splits, per model (the management view)."""
        out: dict[str, ModelStatus] = {}
        for model in self.repository.models():
            try:
                versions = self.repository.versions(model)
                weights = self.repository.weights(model)
            except ModelNotFound:  # unloaded meanwhile
                continue
            out[model] = {
                "versions": [str(v) for v in versions],
                "weights": {str(v): w for v, w in weights.items()},
            }
        return out

    def rejected(self) -> dict[str, dict[int, str]]:
        """Versions whose load was refused (files failing verification, a model file that does
        not load) and not loaded since, with the reason, per model."""
        return {m: dict(sorted(vs.items())) for m, vs in sorted(self._rejected.items())}

    async def aclose(self) -> None:
        """Stop the loader thread, after the load it runs (if any)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        self._load_executor.shutdown(wait=True, cancel_futures=False)
