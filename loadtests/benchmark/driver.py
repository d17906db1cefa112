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
# what local rollouts need), two worker processes sharing the ports (serving.workers), and one
# process speaking gRPC through grpc.aio instead of the native front end (serving.grpc.native), and
# one process on the native front end without its fast lane (serving.grpc.native.server).
VARIANTS: dict[str, list[str]] = {"kloop": [], "kloop_w2": ["--workers", "2"],
                                  "kloop_aio": ["--grpc-server", "aio"],
                                  "kloop_nolane": ["--no-grpc-fast-lane"]}
NGINX_GRPC_PORT = 8291
NGINX_GRPC_CONF = """# The load generator's own gRPC ceiling: nginx answers every call with one fixed, pre-serialized
# ModelInferResponse (no Python, no model). Written by loadtests/benchmark/driver.py.
{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx_error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    http2_max_concurrent_streams 1024;
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            root {d}/root;
            default_type application/grpc;
            error_page 405 =200 $uri;  # the static module refuses POST; answer with the file
            add_trailer grpc-status 0 always;
        }}
    }}
}}
"""


def nginx_grpc_peer(scratch: str) -> dict[str, object]:
    """A peer (in the harness's format) for the gRPC ceiling without a Python server: nginx over
    cleartext HTTP/2 returning the same fixed reply as the harness's null_grpc_server.py, with
    the grpc-status trailer. Named null_* so the harness runs it at its --null_conc levels."""
    import shutil
    import struct

    from tritonclient.grpc import service_pb2 as pb  # the harness venv has it

    directory = os.path.join(scratch, "null_grpc_nginx")

    def prepare() -> None:
        os.makedirs(os.path.join(directory, "root", "inference.GRPCInferenceService"),
                    exist_ok=True)
        resp = pb.ModelInferResponse(model_name="null", id="")
        out = resp.outputs.add()
        out.name, out.datatype = "output-0", "FP32"
        out.shape.extend([1, 10])
        resp.raw_output_contents.append(b"\0" * 40)
        body = resp.SerializeToString()
        with open(os.path.join(directory, "root", "inference.GRPCInferenceService",
                               "ModelInfer"), "wb") as f:
            f.write(b"\0" + struct.pack(">I", len(body)) + body)  # one gRPC message frame
        with open(os.path.join(directory, "nginx.conf"), "w") as f:
            # Started as root, nginx would run its worker as nobody, who may not read the
            # scratch directory (pytest's is private): keep the worker the invoking user.
            user = "user root;\n" if os.geteuid() == 0 else ""
            f.write(NGINX_GRPC_CONF.format(d=directory, port=NGINX_GRPC_PORT, user=user))

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return dict(start=[nginx, "-p", f"{directory}/", "-e", f"{directory}/nginx_error.log",
                       "-c", f"{directory}/nginx.conf"],
                cwd=directory, prepare=prepare,
                grpc=(f"127.0.0.1:{NGINX_GRPC_PORT}", "null"), ready_port=NGINX_GRPC_PORT)


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
    bench.PEERS["null_grpc_nginx"] = nginx_grpc_peer(scratch)
    sys.argv = ["bench.py", *rest]
    bench.main()


if __name__ == "__main__":
    main()
