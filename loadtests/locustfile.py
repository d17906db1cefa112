"""Locust entry point for load-testing a kloop model server over HTTP and gRPC.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8080 \\
        --grpc-target 127.0.0.1:8081 --scenario step --csv out/step --html out/step.html

Name ``HttpInferUser`` or ``GrpcInferUser`` after the options to run one protocol only.
See ``loadtests/README.md``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

# locust imports this file by path, as a top-level module: make ``loadtests`` importable
# from whatever directory locust was started in.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from locust import events
from locust.env import Environment

from loadtests.common import listener
from loadtests.grpc_user import GrpcInferUser
from loadtests.http_user import HttpInferUser
from loadtests.shapes import ScenarioShape

__all__ = ["GrpcInferUser", "HttpInferUser", "ScenarioShape"]


@listener(events.init)
def _check_targets(environment: Environment, **_: Any) -> None:
    """Refuse to start a user class that has nowhere to send its requests."""
    opts = environment.parsed_options
    if opts is None:
        return
    classes = set(environment.user_classes)
    if GrpcInferUser in classes and not opts.grpc_target:
        logging.error("GrpcInferUser needs --grpc-target HOST:PORT (or LOCUST_GRPC_TARGET); "
                      "name HttpInferUser alone to test HTTP only")
        sys.exit(2)
    if HttpInferUser in classes and not environment.host:
        logging.error("HttpInferUser needs --host http://HOST:PORT; "
                      "name GrpcInferUser alone to test gRPC only")
        sys.exit(2)
