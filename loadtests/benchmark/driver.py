"""Runs inside the peers' venv: the shared harness's ``bench.py`` with kloop added as one more peer.

Everything else is the harness's own code, unchanged: the same start / wait-until-both-models-
answer / closed-loop cells (wrk + ``post.lua`` for HTTP, ``grpc_load.py`` for gRPC, the same
request bytes) / CPU accounting / stop-by-PID for every server, kloop included. This file only
imports ``bench`` from the harness directory and registers kloop's configurations as peers.

Usage (``python -m loadtests.benchmark`` calls it):
    $PEERS_VENV/bin/python driver.py --harness DIR --kloop-python PY --registry DIR
        [--http-port 8480 --grpc-port 8481] -- <bench.py arguments>
"""

from __future__ import annotations

import argparse
import os
import sys

# kloop's configurations, each measured as a peer of its own: one process (the default, and
# what local rollouts need), and two worker processes sharing the ports (serving.workers).
VARIANTS: dict[str, list[str]] = {"kloop": [], "kloop_w2": ["--workers", "2"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", required=True, help="the shared bench/peers directory")
    ap.add_argument("--kloop-python", required=True, help="python of kloop's environment")
    ap.add_argument("--registry", required=True, help="kloop registry with tiny and cnn")
    ap.add_argument("--http-port", type=int, default=8480)
    ap.add_argument("--grpc-port", type=int, default=8481)
    ap.add_argument("--kloop-arg", action="append", default=[],
                    help="extra `python -m serving` argument (repeatable)")
    args, rest = ap.parse_known_args()
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.dont_write_bytecode = True  # the harness directory may be read-only
    sys.path.insert(0, args.harness)
    import bench  # the harness's orchestrator (needs its venv: psutil, tritonclient)

    scratch = bench.S
    for name, extra in VARIANTS.items():
        bench.PEERS[name] = dict(
            start=[args.kloop_python, "-m", "serving", "--registry", args.registry,
                   "--http-port", str(args.http_port), "--grpc-port", str(args.grpc_port),
                   "--grace-seconds", "5", *extra, *args.kloop_arg],
            cwd=os.path.join(scratch, name),
            http=f"http://127.0.0.1:{args.http_port}/v2/models/{{m}}/infer",
            grpc=(f"127.0.0.1:{args.grpc_port}", "v2"),
        )
    sys.argv = ["bench.py", *rest]
    bench.main()


if __name__ == "__main__":
    main()
