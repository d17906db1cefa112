"""Built-in live traffic: a bounded, rate-limited client that sends a task's real held-out
inputs to the server over gRPC and HTTP and judges every answer with the task's own primary
metric: per version that answered, requests, errors, and the metric's live value.

Why it exists: a canary is judged on live metrics, so the main job needs live traffic while it
rolls out; and the per-version live value of the primary metric (the digits' accuracy, a
regression's RMSE) shows what the evaluation gate predicted. Load tests proper (locust) live in
``loadtests/``; this is the small always-available generator.

How an answer is judged: the task's ``Metric.per_example(served outputs, target)`` on the
answer (its outputs as tensors, a batch of one) and the item's target, summed per version and
divided by the number judged, then ``finalize`` (a root for RMSE): exactly how training
measures the held-out split, so a live value compares with the published one.

It runs its own event loop in a background thread so that synchronous code (the pipeline, the
controller's ticks) can go on beside it. Every loop is bounded by ``stop()`` and by an optional
``duration_s``; the rate and the number of workers are capped, and it talks only to the server
it was given, which must be on loopback unless ``allow_remote`` says otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from serving.client import GrpcClient, HttpClient, InferenceError
from trainer.data import length, positional
from trainer.task import Metric
from trainer.task_check import load

MAX_RATE_PER_S = 1000.0  # the generator shares the machine with the server and training
MAX_CONCURRENCY = 64
MAX_ITEMS = 2048  # held-out items kept in memory to send; a larger split is sampled


@dataclasses.dataclass
class LiveStats:
    """Counts of one version's (or one protocol and version's) answers so far."""

    requests: int = 0
    errors: int = 0
    total: float = 0.0  # sum of the metric's per-example values over the judged answers
    judged: int = 0  # answers the metric was computed on
    latency_s: float = 0.0
    metric: Metric | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def value(self) -> float | None:
        """The live value of the metric (its mean, finalized), None before any answer."""
        if self.metric is None or not self.judged:
            return None
        return self.metric.value(self.total, self.judged)

    def add(self, other: LiveStats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.total += other.total
        self.judged += other.judged
        self.latency_s += other.latency_s


def _correct_label(served: Mapping[str, torch.Tensor], target: Any) -> torch.Tensor:
    return (served["label"].reshape(-1) == torch.as_tensor(target).reshape(-1)).float()


ACCURACY = Metric("accuracy", "higher", _correct_label)  # of a ``label`` output


@dataclasses.dataclass(frozen=True, eq=False)
class LiveData:
    """What the traffic sends, and how it judges the answers.

    items: per held-out item, the request's inputs by name (each a batch of one) and the
      item's target collated to a batch of one.
    metric: the task's primary metric (``per_example`` on the served outputs and the target).
    """

    items: tuple[tuple[dict[str, np.ndarray], Any], ...]
    metric: Metric

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("live traffic needs at least one held-out item")

    @classmethod
    def from_dataset(cls, held_out: Dataset[Any], input_names: Sequence[str], metric: Metric,
                     *, max_items: int = MAX_ITEMS, seed: int = 0) -> LiveData:
        """Items of a task's held-out split (at most ``max_items``, a seeded sample of a larger
        one), its inputs in ``input_names``' order."""
        n = length(held_out, "held_out")
        picked = range(n) if n <= max_items else sorted(
            np.random.default_rng(seed).choice(n, size=max_items, replace=False).tolist())
        items = []
        for i in picked:
            inputs, target = default_collate([held_out[i]])
            args = positional(inputs, input_names)
            items.append(({name: _to_numpy(name, t) for name, t in zip(input_names, args, strict=True)},
                          target))
        return cls(tuple(items), metric)

    @classmethod
    def for_task(cls, ref: str, config: Mapping[str, Any], *, max_items: int = MAX_ITEMS) -> LiveData:
        """The held-out items of task ``ref`` with ``config``, judged by its primary metric
        (the task must be importable: a registered name, or on ``sys.path``)."""
        rt = load(ref, config)
        task = rt.instance()
        names = list(task.example_input())
        [metric] = [m for m in rt.metrics if m.name == rt.primary_metric]
        return cls.from_dataset(task.datasets().held_out, names, metric, max_items=max_items)

    @classmethod
    def labelled(cls, images: np.ndarray, labels: np.ndarray | Sequence[int],
                 input_name: str = "image") -> LiveData:
        """The digits' case: one input per item and a class label, judged by the accuracy of
        the ``label`` output."""
        if len(images) == 0 or len(images) != len(labels):
            raise ValueError("need as many labels as images, and at least one")
        arr = np.ascontiguousarray(images)
        targets = torch.as_tensor(np.asarray(labels))
        return cls(tuple(({input_name: arr[i:i + 1]}, targets[i:i + 1]) for i in range(len(arr))),
                   ACCURACY)


