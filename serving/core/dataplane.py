"""The dataplane: the one implementation of every OIP operation, shared by gRPC and HTTP.

Adapters turn their wire format into ``InferenceRequest`` and call ``infer``; everything
between (routing by traffic weight, validation against the manifest, fault injection, running
the model, metrics) happens here once, so the two protocols cannot drift apart.

The model runs off the event loop in a small thread pool: a forward pass holds the GIL only in
bursts (torch releases it inside kernels), so a few threads keep both servers responsive while
models run. ``max_inflight`` bounds queued work; beyond it requests fail fast as ``Overloaded``
rather than piling up latency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

import kloop
from serving.core.errors import InferenceFailed, ModelNotFound, Overloaded, ServingError
from serving.core.faults import Fault, FaultInjector
from serving.core.repository import LoadedVersion, ModelRepository
from serving.core.types import (
    InferenceRequest,
    InferenceResponse,
    InferOutput,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
    oip_datatype,
)
from serving.core.validation import validate

SERVER_NAME = "kloop"
PLATFORM = "pytorch_torch_export"


class InferenceRecorder(Protocol):
    """Told about every request that reached a version (the metrics)."""

    def observe(
        self, model: str, version: str, protocol: str, seconds: float, error: ServingError | None
    ) -> None: ...


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        faults: FaultInjector | None = None,
        recorder: InferenceRecorder | None = None,
        infer_workers: int = 2,
        max_inflight: int = 256,
        expected_models: Sequence[str] = (),
    ) -> None:
        self.repository = repository
        self.faults = faults or FaultInjector()
        self._recorder = recorder
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=infer_workers, thread_name_prefix="kloop-infer"
        )
        # Loads (hashing, deserialising) get their own thread, so a slow load never takes an
        # inference worker away while a canary's latency is being measured; concurrent loads
        # of one version share a single future.
        self._load_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kloop-load"
        )
        self._loading: dict[tuple[str, int], asyncio.Future[LoadedVersion]] = {}
        self._max_inflight = max_inflight
        self._inflight = 0
        self._expected = tuple(expected_models)
        self._shutting_down = False

    @property
    def inflight(self) -> int:
        """Inference requests admitted and not yet answered."""
        return self._inflight

    # ---- health and metadata -------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when not shutting down and every expected model has a loaded version."""
        if self._shutting_down:
            return False
        loaded = set(self.repository.models())
        return all(m in loaded for m in self._expected)

    def model_ready(self, model: str, version: str | None = None) -> bool:
        if self._shutting_down:
            return False
        try:
            if version:
                self.repository.get(model, version)
            else:
                return any(w > 0 for w in self.repository.weights(model).values())
        except ModelNotFound:
            return False
        return True

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=kloop.__version__, extensions=())

    def model_metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        versions = self.repository.versions(model)  # ModelNotFound when not loaded
        if version is None:
            # Unversioned: the version most requests get (highest weight; the newest on a tie).
            weights = self.repository.weights(model)
            version = str(max(versions, key=lambda v: (weights.get(v, 0), v)))
        loaded = self.repository.get(model, version)
        m = loaded.manifest
        return ModelMetadata(
            name=model,
            versions=tuple(str(v) for v in versions),
            platform=PLATFORM,
            inputs=tuple(TensorMetadata(s.name, s.datatype, s.shape) for s in m.inputs),
            outputs=tuple(TensorMetadata(s.name, s.datatype, s.shape) for s in m.outputs),
        )

    # ---- inference -----------------------------------------------------------------------

    async def infer(self, request: InferenceRequest, protocol: str) -> InferenceResponse:
        if self._inflight >= self._max_inflight:
            raise Overloaded(f"{self._inflight} requests in flight; try again later")
        loaded = self.repository.route(request.model, request.version)
        version = str(loaded.version)
        self._inflight += 1
        start = time.perf_counter()
        error: ServingError | None = None
        try:
            validate(request, loaded.manifest)
            await self.faults.apply(loaded.model, loaded.version)
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._executor, _run, loaded, request)
            return InferenceResponse(
                model=loaded.model, model_version=version, outputs=outputs, id=request.id
            )
        except ServingError as e:
            error = e
            raise
        except Exception as e:  # a bug or an unexpected torch error: still the version's 500
            error = InferenceFailed(f"model {loaded.model} v{version} failed: {type(e).__name__}: {e}")
            raise error from e
        finally:
            self._inflight -= 1
            if self._recorder:
                self._recorder.observe(
                    loaded.model, version, protocol, time.perf_counter() - start, error
                )

    # ---- management ----------------------------------------------------------------------

    async def load(self, model: str, version: int) -> LoadedVersion:
        """Verify and load a version without blocking the loop (hashing and torch are slow)."""
        key = (model, version)
        pending = self._loading.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(
                loop.run_in_executor(self._load_executor, self.repository.load, model, version))
            self._loading[key] = pending
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(pending)

    def unload(self, model: str, version: int) -> None:
        self.repository.unload(model, version)
        self.faults.clear(model, version)

    def set_weights(self, model: str, weights: Mapping[str | int, int]) -> dict[int, int]:
        return self.repository.set_weights(model, weights)

    def set_fault(self, model: str, version: int, fault: Fault) -> None:
        self.repository.get(model, version)
        self.faults.set(model, version, fault)

    def clear_fault(self, model: str, version: int) -> None:
        self.repository.get(model, version)
        self.faults.clear(model, version)

    def status(self) -> dict[str, dict[str, Any]]:
        """What is loaded and how traffic splits, per model (the management view)."""
        out: dict[str, dict[str, Any]] = {}
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

    # ---- lifecycle -----------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Report not ready from now on, so balancers stop sending new work."""
        self._shutting_down = True

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
        self._load_executor.shutdown(wait=True, cancel_futures=False)


