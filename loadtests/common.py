"""What both user classes share: the command-line options, the input data and the tally of
which model version answered.

The options are registered here, on import, so that any locustfile importing a user class gets
them; locust parses them (command line, ``LOCUST_*`` environment variables or a config file)
and hands them back as ``environment.parsed_options``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from locust import constant_throughput, events
from locust.env import Environment

log = logging.getLogger("loadtests")

SCENARIOS = ("steady", "step", "spike")
INPUT_NAME = "image"
INPUT_SHAPE = (1, 8, 8)  # per sample; a request sends [batch, 1, 8, 8]
OUTPUTS = {"logits": "FP32", "label": "INT64"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


F = TypeVar("F", bound=Callable[..., Any])


def listener(hook: Any) -> Callable[[F], F]:
    """``@listener(events.init)``: locust's ``EventHook.add_listener`` as a decorator that keeps
    the function's type (locust leaves ``add_listener`` unannotated)."""

    def register(fn: F) -> F:
        hook.add_listener(fn)
        return fn

    return register


@listener(events.init_command_line_parser)
def _add_arguments(parser: Any) -> None:
    g = parser.add_argument_group("kloop")
    g.add_argument("--grpc-target", default="", env_var="LOCUST_GRPC_TARGET",
                   help="HOST:PORT of the server's gRPC endpoint (required by GrpcInferUser)")
    g.add_argument("--model", default="digits", env_var="LOCUST_MODEL",
                   help="model name in /v2/models/{model}/infer (default: digits)")
    g.add_argument("--batch", type=_positive_int, default=1, env_var="LOCUST_BATCH",
                   help="samples per infer request (default: 1)")
    g.add_argument("--user-rate", type=_non_negative_float, default=10.0, env_var="LOCUST_USER_RATE",
                   help="requests per second each user aims for; 0 = back to back (default: 10)")
    g.add_argument("--request-timeout", type=_positive_float, default=10.0,
                   help="seconds before one request counts as failed (default: 10)")

    s = parser.add_argument_group("kloop scenarios (every scenario stops by itself)")
    s.add_argument("--scenario", choices=SCENARIOS, default="steady", env_var="LOCUST_SCENARIO",
                   help="steady: -u users at -r/s for --run-time (default 60s); "
                        "step: add --step-users every --step-seconds, --steps times; "
                        "spike: --baseline-users, then --spike-users for --spike-seconds, then back")
    s.add_argument("--step-users", type=_positive_int, default=5, help="users added per step (default: 5)")
    s.add_argument("--step-seconds", type=_positive_float, default=10.0, help="seconds per step (default: 10)")
    s.add_argument("--steps", type=_positive_int, default=6, help="number of steps (default: 6)")
    s.add_argument("--baseline-users", type=_positive_int, default=5,
                   help="users before and after the spike (default: 5)")
    s.add_argument("--baseline-seconds", type=_positive_float, default=20.0,
                   help="seconds of baseline before and again after the spike (default: 20)")
    s.add_argument("--spike-users", type=_positive_int, default=50, help="users during the spike (default: 50)")
    s.add_argument("--spike-seconds", type=_positive_float, default=10.0,
                   help="seconds the spike lasts (default: 10)")


@functools.cache
def digits_images() -> np.ndarray:
    """scikit-learn's bundled 8x8 digits (shipped with the package, nothing is downloaded),
    scaled to [0, 1] like the training data: float32 [1797, 1, 8, 8]."""
    from trainer.tasks.digits_data import load_split

    split = load_split()  # every image once: the training and the held-out part
    data = np.concatenate([split.train_images, split.test_images]).astype(np.float32)
    return data.reshape(-1, *INPUT_SHAPE)


def sample_batch(rng: np.random.Generator, batch: int) -> np.ndarray:
    images = digits_images()
    return images[rng.integers(0, len(images), size=batch)]


def check_outputs(outputs: dict[str, tuple[str, list[int]]], batch: int) -> str | None:
    """Why a response's outputs (name -> (datatype, shape)) are wrong, or None if they are right."""
    expected_shapes = {"logits": [batch, 10], "label": [batch]}
    for name, datatype in OUTPUTS.items():
        if name not in outputs:
            return f"output {name!r} missing (got {sorted(outputs)})"
        got_type, got_shape = outputs[name]
        if got_type != datatype or got_shape != expected_shapes[name]:
            return (f"output {name!r} is {got_type}{got_shape}, "
                    f"expected {datatype}{expected_shapes[name]}")
    return None


class VersionTally:
    """Which model version answered, per protocol: during a rollout this shows the traffic
    split as the load test saw it (per process; each worker logs its own)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, protocol: str, version: str) -> None:
        self.counts[(protocol, version or "?")] += 1

    def summary(self) -> str:
        if not self.counts:
            return "no successful responses"
        return ", ".join(f"{protocol} v{version}: {n}"
                         for (protocol, version), n in sorted(self.counts.items()))


SERVED = VersionTally()


@listener(events.test_stop)
def _log_served(environment: Environment, **_: Any) -> None:
    log.info("served by version: %s", SERVED.summary())


def paced_wait(user: Any) -> float:
    """``wait_time`` for both users: aim at ``--user-rate`` requests per second per user."""
    rate = user.environment.parsed_options.user_rate
    return 0.0 if rate == 0 else constant_throughput(rate)(user)
