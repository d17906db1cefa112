"""The server process: gRPC and HTTP on one event loop, models loaded from the registry.

Both protocols share one dataplane, so a weight change made over HTTP applies to gRPC traffic
at the same instant. Inference runs in the dataplane's thread pool; the loop only moves bytes.

Two ways to find models: ``registry`` (a kloop registry; versions load and unload at runtime
through the admin API) or ``model_dir`` (exactly one version directory, as KServe's storage
initializer leaves it in ``/mnt/models``; that version takes all traffic and load/unload are
refused with 409, because a KServe pod serves one version and a rollout changes
InferenceServices, not the pod).

Lifecycle: load each model's ``champion`` version (else its latest) with all its traffic; start
both listeners; write the ports file (tests and the CLI bind port 0 and read it back).

A registry version that is refused at start (its files fail verification, its model file does
not load) does not keep the server down: the error is logged, the newest *older* version that
loads is served instead (a WARNING says so), and the refusal is reported (``/admin/models``'s
``rejected``, the repository index's ``UNAVAILABLE`` with the reason). Older only: versions newer
than the champion were never promoted or were rolled back, and serving one of them to all
traffic would be a silent wrong answer rather than a loud fallback. A model none of whose
versions loads is not served; the others are, and readiness then waits only for the models
that loaded (waiting for the missing one would keep every model out of a balancer's rotation,
the outage the fallback avoids). ``model_dir`` has no fallback: a pod with a bad artifact
refuses to start, so that its rollout fails loudly.

Stop (SIGTERM/SIGINT under ``serve``), so that no admitted request is lost:

1. not ready (health 503 / ``ready: false``) and new inference refused cleanly with
   ``ModelNotReady`` (HTTP 503 + ``Retry-After`` + ``Connection: close``, gRPC UNAVAILABLE),
   while the listeners stay open: a request already on the wire gets an answer, not a reset;
2. every admitted request, queued in a batcher or executing, finishes (``grace_seconds`` at
   most);
3. the listeners close (gRPC with a short grace for responses still being written), HTTP
   connections close, the batchers and worker threads stop, the ports file goes (if it still
   records this process: a server never deletes another's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Literal, get_args

import grpc
import torch
from aiohttp import web

from kloop.artifact import ArtifactError, Registry, read_manifest
from kloop.fsutil import atomic_write_bytes
from serving.core.batching import BatchPolicy
from serving.core.dataplane import DataPlane
from serving.core.errors import ArtifactRejected, ModelNotFound
from serving.core.management import Management
from serving.core.repository import ModelRepository, make_loader
from serving.core.runtime import RuntimeOptions
from serving.grpc import native, servicer
from serving.grpc.native.server import NativeGrpcServer
from serving.http import admin_routes, routes
from serving.metrics import INFLIGHT_REFRESH_S, ServerMetrics
from serving.workers import remove_ports_file

log = logging.getLogger(__name__)
# Who speaks gRPC: "native" (gRPC's C++ server moves the bytes, serving.grpc.native.server),
# "aio" (grpc.aio, pure Python binding), "auto" (native where it is built).
GrpcServerKind = Literal["auto", "native", "aio"]
GRPC_SERVERS: tuple[GrpcServerKind, ...] = get_args(GrpcServerKind)
# A 503 is transient (queue full, not ready yet, replica stopping): retry soon, elsewhere if
# a balancer is in front.
RETRY_AFTER_SECONDS = 1


def available_cores() -> int:
    """Cores this process may run on (its affinity, as a container's cpuset limits it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs, validated at construction (only the CLI reads argv/env)."""

    registry: Path | None = None  # registry root directory (file:// is resolved by the CLI)
    # One version directory instead of a registry (KServe: /mnt/models); see the module doc.
    model_dir: Path | None = None
    # With model_dir: what the deployer meant to serve (KLOOP_MODEL_NAME / KLOOP_MODEL_VERSION,
    # set by deploy.cluster.kserve_manifests). A manifest that says otherwise refuses to start, so a
    # wrong storageUri cannot serve one version's model under another version's label.
    expect_model: str | None = None
    expect_version: str | None = None
    host: str = "127.0.0.1"  # loopback by default: exposing a model server is a decision
    http_port: int = 8080  # 0 = any free port (see ports_file)
    grpc_port: int = 8081  # 0 = any free port
    models: tuple[str, ...] = ()  # models to serve at start; empty = every model in the registry
    admin_token: str | None = None  # bearer token for /admin; None disables management (403)
    # torch threads per forward pass: every core. One worker thread runs every model's batches,
    # one at a time, so one forward pass has the machine: more workers x threads than cores
    # only adds contention, and a second OpenMP team makes both sleep at every barrier
    # (serving.core.dataplane; docs/serving.md has the measurements).
    intra_op_threads: int = dataclasses.field(default_factory=available_cores)
    infer_workers: int = 1  # threads running forward passes (of all models together)
    model_instances: int = 1  # forward passes of one version at once
    max_inflight: int = 256  # requests admitted at once; beyond it: Overloaded (503)
    grace_seconds: float = 10.0  # how long in-flight requests may finish after a stop
    # Dynamic batching, per model version, for models whose manifest has a batch dimension
    # (serving.core.batching); its max_batch_size 1 turns it off.
    batching: BatchPolicy = dataclasses.field(default_factory=BatchPolicy)
    # A model whose batches take less than this many ms runs them on the event loop: for a tiny
    # model the hand-off to a worker thread and back costs more than the forward pass. Measured
    # per version (the first batches run in threads); 0 = always in threads.
    inline_batch_ms: float = 0.5
    # How models run (serving.core.runtime): device, reduced precision on GPUs, graph
    # optimisation at load ("auto": traced+frozen on CPU, CUDA graphs on a GPU), built and timed
    # for the batches ``batching`` forms.
    runtime: RuntimeOptions = dataclasses.field(default_factory=RuntimeOptions)
    grpc_server: GrpcServerKind = "auto"  # who speaks gRPC (GrpcServerKind)
    # The native front end's fast lane for the common ModelInfer (serving.grpc.native.server): on
    # unless turned off to compare, or to rule it out.
    grpc_fast_lane: bool = True
    ports_file: Path | None = None  # written atomically once serving: {"http", "grpc", "pid"}
    # >1: this process is one of that many workers sharing both ports (SO_REUSEPORT; the kernel
    # spreads connections over them), started by ``kloop serve --workers N``
    # (serving.workers). Metrics are then aggregated over the workers (prometheus_client's
    # multiprocess mode, PROMETHEUS_MULTIPROC_DIR), and management that changes what is
    # served is refused (409): each worker holds its own copy, so one call would reach one.
    group_size: int = 1

    def __post_init__(self) -> None:
        if (self.registry is None) == (self.model_dir is None):
            raise ValueError("give exactly one of registry and model_dir")
        if self.model_dir is not None and self.models:
            raise ValueError("models cannot be chosen with model_dir: it holds one version")
        if self.model_dir is None and (self.expect_model or self.expect_version):
            raise ValueError("expect_model/expect_version apply only with model_dir")
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if self.http_port and self.http_port == self.grpc_port:
            raise ValueError(f"http_port and grpc_port are both {self.http_port}")
        if self.group_size > 1 and not (self.http_port and self.grpc_port):
            raise ValueError("several workers share fixed ports: give --http-port and "
                             "--grpc-port (not 0)")
        for name in ("intra_op_threads", "infer_workers", "max_inflight", "model_instances",
                     "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.inline_batch_ms <= 100:
            raise ValueError(f"inline_batch_ms must be in [0, 100], got {self.inline_batch_ms}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("admin_token must not be empty (use None to disable management)")
        if not self.host:
            raise ValueError("host must not be empty")
        if self.grpc_server not in GRPC_SERVERS:
            raise ValueError(f"grpc_server must be one of {', '.join(GRPC_SERVERS)}, got "
                             f"{self.grpc_server!r}")
        if self.grpc_server == "native" and native.grpc_front is None:
            raise ValueError(native.UNAVAILABLE)

    def native_grpc(self) -> bool:
        """Whether gRPC is served by the native front end (serving.grpc.native)."""
        return self.grpc_server == "native" or (
            self.grpc_server == "auto" and native.grpc_front is not None)


class Server:
    """One running server. ``start`` returns once both listeners are bound and models loaded."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics(multiprocess=config.group_size > 1)
        self.registry = Registry(config.registry) if config.registry is not None else None
        self.repository = ModelRepository(
            self.registry, observer=self.metrics,
            loader=make_loader(config.runtime, config.batching))
        self.initial_models = (
            () if self.registry is None else config.models or tuple(self.registry.models())
        )
        self.dataplane = DataPlane(
            self.repository,
            recorder=self.metrics,
            infer_workers=config.infer_workers,
            max_inflight=config.max_inflight,
            expected_models=self.initial_models,
            batch_policy=config.batching,
            inline_below_ms=config.inline_batch_ms,
            intra_op_threads=config.intra_op_threads,
            instances=config.model_instances,
        )
        self.management = Management(self.dataplane)
        self.metrics.track_inflight(lambda: self.dataplane.inflight)
        self.http_port = 0
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._native: NativeGrpcServer | None = None
        self._runner: web.AppRunner | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The loop thread runs only inline batches (models faster than inline_batch_ms): one
        # thread, no OpenMP helpers spinning next to the I/O. Worker threads get
        # intra_op_threads (DataPlane sets it in each).
        torch.set_num_threads(1)
        try:
            await self._load_initial_models()
            await self._start_grpc()
            await self._start_http()
        except BaseException:
            await self.stop()
            raise
        if self.config.group_size > 1:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_metrics())
        if self.config.ports_file:
            _write_ports_file(self.config.ports_file, self.http_port, self.grpc_port)
        log.info("serving http on %s:%d, grpc (%s) on %s:%d", self.config.host, self.http_port,
                 "native" if self._native is not None else "grpc.aio", self.config.host,
                 self.grpc_port)

    async def stop(self) -> None:
        """Not ready and refusing new work, admitted requests finish (``grace_seconds`` at
        most), then listeners and workers go; see the module docstring."""
        self.dataplane.begin_shutdown()
        if self._refresher is not None:
            self._refresher.cancel()
        deadline = time.monotonic() + self.config.grace_seconds
        if not await self.dataplane.drain(self.config.grace_seconds):
            log.warning("stopping with %d requests still in flight after %.1fs",
                        self.dataplane.inflight, self.config.grace_seconds)
        # Drained, handlers may still be writing their answers: a little grace for those.
        grace = max(deadline - time.monotonic(), min(1.0, self.config.grace_seconds))
        tasks = []
        if self._grpc is not None:
            tasks.append(self._grpc.stop(grace))
        if self._native is not None:
            tasks.append(self._native.stop(grace))
        if self._runner is not None:
            tasks.append(self._runner.cleanup())
        await asyncio.gather(*tasks)
        self._grpc = self._runner = self._native = None
        await self.dataplane.aclose()
        await self.management.aclose()
        if self.config.ports_file:
            remove_ports_file(self.config.ports_file)

    async def _refresh_metrics(self) -> None:
        """A worker of a group writes its in-flight count for the others' scrapes."""
        while True:
            self.metrics.refresh()
            await asyncio.sleep(INFLIGHT_REFRESH_S)

    async def _load_initial_models(self) -> None:
        if self.config.model_dir is not None:
            await self._load_model_dir(self.config.model_dir)
            return
        served = [name for name in self.initial_models if await self._load_initial(name)]
        self.dataplane.expect_models(served)  # not the ones that failed (module docstring)

    async def _load_initial(self, name: str) -> bool:
        """Load ``name``'s champion (else its latest version), or the newest older version that
        loads if that one is refused; False when none loads (module docstring)."""
        assert self.registry is not None  # ServerConfig: exactly one of the two
        versions = self.registry.versions(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} has no versions in {self.registry.root}")
        try:
            champion = self.registry.alias(name, "champion")
        except ArtifactError as e:
            log.error("%s: cannot read its champion alias (%s): starting from its latest version",
                      name, e)
            champion = None
        wanted = champion or versions[-1]
        role = "the champion" if champion else "the latest version"
        for version in [wanted, *(v for v in reversed(versions) if v < wanted)]:
            try:
                await self.management.load(name, version)
            except (ArtifactRejected, ModelNotFound) as e:
                log.error("not serving %s v%d: %s", name, version, e)
                continue
            if version == wanted:
                log.info("loaded %s v%d", name, version)
            else:
                log.warning("serving %s v%d instead of %s v%d", name, version, role, wanted)
            return True
        log.error("no version of %s up to v%d loads: %s is not served (the other models are)",
                  name, wanted, name)
        return False

    async def _load_model_dir(self, path: Path) -> None:
        try:
            m = read_manifest(path, str(path))  # cheap: the cross-check before hashing it all
        except ArtifactError as e:
            raise ArtifactRejected(f"refusing to serve {path}: {e}") from e
        want = (self.config.expect_model, self.config.expect_version)
        if (want[0] and want[0] != m.name) or (want[1] and want[1] != str(m.version)):
            raise ArtifactRejected(
                f"{path} holds {m.name} v{m.version}, but the deployment expects "
                f"{want[0] or m.name} v{want[1] or m.version} (KLOOP_MODEL_NAME/"
                "KLOOP_MODEL_VERSION): refusing to serve one version under another's name"
            )
        loaded = await self.management.load_dir(path)
        log.info("loaded %s v%d from %s", loaded.model, loaded.version, path)

    async def _start_grpc(self) -> None:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host  # IPv6
        address = f"{host}:{self.config.grpc_port}"
        # grpc sets SO_REUSEPORT by default: a second server would silently share the port.
        # Only workers of one group may (they serve the same models).
        reuse_port = self.config.group_size > 1
        if self.config.native_grpc():
            self._native = NativeGrpcServer(
                servicer.InferenceServicer(self.dataplane), address, reuse_port=reuse_port,
                fast_lane=self.dataplane if self.config.grpc_fast_lane else None)
            self.grpc_port = self._native.port
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
        servicer.add_to_server(server, self.dataplane)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as e:  # grpcio raises where older versions returned 0
            raise OSError(f"gRPC could not bind {address}: {e}") from e
        if port == 0:
            raise OSError(f"gRPC could not bind {address}")
        self._grpc = server
        await server.start()
        self.grpc_port = port

    async def _start_http(self) -> None:
        app = web.Application(
            middlewares=[self._closing_middleware, routes.error_middleware,
                         admin_routes.auth_middleware],
            client_max_size=64 * 1024**2,  # a large batch of inputs as JSON
        )
        app[routes.DATAPLANE_KEY] = self.dataplane
        app[routes.METRICS_KEY] = self.metrics
        app[admin_routes.MANAGEMENT_KEY] = self.management
        app[admin_routes.TOKEN_KEY] = self.config.admin_token or admin_routes.NO_TOKEN
        app[admin_routes.GROUP_SIZE_KEY] = self.config.group_size
        routes.add_routes(app)
        admin_routes.add_routes(app)
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None,
            shutdown_timeout=self.config.grace_seconds,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.config.host, self.config.http_port,
                           reuse_port=self.config.group_size > 1 or None)
        await site.start()
        self.http_port = int(runner.addresses[0][1])


    @web.middleware
    async def _closing_middleware(
        self, request: web.Request, handler: routes.Handler
    ) -> web.StreamResponse:
        """Every 503 (overloaded, not ready, shutting down) says when to retry; once stopping,
        every answer also closes its connection, so clients move to another replica instead of
        reusing a connection that is about to close."""
        response = await handler(request)
        if response.status == 503:
            response.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
        if self.dataplane.shutting_down:
            response.force_close()
        return response


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set, or (without one) until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    server = Server(config)
    try:
        await server.start()
        # Everything alive now (torch, the models, the servers) lives as long as the process:
        # out of the cyclic collector's reach, a full collection no longer walks it (one could
        # take 100+ ms with torch loaded: a latency spike for every request then in flight).
        # Here, not in Server.start: only a process that is the server may freeze its heap.
        gc.collect()
        gc.freeze()
        try:
            await stop.wait()
            log.info("stopping: finishing in-flight requests (grace %.1fs)", config.grace_seconds)
        finally:
            await server.stop()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _write_ports_file(path: Path, http_port: int, grpc_port: int) -> None:
    body = json.dumps({"http": http_port, "grpc": grpc_port, "pid": os.getpid()})
    atomic_write_bytes(path, body.encode())