def _run(loaded: LoadedVersion, request: InferenceRequest) -> tuple[InferOutput, ...]:
    """Run the model on one validated request (in a worker thread)."""
    manifest = loaded.manifest
    by_name = {t.name: t for t in request.inputs}
    args = []
    for spec in manifest.inputs:
        tensor = by_name[spec.name]
        data = tensor.data.reshape(tensor.shape)
        if not data.flags.writeable:  # np.frombuffer over request bytes; torch wants writable
            data = data.copy()
        args.append(torch.from_numpy(data))
    try:
        with torch.inference_mode():
            result = loaded.runnable(*args)
    except Exception as e:
        raise InferenceFailed(f"model {loaded.model} v{loaded.version} failed: {e}") from e
    results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    if len(results) != len(manifest.outputs):
        raise InferenceFailed(
            f"model {loaded.model} v{loaded.version} returned {len(results)} outputs, its "
            f"manifest declares {len(manifest.outputs)}"
        )
    wanted = set(request.outputs) or {s.name for s in manifest.outputs}
    outputs = []
    for spec, value in zip(manifest.outputs, results, strict=True):
        if spec.name not in wanted:
            continue
        try:  # what the model returned is the model's fault, never the client's
            array = np.ascontiguousarray(value.detach().cpu().numpy())
            datatype = oip_datatype(array.dtype)
        except (ServingError, AttributeError, TypeError, RuntimeError) as e:
            raise InferenceFailed(f"model {loaded.model} v{loaded.version} returned an output "
                                  f"{spec.name!r} that cannot be sent: {e}") from e
        if datatype != spec.datatype:
            raise InferenceFailed(
                f"model {loaded.model} v{loaded.version} produced {datatype} for output "
                f"{spec.name!r}, its manifest declares {spec.datatype}"
            )
        outputs.append(InferOutput(spec.name, datatype, tuple(array.shape), array))
    return tuple(outputs)
