"""``kloop serve``: the command line of the model server.

The only place that reads argv and the environment (``KLOOP_ADMIN_TOKEN``, and with
``--model-dir`` the cross-check ``KLOOP_MODEL_NAME``/``KLOOP_MODEL_VERSION``); everything else
receives a ``ServerConfig``. ``deploy``'s CLI wires ``add_serve_arguments`` and ``run`` into
``kloop serve``; ``python -m serving`` uses them directly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kloop.artifact import registry_path
from serving import openmp
from serving.app import GRPC_SERVERS, ServerConfig, available_cores, serve
from serving.core.batching import BatchPolicy
from serving.core.errors import ServingError
from serving.core.runtime import DEVICE_KINDS, DTYPE_CHOICES, OPTIMIZE_CHOICES, RuntimeOptions
from serving.workers import supervise

TOKEN_ENV = "KLOOP_ADMIN_TOKEN"
MODEL_NAME_ENV = "KLOOP_MODEL_NAME"
MODEL_VERSION_ENV = "KLOOP_MODEL_VERSION"


def add_serve_arguments(parser: argparse.ArgumentParser, default_registry: str | None = None) -> None:
    """``default_registry``: where the caller keeps its registry (``kloop serve`` passes
    ``$KLOOP_HOME/registry``); without one, ``--registry`` is required."""
    # Every default comes from the config classes, stated once there.
    d, b, r = _defaults(ServerConfig), _defaults(BatchPolicy), _defaults(RuntimeOptions)
    source = parser.add_mutually_exclusive_group(required=default_registry is None)
    source.add_argument("--registry", default=default_registry,
                        help="registry root: a directory or file:// URI (default: %(default)s)")
    source.add_argument("--model-dir", type=Path, default=d["model_dir"],
                        help="serve exactly the one version in this directory (KServe runtime: "
                             f"/mnt/models); ${MODEL_NAME_ENV}/${MODEL_VERSION_ENV}, if set, "
                             "must match its manifest")
    parser.add_argument("--host", default=d["host"],
                        help="address to bind (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=d["http_port"],
                        help="HTTP port, 0 = any free port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=d["grpc_port"],
                        help="gRPC port, 0 = any free port (default: %(default)s)")
    parser.add_argument("--model", action="append", dest="models", default=list(d["models"]),
                        help="model to serve (repeatable; default: every model in the registry)")
    parser.add_argument("--admin-token", default=d["admin_token"],
                        help=f"bearer token for /admin (default: ${TOKEN_ENV}; none = management off)")
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="torch threads per forward pass (default: the available cores, "
                             "divided among --workers)")
    parser.add_argument("--infer-workers", type=int, default=d["infer_workers"],
                        help="threads running models concurrently (default: %(default)s)")
    parser.add_argument("--model-instances", type=int, default=d["model_instances"],
                        help="forward passes of one model version at once (default: "
                             "%(default)s)")
    parser.add_argument("--max-inflight", type=int, default=d["max_inflight"],
                        help="requests admitted at once before 503 (default: %(default)s)")
    parser.add_argument("--grace-seconds", type=float, default=d["grace_seconds"],
                        help="time in-flight requests get to finish on stop (default: %(default)s)")
    batching = parser.add_argument_group(
        "dynamic batching", "for models whose signature has a batch dimension (-1 first)")
    batching.add_argument("--max-batch-size", type=int, default=b["max_batch_size"],
                          help="rows per forward pass; 1 disables batching (default: %(default)s)")
    batching.add_argument("--max-queue-delay-ms", type=float,
                          default=b["max_queue_delay_ms"],
                          help="longest wait for a fuller batch while the model is busy; an idle "
                               "model runs a lone request at once (default: %(default)s)")
    batching.add_argument("--preferred-batch-sizes", type=_sizes,
                          default=b["preferred_batch_sizes"],
                          help="comma-separated batch sizes cut without waiting, e.g. 8,16,32")
    batching.add_argument("--max-queue-size", type=int, default=b["max_queue_size"],
                          help="rows waiting per model version before 503 / RESOURCE_EXHAUSTED "
                               "(default: %(default)s)")
    runtime = parser.add_argument_group("model execution")
    runtime.add_argument("--device", default=r["device"],
                         help=f"{', '.join(DEVICE_KINDS)} or cuda:N (default: %(default)s)")
    runtime.add_argument("--dtype", choices=DTYPE_CHOICES, default=r["dtype"],
                         help="run floating tensors in this precision (GPU only; default: as "
                              "exported)")
    runtime.add_argument("--optimize", choices=OPTIMIZE_CHOICES, default=r["optimize"],
                         help="graph optimisation at load: auto = trace+freeze on CPU, with "
                              "oneDNN where it measures faster at load; CUDA graphs at the "
                              "preferred batch sizes on a GPU (default: %(default)s)")
    runtime.add_argument("--inline-batch-ms", type=float, default=d["inline_batch_ms"],
                         help="run a model's batches on the event loop while they take less "
                              "than this (no thread hand-off); 0 = always in worker threads "
                              "(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=d["group_size"],
                        help="server processes sharing the ports (SO_REUSEPORT); >1 needs fixed "
                             "ports and refuses runtime changes of versions and weights "
                             "(docs/serving.md) (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=d["group_size"], help=argparse.SUPPRESS)
    parser.add_argument("--grpc-server", choices=GRPC_SERVERS, default=d["grpc_server"],
                        help="gRPC front end: native (gRPC's C++ server, serving.grpc.native), aio "
                             "(grpc.aio), auto = native where built (default: %(default)s)")
    parser.add_argument("--no-grpc-fast-lane", dest="grpc_fast_lane", action="store_false",
                        help="send every gRPC call through the general path (the native front "
                             "end's fast lane parses the common ModelInfer itself and batches it "
                             "without a Python step per call; docs/serving.md)")
    parser.add_argument("--ports-file", type=Path, default=d["ports_file"],
                        help='write {"http": N, "grpc": M, "pid": P} here once serving')


def _defaults(config: type[Any]) -> dict[str, Any]:
    """A config dataclass's field defaults by name (fields with a factory have none here)."""
    return {f.name: f.default for f in dataclasses.fields(config)}


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def default_intra_op_threads(workers: int) -> int:
    """torch threads per forward pass when not given: the cores shared out over the worker
    processes, so that workers x threads never exceeds the cores. Oversubscribed, the workers'
    OpenMP threads wait for each other's cores: on the 2-core box, 2 workers x 2 threads served
    the CNN over HTTP at 8 clients at 224 req/s, 2 x 1 at 274 (docs/benchmarks.md)."""
    return max(1, available_cores() // max(1, workers))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    token = args.admin_token if args.admin_token is not None else os.environ.get(TOKEN_ENV)
    model_dir = getattr(args, "model_dir", None)
    return ServerConfig(
        registry=registry_path(args.registry) if model_dir is None else None,
        model_dir=model_dir,
        expect_model=os.environ.get(MODEL_NAME_ENV) or None if model_dir else None,
        expect_version=os.environ.get(MODEL_VERSION_ENV) or None if model_dir else None,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        models=tuple(args.models),
        admin_token=token or None,
        model_instances=args.model_instances,
        intra_op_threads=(args.intra_op_threads if args.intra_op_threads is not None
                          else default_intra_op_threads(args.workers)),
        infer_workers=args.infer_workers,
        max_inflight=args.max_inflight,
        grace_seconds=args.grace_seconds,
        batching=BatchPolicy(
            max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms,
            preferred_batch_sizes=args.preferred_batch_sizes,
            max_queue_size=args.max_queue_size,
        ),
        runtime=RuntimeOptions(device=args.device, dtype=args.dtype, optimize=args.optimize),
        inline_batch_ms=args.inline_batch_ms,
        grpc_server=args.grpc_server,
        grpc_fast_lane=args.grpc_fast_lane,
        ports_file=args.ports_file,
        group_size=max(args.group_size, args.workers),
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed: about 10 % more requests per second through grpc.aio and aiohttp
    on the same core (docs/benchmarks.md); the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT. 0 on a clean stop, 2 on a bad configuration, 1 on failure."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
    except ValueError as e:
        print(f"kloop serve: {e}", file=sys.stderr)
        return 2
    openmp.restart_with_spin_count()  # `kloop serve` (serving.openmp); returns when not needed
    if args.workers > 1 and args.group_size == 1:  # the supervisor of a group
        return supervise(args.workers, args.ports_file, config.grace_seconds)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(config))
    except (ServingError, OSError) as e:
        print(f"kloop serve: {e}", file=sys.stderr)
        return 1
    return 0