def _to_numpy(name: str, t: Any) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the clients could not name it
        raise ValueError(f"input {name!r} is bfloat16, which the built-in traffic cannot send")
    return np.ascontiguousarray(t.detach().cpu().numpy())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host(address: str) -> str:
    parsed = urllib.parse.urlsplit(address if "//" in address else f"//{address}")
    return parsed.hostname or ""


@dataclasses.dataclass(frozen=True)
class TrafficConfig:
    model: str
    http_url: str  # e.g. http://127.0.0.1:8080
    grpc_target: str  # e.g. 127.0.0.1:8081
    rate_per_s: float = 60.0  # total request rate; modest, the server shares 2 cores with training
    concurrency: int = 4  # workers; half speak gRPC, half HTTP
    duration_s: float | None = None  # None: until stop()
    allow_remote: bool = False  # a server off loopback; live traffic is for a local canary

    def __post_init__(self) -> None:
        if not 0 < self.rate_per_s <= MAX_RATE_PER_S or not 2 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"rate_per_s must be in (0, {MAX_RATE_PER_S:.0f}] and concurrency in "
                             f"[2, {MAX_CONCURRENCY}] (one gRPC, one HTTP worker at least)")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0 or None, got {self.duration_s}")
        if not self.allow_remote:
            for what, address in (("http_url", self.http_url), ("grpc_target", self.grpc_target)):
                if not _is_loopback(_host(address)):
                    raise ValueError(f"{what} {address!r} is not on loopback; live traffic goes to a "
                                     "local server unless allow_remote=True")


class TrafficGenerator:
    """Sends ``data``'s items in a random order and judges each answer by ``data.metric``."""

    def __init__(self, config: TrafficConfig, data: LiveData):
        self.config = config
        self.data = data
        self.metric = data.metric
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], LiveStats] = collections.defaultdict(
            lambda: LiveStats(metric=self.metric))
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
        """version -> counts over both protocols; ``.value`` is the live metric."""
        out: dict[str, LiveStats] = {}
        for (_, version), s in self.stats().items():
            out.setdefault(version, LiveStats(metric=self.metric)).add(s)
        return out

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
            inputs, target = self.data.items[int(rng.integers(len(self.data.items)))]
            started = time.perf_counter()
            try:
                result = await client.infer(self.config.model, inputs)
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
            latency = time.perf_counter() - started
            self._record(protocol, result.model_version, latency, value=self._judge(result.outputs, target))

    def _judge(self, outputs: Mapping[str, np.ndarray], target: Any) -> float | None:
        """The metric's per-example value of one answer; None (counted as a failure, not as
        a wrong answer) when the metric cannot be computed on it."""
        try:
            # a copy: the decoded answer may be a read-only view of the response's bytes
            served = {k: torch.from_numpy(np.array(v)) for k, v in outputs.items()}
            with torch.no_grad():
                return float(self.metric.per_example(served, target).double().sum())
        except Exception as e:  # noqa: BLE001 - a task's metric may raise anything; count it
            with self._lock:
                self._failures[f"metric {self.metric.name}: {type(e).__name__}: {e}"[:80]] += 1
            return None

    def _record(self, protocol: str, version: str, latency: float, *, value: float | None = None,
                error: str | None = None) -> None:
        with self._lock:
            s = self._stats[(protocol, version)]
            s.requests += 1
            s.latency_s += latency
            if error is not None:
                s.errors += 1
                self._failures[error[:80]] += 1
            elif value is not None:
                s.total += value
                s.judged += 1

