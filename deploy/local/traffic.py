"""Built-in live traffic: a bounded, rate-limited client that sends real held-out digits to the
server over gRPC and HTTP and counts, per version that answered, requests, errors and correct
predictions.

Why it exists: a canary is judged on live metrics, so the main job needs live traffic while it
rolls out; and per-version live accuracy shows what the evaluation gate predicted. Load tests
proper (locust) live in ``loadtests/``; this is the small always-available generator.

It runs its own event loop in a background thread so that synchronous code (the pipeline, the
controller's ticks) can go on beside it. Every loop is bounded by ``stop()`` and by an optional
``duration_s``; it only ever talks to the server it was given (loopback by default).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Sequence

import aiohttp
import numpy as np

from serving.client import GrpcClient, HttpClient, InferenceError


@dataclasses.dataclass
class LiveStats:
    requests: int = 0
    errors: int = 0
    correct: int = 0
    latency_s: float = 0.0

    @property
    def accuracy(self) -> float | None:
        ok = self.requests - self.errors
        return self.correct / ok if ok else None


@dataclasses.dataclass(frozen=True)
class TrafficConfig:
    model: str
    http_url: str  # e.g. http://127.0.0.1:8080
    grpc_target: str  # e.g. 127.0.0.1:8081
    rate_per_s: float = 60.0  # total request rate; modest, the server shares 2 cores with training
    concurrency: int = 4  # workers; half speak gRPC, half HTTP
    duration_s: float | None = None  # None: until stop()

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.concurrency < 2:
            raise ValueError("rate_per_s must be > 0 and concurrency >= 2 (one gRPC, one HTTP worker)")


class TrafficGenerator:
    """Sends ``images[i]`` (FP32 [1,1,8,8]) and checks the answer against ``labels[i]``."""

    def __init__(self, config: TrafficConfig, images: np.ndarray, labels: np.ndarray | Sequence[int]):
        if len(images) == 0 or len(images) != len(labels):
            raise ValueError("need as many labels as images, and at least one")
        self.config = config
        self._images = np.ascontiguousarray(images, dtype=np.float32)
        self._labels = np.asarray(labels)
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], LiveStats] = collections.defaultdict(LiveStats)
        self._failures: collections.Counter[str] = collections.Counter()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: Exception | None = None  # set when the generator died of an unexpected error

    # ---- control ------------------------------------------------------------------------

    def start(self) -> TrafficGenerator:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="kloop-traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> TrafficGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- results ------------------------------------------------------------------------

    def stats(self) -> dict[tuple[str, str], LiveStats]:
        """(protocol, version) -> counts so far. Version "?" holds requests no version answered."""
        with self._lock:
            return {k: dataclasses.replace(v) for k, v in self._stats.items()}

    def by_version(self) -> dict[str, LiveStats]:
        out: dict[str, LiveStats] = collections.defaultdict(LiveStats)
        for (_, version), s in self.stats().items():
            o = out[version]
            o.requests += s.requests
            o.errors += s.errors
            o.correct += s.correct
            o.latency_s += s.latency_s
        return dict(out)

    def failures(self) -> dict[str, int]:
        """Error messages seen (first 80 characters) and how often."""
        with self._lock:
            return dict(self._failures)

    # ---- the loop -----------------------------------------------------------------------

    async def _main(self) -> None:
        cfg = self.config
        grpc_client = GrpcClient(cfg.grpc_target)
        http_client = HttpClient(cfg.http_url)
        interval = cfg.concurrency / cfg.rate_per_s
        deadline = None if cfg.duration_s is None else time.monotonic() + cfg.duration_s
        try:
            workers = [
                self._worker(i, grpc_client if i % 2 == 0 else http_client, "grpc" if i % 2 == 0 else "http",
                             interval, deadline)
                for i in range(cfg.concurrency)
            ]
            await asyncio.gather(*workers)
        except Exception as e:  # a bug: keep it visible instead of silently stopping traffic
            self.error = e
            raise
        finally:
            await grpc_client.close()
            await http_client.close()

    async def _worker(self, seed: int, client: GrpcClient | HttpClient, protocol: str,
                      interval: float, deadline: float | None) -> None:
        rng = np.random.default_rng(seed)
        next_at = time.monotonic() + rng.uniform(0, interval)
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(min(delay, 0.25))
                continue
            # Keep the rate, never catch up in a burst after a stall (a slow server must not be
            # hit harder for being slow).
            next_at = max(next_at + interval, time.monotonic())
            i = int(rng.integers(len(self._images)))
            started = time.perf_counter()
            try:
                result = await client.infer(self.config.model, {"image": self._images[i : i + 1]})
            except InferenceError as e:
                # Errors carry no model_version on the wire: they are counted under "?" here and
                # attributed to their version by the server's own metrics.
                self._record(protocol, "?", time.perf_counter() - started, error=f"{e.code}: {e.message}")
                continue
            except (TimeoutError, OSError, aiohttp.ClientError) as e:
                # server gone or unreachable (e.g. while shutting down): count it, back off
                self._record(protocol, "?", time.perf_counter() - started,
                             error=f"connection: {type(e).__name__}: {e}")
                await asyncio.sleep(0.2)
                continue
            correct = int(np.asarray(result.outputs["label"]).reshape(-1)[0]) == int(self._labels[i])
            self._record(protocol, result.model_version, time.perf_counter() - started, correct=correct)

    def _record(self, protocol: str, version: str, latency: float, *, correct: bool = False,
                error: str | None = None) -> None:
        with self._lock:
            s = self._stats[(protocol, version)]
            s.requests += 1
            s.latency_s += latency
            if error is not None:
                s.errors += 1
                self._failures[error[:80]] += 1
            elif correct:
                s.correct += 1

