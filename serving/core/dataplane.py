"""The dataplane: the one implementation of every OIP operation, shared by gRPC and HTTP.

Adapters turn their wire format into ``InferenceRequest`` and call ``infer``; everything
between (routing by traffic weight, validation against the manifest, fault injection, running
the model, metrics) happens here once, so the two protocols cannot drift apart.

``DataPlane`` is the request path: inference, health and metadata, the native gRPC front end's
fast lane (it implements the ``FastLane`` protocol that front end defines) and the lifecycle
(refuse, drain, stop). Changing what is served (loads, unloads, traffic weights, faults) is
``serving.core.management.Management``'s, which shares this class's repository and faults.

The model runs off the event loop in a small thread pool: a forward pass holds the GIL only in
bursts (torch releases it inside kernels), so a few threads keep both servers responsive while
models run. ``max_inflight`` bounds queued work; beyond it requests fail fast as ``Overloaded``
rather than piling up latency.

Models whose manifest has a batch dimension (``-1`` first in every input and output) go through
one ``serving.core.batching.Batcher`` per version, which merges concurrent requests into one
forward pass; others (or every model with ``max_batch_size`` 1) run one request per pass. Fault
injection, validation, requested outputs and the request metrics stay per request either way.

Deadlines are absolute ``time.monotonic()`` seconds: the adapters pass the client's (gRPC
deadline, HTTP timeout header) and a ``timeout`` request parameter (microseconds, Triton's
convention) adds one. A request past its deadline is answered ``DeadlineExceeded`` and never
reaches the model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

import torch

import kloop
from serving.core.batching import Arrays, Batcher, BatchPolicy, rows_of
from serving.core.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServingError,
)
from serving.core.faults import FaultInjector
from serving.core.repository import LoadedVersion, ModelRepository, sole_version
from serving.core.tensors import from_torch, to_torch
from serving.core.types import (
    SERVER_EXTENSIONS,
    InferenceRequest,
    InferenceResponse,
    InferOutput,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
    WireProtocol,
)
from serving.core.validation import validate

SERVER_NAME = "kloop"
PLATFORM = "pytorch_torch_export"
TIMEOUT_PARAMETER = "timeout"  # request parameter, microseconds (tritonclient's ``timeout=``)
log = logging.getLogger(__name__)


class InferenceRecorder(Protocol):
    """Told about every request that reached a version (the metrics)."""

    def observe(
        self, model: str, version: str, protocol: WireProtocol, seconds: float,
        error: ServingError | None,
    ) -> None: ...

    def observe_group(
        self, model: str, version: str, protocol: WireProtocol, seconds: Sequence[float],
        error: ServingError | None,
    ) -> None:
        """A front end's group of requests (``DataPlane.infer_group``), each as ``observe``
        would count it; without ``error``, answered by the fast lane."""
        ...

    def observe_batch(
        self, model: str, version: str, rows: int, queue_seconds: Sequence[float],
        compute_seconds: float,
    ) -> None:
        """One forward pass of ``rows`` rows, serving requests that waited ``queue_seconds``."""
        ...


@dataclasses.dataclass(frozen=True)
class _BatchMetrics:
    """A version's batcher observer: the recorder with the labels bound."""

    recorder: InferenceRecorder
    model: str
    version: str

    def batch_executed(
        self, rows: int, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None:
        self.recorder.observe_batch(self.model, self.version, rows, queue_seconds, compute_seconds)


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        faults: FaultInjector | None = None,
        recorder: InferenceRecorder | None = None,
        infer_workers: int = 1,
        max_inflight: int = 256,
        expected_models: Sequence[str] = (),
        batch_policy: BatchPolicy | None = None,
        inline_below_ms: float = 0.0,
        intra_op_threads: int | None = None,
        instances: int = 1,
    ) -> None:
        self.repository = repository
        self.faults = faults or FaultInjector()
        self._recorder = recorder
        # torch's intra-op thread count is per thread: set it in each worker, not only in the
        # thread that built the pool. One worker by default, and every other thread that touches
        # torch (the loop, the loader) runs it single-threaded. The reason is libgomp, torch's
        # OpenMP: each thread that runs a parallel region keeps its own team of helper threads,
        # and once the helpers of all teams outnumber the cores, every team stops spinning at
        # its barriers and sleeps on a futex instead. Measured here (2 cores, the benchmark CNN,
        # batch 1): 9.0 ms a forward pass with one team, 11-12 ms with a second, idle one, and
        # 82 context switches per pass instead of none (docs/serving.md).
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=infer_workers, thread_name_prefix="kloop-infer",
            initializer=(functools.partial(torch.set_num_threads, intra_op_threads)
                         if intra_op_threads else None),
        )
        self._instances = instances  # batches of one version running at once
        self._max_inflight = max_inflight
        self._inflight = 0
        self._idle: asyncio.Event | None = None  # set while nothing is in flight (drain)
        self._expected = tuple(expected_models)
        self._shutting_down = False
        self.batch_policy = batch_policy or BatchPolicy()
        self._inline_below_s = inline_below_ms / 1000
        self._batchers: dict[tuple[str, int], Batcher] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def inflight(self) -> int:
        """Inference requests admitted and not yet answered."""
        return self._inflight

    # ---- health and metadata -------------------------------------------------------------

    def live(self) -> bool:
        return True

    def expect_models(self, models: Sequence[str]) -> None:
        """Replace the models readiness waits for (the server, once its start-up loads are
        done: the models it could load; serving.app)."""
        self._expected = tuple(models)

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
        return ServerMetadata(
            name=SERVER_NAME, version=kloop.__version__, extensions=SERVER_EXTENSIONS
        )

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

    async def infer(
        self, request: InferenceRequest, protocol: WireProtocol, *, deadline: float | None = None
    ) -> InferenceResponse:
        """Route, validate, inject faults, run (batched when the model allows), answer.

        ``deadline``: absolute ``time.monotonic()`` seconds by which the client needs the answer.
        """
        if self._shutting_down:  # clean refusal while the in-flight requests drain
            raise ModelNotReady("the server is shutting down; retry on another replica")
        if self._inflight >= self._max_inflight:
            raise Overloaded(f"{self._inflight} requests in flight; try again later")
        loaded = self.repository.route(request.model, request.version)
        version = str(loaded.version)
        self._admit(1)
        start = time.perf_counter()
        errors = _VersionErrors(loaded)
        try:
            with errors:
                validate(request, loaded.manifest)
                deadline = _earliest(deadline, _parameter_deadline(request.parameters))
                if self.faults.active:
                    await self.faults.apply(loaded.model, loaded.version)
                if deadline is not None and deadline <= time.monotonic():
                    raise DeadlineExceeded(f"model {loaded.model} v{version}: the request's "
                                           "deadline passed before it could run")
                arrays = _input_arrays(loaded, request)
                batcher = self._batcher(loaded, arrays)
                if batcher is not None:
                    results = await batcher.submit(arrays, deadline=deadline)
                else:
                    results = await self._run_alone(loaded, arrays, deadline)
                return InferenceResponse(
                    model=loaded.model, model_version=version,
                    outputs=_select_outputs(loaded, request, results), id=request.id,
                )
        finally:
            self._release(1)
            if self._recorder:
                self._recorder.observe(
                    loaded.model, version, protocol, time.perf_counter() - start, errors.error
                )

    # ---- the fast lane (serving.grpc.native.server.FastLane): grouped requests ----------

    @property
    def routing_generation(self) -> tuple[int, int, bool]:
        """Changes whenever ``fast_routes`` may answer differently."""
        return self.repository.generation, self.faults.generation, self._shutting_down

    def fast_routes(self) -> dict[tuple[str, str], LoadedVersion]:
        """(model, version or '' for unversioned) -> the version such a request runs on, for
        every route whose requests ``infer_group`` may take instead of ``infer``: batched
        (a batch dimension, batching on), every input of fixed-size numeric datatype (not
        BOOL, whose raw bytes need checking, nor BYTES) and fixed dims after the first, and no
        fault set on the version. Unversioned only while one version takes all the traffic
        (a split draws per request). Empty while shutting down."""
        routes: dict[tuple[str, str], LoadedVersion] = {}
        if self._shutting_down or not self.batch_policy.enabled:
            return routes
        for model in self.repository.models():
            try:
                weights = self.repository.weights(model)
                versions = {v: self.repository.get(model, v) for v in weights}
            except ModelNotFound:  # unloaded meanwhile
                continue
            for version, loaded in versions.items():
                if self._fast(loaded):
                    routes[(model, str(version))] = loaded
            sole = sole_version(weights)
            if sole is not None and (model, str(sole)) in routes:
                routes[(model, "")] = versions[sole]
        return routes

    def _fast(self, loaded: LoadedVersion) -> bool:
        return (_has_batch_dim(loaded) and self.faults.get(loaded.model, loaded.version) is None
                and all(s.datatype not in ("BOOL", "BYTES") and all(d > 0 for d in s.shape[1:])
                        for s in loaded.manifest.inputs))

    def fast_max_rows(self, loaded: LoadedVersion) -> int:
        """The most rows of one group: the version's batch size (``_policy_for``)."""
        return _policy_for(loaded, self.batch_policy).max_batch_size

    def admits(self, count: int) -> bool:
        """Whether ``count`` more requests would be admitted now (not shutting down, room
        under ``max_inflight``); when not, each one goes through ``infer`` to get its answer."""
        return not self._shutting_down and self._inflight + count <= self._max_inflight

    async def infer_group(
        self, loaded: LoadedVersion, arrays: Arrays, started: Sequence[float],
        protocol: WireProtocol, *, deadline: float | None = None,
    ) -> Arrays:
        """Run requests a front end grouped (``fast_routes``), as one batcher request.

        ``arrays``: one per manifest input, the members' rows concatenated; ``started``: each
        member's arrival (``time.perf_counter()``), for the request metrics, which count each
        member as a request of its own. Returns every output, all the group's rows (the caller
        splits them). The caller checked ``admits``, and that no member's deadline passed;
        ``deadline`` is the latest member's (None when one has none). Raises what ``infer``
        would, for the whole group."""
        count = len(started)
        self._admit(count)
        errors = _VersionErrors(loaded)
        try:
            with errors:
                batcher = self._batcher(loaded, arrays)
                if batcher is not None:
                    return await batcher.submit(arrays, deadline=deadline, requests=count)
                return await self._run_alone(loaded, arrays, deadline)  # unloaded since routed
        finally:
            self._release(count)
            self._observe_group(loaded, started, protocol, errors.error)

    def infer_group_now(
        self, loaded: LoadedVersion, arrays: Arrays, started: Sequence[float],
        protocol: WireProtocol,
    ) -> Arrays | None:
        """``infer_group`` without awaiting, for a fast model whose batcher is idle: the
        outputs when the version's batcher ran the group at once on this thread
        (``Batcher.run_now``), counted as ``infer_group`` counts them; None when it would not
        (nothing happened: ``infer_group`` then). Raises what ``infer_group`` would. Nothing
        else runs meanwhile, so the group is never seen in flight and is not admitted (the
        caller checked ``admits``)."""
        batcher = self._batchers.get((loaded.model, loaded.version))
        if batcher is None:
            return None
        outputs: Arrays | None = None
        errors = _VersionErrors(loaded)
        try:
            with errors:
                outputs = batcher.run_now(arrays, requests=len(started))
        finally:
            if outputs is not None or errors.error is not None:  # it ran, or failed
                self._observe_group(loaded, started, protocol, errors.error)
        return outputs

    def _observe_group(self, loaded: LoadedVersion, started: Sequence[float],
                       protocol: WireProtocol, error: ServingError | None) -> None:
        if self._recorder:
            now = time.perf_counter()
            self._recorder.observe_group(loaded.model, str(loaded.version), protocol,
                                         [now - start for start in started], error)

    def _admit(self, count: int) -> None:
        self._inflight += count
        if self._idle is not None:
            self._idle.clear()

    def _release(self, count: int) -> None:
        self._inflight -= count
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()  # drain() is waiting

    def _batcher(self, loaded: LoadedVersion, arrays: Arrays) -> Batcher | None:
        """The version's batcher, or None when this request runs alone."""
        if not self.batch_policy.enabled or not _has_batch_dim(loaded) or rows_of(arrays) is None:
            return None
        key = (loaded.model, loaded.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            try:  # routed before an unload: run it alone rather than start a batcher nobody stops
                if self.repository.get(loaded.model, loaded.version) is not loaded:
                    return None
            except ModelNotFound:
                return None
            batcher = Batcher(
                lambda inputs: _forward(loaded, inputs), _policy_for(loaded, self.batch_policy),
                executor=self._executor, max_concurrency=self._instances,
                observer=(_BatchMetrics(self._recorder, loaded.model, str(loaded.version))
                          if self._recorder else None),
                name=f"{loaded.model} v{loaded.version}", inline_below_s=self._inline_below_s,
            )
            self._batchers[key] = batcher
        return batcher

    async def _run_alone(
        self, loaded: LoadedVersion, arrays: Arrays, deadline: float | None
    ) -> Arrays:
        """One request, one forward pass (no batch dimension, or batching off)."""
        queued = time.monotonic()

        def run() -> tuple[Arrays, float, float]:
            started = time.monotonic()
            if deadline is not None and deadline <= started:  # waited too long for a thread
                raise DeadlineExceeded(f"model {loaded.model} v{loaded.version}: the request's "
                                       "deadline passed while it waited for a worker")
            outputs = _forward(loaded, arrays)
            return outputs, started - queued, time.monotonic() - started

        loop = asyncio.get_running_loop()
        outputs, queue_seconds, compute = await loop.run_in_executor(self._executor, run)
        if self._recorder:
            rows = rows_of(arrays) if _has_batch_dim(loaded) else None
            self._recorder.observe_batch(
                loaded.model, str(loaded.version), rows or 1, (queue_seconds,), compute)
        return outputs

    # ---- lifecycle -----------------------------------------------------------------------

    def retire(self, model: str, version: int) -> None:
        """Forget an unloaded version's batcher (``serving.core.management``): requests already
        queued for it still get their answers, then it stops."""
        batcher = self._batchers.pop((model, version), None)
        if batcher is not None:
            task = asyncio.get_running_loop().create_task(batcher.close("unloaded", drain=True))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def begin_shutdown(self) -> None:
        """Report not ready and refuse new inference (``ModelNotReady``: 503 / UNAVAILABLE)
        from now on; requests already admitted, queued ones included, still run."""
        self._shutting_down = True

    async def drain(self, timeout: float) -> bool:
        """Wait until no admitted request is left (answered, queued ones included), at most
        ``timeout`` seconds; True when drained."""
        if self._inflight == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop the batchers (requests still queued get ``ModelNotReady``) and the workers."""
        batchers = list(self._batchers.values())
        self._batchers.clear()
        await asyncio.gather(*(b.close() for b in batchers), *self._retiring,
                             return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)


def deadline_in(seconds: float | None) -> float | None:
    """The absolute deadline (``time.monotonic()``) ``seconds`` from now; None stays None."""
    return None if seconds is None else time.monotonic() + seconds


def deadline_from_ms(text: str | None) -> float | None:
    """The deadline a relative timeout in milliseconds (header text) asks for; ``InvalidInput``
    when it is not a positive number."""
    if text is None:
        return None
    try:
        ms = float(text)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise InvalidInput(f"a request timeout must be a positive number of ms, got {text!r}")
    return deadline_in(ms / 1000)


def _policy_for(loaded: LoadedVersion, policy: BatchPolicy) -> BatchPolicy:
    """The server's policy, capped at the most rows the version's runner takes in one call (a
    runner with CUDA graphs pads each batch up to a captured size: a larger batch would run
    without its graph)."""
    cap = getattr(loaded.runnable, "max_rows", None)
    if cap is None or cap >= policy.max_batch_size:
        return policy
    return dataclasses.replace(
        policy, max_batch_size=cap,
        preferred_batch_sizes=tuple(s for s in policy.preferred_batch_sizes if s <= cap))


def _has_batch_dim(loaded: LoadedVersion) -> bool:
    """Batching needs dim 0 to be the batch in every input and output (``-1`` first)."""
    m = loaded.manifest
    return all(len(s.shape) >= 1 and s.shape[0] == -1 for s in (*m.inputs, *m.outputs))


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _parameter_deadline(parameters: Mapping[str, Any]) -> float | None:
    """The deadline from a ``timeout`` parameter: microseconds, 0 = none (as in Triton)."""
    value = parameters.get(TIMEOUT_PARAMETER)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise InvalidInput(
            f"parameter {TIMEOUT_PARAMETER!r} must be a non-negative number of microseconds, "
            f"got {value!r}"
        )
    return time.monotonic() + value / 1e6 if value else None


def _input_arrays(loaded: LoadedVersion, request: InferenceRequest) -> Arrays:
    """One array per manifest input, in manifest order, shaped (a view; no copy)."""
    by_name = {t.name: t for t in request.inputs}
    return tuple(
        by_name[spec.name].data.reshape(by_name[spec.name].shape)
        for spec in loaded.manifest.inputs
    )


class _VersionErrors:
    """The one mapping of what fails while a version serves a request (``infer``,
    ``infer_group``, ``infer_group_now``): what escapes the ``with`` block is what the client
    gets, and ``error`` keeps it for the metrics. A ServingError passes as it is; anything else
    (a bug, an unexpected torch error) becomes the version's InferenceFailed, a 500, with the
    original as its cause. Cancellation passes untouched and is no error."""

    __slots__ = ("_loaded", "error")

    def __init__(self, loaded: LoadedVersion) -> None:
        self._loaded = loaded
        self.error: ServingError | None = None

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(e, ServingError):
            self.error = e
        elif isinstance(e, Exception):
            loaded = self._loaded
            self.error = InferenceFailed(
                f"model {loaded.model} v{loaded.version} failed: {type(e).__name__}: {e}")
            raise self.error from e


def _forward(loaded: LoadedVersion, inputs: Arrays) -> Arrays:
    """Run the model on one request's or one batch's inputs (in a worker thread); one numpy
    array per manifest output, each checked against the manifest's datatype."""
    manifest = loaded.manifest
    args = [to_torch(data, spec.datatype) for data, spec in zip(inputs, manifest.inputs, strict=True)]
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
    outputs = []
    for spec, value in zip(manifest.outputs, results, strict=True):
        try:  # what the model returned is the model's fault, never the client's
            datatype, array = from_torch(value, spec.datatype)
        except (ServingError, AttributeError, TypeError, RuntimeError) as e:
            raise InferenceFailed(f"model {loaded.model} v{loaded.version} returned an output "
                                  f"{spec.name!r} that cannot be sent: {e}") from e
        if datatype != spec.datatype:
            raise InferenceFailed(
                f"model {loaded.model} v{loaded.version} produced {datatype} for output "
                f"{spec.name!r}, its manifest declares {spec.datatype}"
            )
        outputs.append(array)
    return tuple(outputs)


def _select_outputs(
    loaded: LoadedVersion, request: InferenceRequest, results: Arrays
) -> tuple[InferOutput, ...]:
    """The outputs this request asked for (all when it named none), in manifest order."""
    if len(results) != len(loaded.manifest.outputs):  # a batch's split went wrong: a bug
        raise InferenceFailed(f"model {loaded.model} v{loaded.version}: {len(results)} outputs "
                              f"for {len(loaded.manifest.outputs)} declared")
    wanted = set(request.outputs) if request.outputs else None  # None: all (the usual request)
    return tuple(
        InferOutput(spec.name, spec.datatype, array.shape, array)
        for spec, array in zip(loaded.manifest.outputs, results, strict=True)
        if wanted is None or spec.name in wanted
    )
