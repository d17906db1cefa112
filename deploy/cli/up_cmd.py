"""``kloop up``: run the control plane (``deploy.control``) on the home, in the foreground.

One per home. It owns the pipeline runs it is asked for and ticks every local rollout; the CLI
(``kloop pipeline run``, ``kloop runs``, ``kloop rollout promote | abort | pause | resume |
undo``) talks to it while it runs, and works on its own when none does.
"""

from __future__ import annotations

import argparse
import logging

from deploy.cli import common


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="run the control plane: API (HTTP + gRPC), web UI, rollouts",
                       description="Run the control plane on the home: it runs pipeline runs, "
                                   "ticks local rollouts, and serves its API (HTTP/JSON under "
                                   "/api/v1, gRPC kloop.control.v1) and web UI. Writes need "
                                   "the token in <home>/control.token.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; anything else exposes the "
                        "API beyond this machine)")
    p.add_argument("--http-port", type=int, default=8700, help="0: any free port (default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=8701, help="0: any free port (default: %(default)s)")
    p.add_argument("--private-reads", action="store_true",
                   help="reads (the UI, GET endpoints, /metrics) need the token too")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between rollout ticks (default: %(default)s)")
    p.add_argument("--max-parallel-runs", type=int, default=2,
                   help="pipeline runs executed at once; more wait (default: %(default)s)")
    p.add_argument("--train-attempts", type=int, default=3,
                   help="times a training step killed by a signal is tried (default: %(default)s)")
    p.add_argument("--retry-backoff", type=float, default=2.0,
                   help="seconds before the first retry, doubled each time (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deploy.control.server import ControlConfig, serve

    for name in ("max_parallel_runs", "train_attempts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.interval > 0:
        raise ValueError("--interval must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(common.home(args), ControlConfig(
        host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        private_reads=args.private_reads, tick_interval_s=args.interval,
        max_parallel_runs=args.max_parallel_runs, train_attempts=args.train_attempts,
        retry_backoff_s=args.retry_backoff))
    return 0
