"""Dynamic batching: the batcher on its own with a fake model it owns, then through a real server.

Timing is never asserted tightly. The model is held busy with a gate (a ``threading.Event`` the
fake model waits on in its worker thread), so "the batcher is busy" is a state, not a race;
delays that must NOT pass are long (seconds), delays that must pass are short, and waits are
bounded generously so a slow machine cannot fail a test that is right.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from kloop.faults import Fault
from serving.app import Server, ServerConfig
from serving.client import AdminClient, GrpcClient, HttpClient, InferenceError
from serving.core.batching import (
    INLINE_AFTER_BATCHES,
    MAX_GATHER_S,
    SAMPLE_S,
    Batcher,
    BatchPolicy,
)
from serving.core.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded
from tests.support.serving import MODEL, TOKEN, reference

LONG = 10_000.0  # ms: a delay no test may wait out
BOUND = 5.0  # s: generous upper bound for anything that must happen "now"


class FakeModel:
    """Doubles its input and sums each row; records every batch; can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray[Any, Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_if_negative = False

    def __call__(self, inputs: tuple[np.ndarray[Any, Any], ...]) -> tuple[np.ndarray[Any, Any], ...]:
        (x,) = inputs
        self.batches.append(x.copy())
        self.entered.set()
        assert self.gate.wait(30), "test never opened the gate"
        if self.fail_if_negative and (x < 0).any():
            raise InferenceFailed("negative input")
        return x * 2, x.reshape(len(x), -1).sum(axis=1)

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
def model() -> Iterator[FakeModel]:
    m = FakeModel()
    yield m
    m.gate.set()  # never leave a worker thread blocked


def rows(*values: float, width: int = 3) -> tuple[np.ndarray[Any, Any]]:
    return (np.array([[v] * width for v in values], dtype=np.float32),)


def make(model: FakeModel, executor: concurrent.futures.Executor, **policy: Any) -> Batcher:
    concurrency = policy.pop("max_concurrency", 1)
    return Batcher(model, BatchPolicy(**policy), executor=executor, max_concurrency=concurrency)


async def hold_busy(batcher: Batcher, model: FakeModel) -> asyncio.Task[Any]:
    """Occupy one execution slot with a request held at the model's gate."""
    model.gate.clear()
    model.entered.clear()
    task = asyncio.create_task(batcher.submit(rows(100.0)))
    assert await asyncio.to_thread(model.entered.wait, BOUND)
    return task


async def settle() -> None:
    """Let the batcher's loop run everything it can run now (no timers)."""
    for _ in range(20):
        await asyncio.sleep(0)


# ---- policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
    ({"preferred_batch_sizes": (0,)}, "preferred_batch_sizes"),
    ({"max_batch_size": 8, "preferred_batch_sizes": (16,)}, "preferred_batch_sizes"),
    ({"preferred_batch_sizes": (4, 4)}, "repeat"),
    ({"max_batch_size": 64, "max_queue_size": 32}, "max_queue_size"),
])
def test_policy_rejects_bad_combinations(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchPolicy(**kwargs)


def test_policy_sorts_preferred_sizes_and_one_disables() -> None:
    assert BatchPolicy(preferred_batch_sizes=(16, 4, 8)).preferred_batch_sizes == (4, 8, 16)
    assert not BatchPolicy(max_batch_size=1).enabled
    assert BatchPolicy().enabled


# ---- the batcher on its own -----------------------------------------------------------------


async def test_lone_request_runs_at_once_without_the_delay(model, executor) -> None:
    batcher = make(model, executor, max_queue_delay_ms=LONG)
    out = await asyncio.wait_for(batcher.submit(rows(1.0)), BOUND)
    np.testing.assert_array_equal(out[0], rows(2.0)[0])
    assert model.sizes == [1]
    await batcher.close()


async def test_batches_never_exceed_max_size_and_each_request_gets_its_rows(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=4, max_queue_delay_ms=LONG)
    first = await hold_busy(batcher, model)
    waiting = [asyncio.create_task(batcher.submit(rows(float(i)))) for i in range(10)]
    await settle()
    assert model.sizes == [1]  # busy: everything queues
    model.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *waiting), BOUND)
    assert model.sizes == [1, 4, 4, 2]  # idle after each batch: the queue runs at once, 4 a time
    for i, (doubled, summed) in enumerate(results[1:]):
        np.testing.assert_array_equal(doubled, rows(2.0 * i)[0])
        np.testing.assert_array_equal(summed, [3.0 * i])
    await batcher.close()


async def test_a_full_batch_runs_without_waiting_for_the_delay(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=4, max_queue_delay_ms=LONG, max_concurrency=2)
    first = await hold_busy(batcher, model)
    model.entered.clear()
    full = [asyncio.create_task(batcher.submit(rows(float(i)))) for i in range(4)]
    # The first batch still holds one slot; four rows fill a batch, so it starts in the other.
    assert await asyncio.to_thread(model.entered.wait, BOUND)
    assert model.sizes == [1, 4]
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *full), BOUND)
    await batcher.close()


async def test_a_partial_batch_waits_for_the_delay_while_the_model_is_busy(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=8, max_queue_delay_ms=300, max_concurrency=2)
    first = await hold_busy(batcher, model)
    start = time.monotonic()
    pair = [asyncio.create_task(batcher.submit(rows(float(i)))) for i in range(2)]
    await settle()
    assert model.sizes == [1]  # a free slot, but the delay has not passed: keep collecting
    model.entered.clear()
    assert await asyncio.to_thread(model.entered.wait, BOUND)  # the delay passes: it runs
    assert time.monotonic() - start >= 0.2  # not before (the bound is loose on purpose)
    assert model.sizes == [1, 2]
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *pair), BOUND)
    await batcher.close()


async def test_a_preferred_size_is_cut_without_waiting(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=8, max_queue_delay_ms=LONG,
                   preferred_batch_sizes=(3,), max_concurrency=2)
    first = await hold_busy(batcher, model)
    waiting = [asyncio.create_task(batcher.submit(rows(float(i)))) for i in range(2)]
    await settle()
    assert model.sizes == [1]
    model.entered.clear()
    waiting.append(asyncio.create_task(batcher.submit(rows(2.0))))
    assert await asyncio.to_thread(model.entered.wait, BOUND)
    assert model.sizes == [1, 3]
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *waiting), BOUND)
    await batcher.close()


async def test_multi_row_requests_merge_and_split_back_and_a_big_one_runs_alone(
    model, executor
) -> None:
    batcher = make(model, executor, max_batch_size=6, max_queue_delay_ms=LONG)
    first = await hold_busy(batcher, model)
    shapes = [(1.0,), (2.0, 3.0, 4.0), (5.0, 6.0), (7.0,) * 9, (8.0,)]
    tasks = [asyncio.create_task(batcher.submit(rows(*s))) for s in shapes]
    await settle()
    model.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    await first
    # 1+3+2 fill 6; the 9-row request is bigger than a batch and runs alone; then the last.
    assert model.sizes == [1, 6, 9, 1]
    for s, (doubled, summed) in zip(shapes, results, strict=True):
        np.testing.assert_array_equal(doubled, rows(*(2 * v for v in s))[0])
        np.testing.assert_array_equal(summed, [3 * v for v in s])
    await batcher.close()


async def test_a_group_of_requests_counts_each_in_the_queue_times(model, executor) -> None:
    """A front end's group (``requests=``) is one item of several rows; the observer gets one
    queue time per client request, so the queue histogram counts requests either way."""
    seen: list[tuple[int, int]] = []

    class Observer:
        def batch_executed(self, rows: int, queue_seconds: Any, compute_seconds: float) -> None:
            seen.append((rows, len(queue_seconds)))

    batcher = Batcher(model, BatchPolicy(max_batch_size=8, max_queue_delay_ms=LONG),
                      executor=executor, observer=Observer())
    first = await hold_busy(batcher, model)
    group = asyncio.create_task(batcher.submit(rows(1.0, 2.0, 3.0), requests=3))
    single = asyncio.create_task(batcher.submit(rows(4.0)))
    await settle()
    model.gate.set()
    (doubled, _), _ = await asyncio.wait_for(asyncio.gather(group, single), BOUND)
    await first
    np.testing.assert_array_equal(doubled, rows(2.0, 4.0, 6.0)[0])
    assert seen == [(1, 1), (4, 4)]  # the held request, then the group of 3 with one more
    await batcher.close()


async def test_requests_of_other_trailing_shapes_do_not_merge(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=8, max_queue_delay_ms=LONG)
    first = await hold_busy(batcher, model)
    tasks = [asyncio.create_task(batcher.submit(rows(1.0, width=w))) for w in (3, 5, 3, 5)]
    await settle()
    model.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *tasks), BOUND)
    assert model.sizes == [1, 2, 2]  # the oldest's shape first, then the other (FIFO per shape)
    assert [r[0].shape[1] for r in results[1:]] == [3, 5, 3, 5]
    await batcher.close()


async def test_a_failing_batch_fails_each_request_and_the_next_batch_is_fine(model, executor) -> None:
    model.fail_if_negative = True
    batcher = make(model, executor, max_batch_size=3, max_queue_delay_ms=LONG)
    first = await hold_busy(batcher, model)
    doomed = [asyncio.create_task(batcher.submit(rows(v))) for v in (1.0, -1.0, 2.0)]
    fine = [asyncio.create_task(batcher.submit(rows(v))) for v in (3.0, 4.0)]
    await settle()
    model.gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), BOUND)
    assert all(isinstance(o, InferenceFailed) and "negative" in str(o) for o in outcomes)
    results = await asyncio.wait_for(asyncio.gather(first, *fine), BOUND)
    assert [float(r[1][0]) for r in results[1:]] == [9.0, 12.0]
    assert model.sizes == [1, 3, 2]
    await batcher.close()


async def test_past_max_queue_size_requests_are_refused_at_once(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=2, max_queue_size=4, max_queue_delay_ms=LONG)
    first = await hold_busy(batcher, model)
    queued = [asyncio.create_task(batcher.submit(rows(1.0, 2.0))) for _ in range(2)]
    await settle()
    assert batcher.queued_rows == 4
    with pytest.raises(Overloaded, match="max_queue_size"):
        await batcher.submit(rows(3.0))
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *queued), BOUND)
    assert batcher.queued_rows == 0
    assert (await asyncio.wait_for(batcher.submit(rows(3.0)), BOUND))[1][0] == 9.0
    await batcher.close()


async def test_expired_requests_never_reach_the_model(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=8, max_queue_delay_ms=LONG)
    with pytest.raises(DeadlineExceeded):  # already past: refused before queueing
        await batcher.submit(rows(-5.0), deadline=time.monotonic() - 1)
    first = await hold_busy(batcher, model)
    doomed = asyncio.create_task(batcher.submit(rows(-7.0), deadline=time.monotonic() + 0.05))
    kept = asyncio.create_task(batcher.submit(rows(1.0), deadline=time.monotonic() + 60))
    with pytest.raises(DeadlineExceeded):  # answered when it expires, the model still busy
        await asyncio.wait_for(doomed, BOUND)
    assert batcher.queued_rows == 1
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, kept), BOUND)
    seen = np.concatenate(model.batches)
    assert not (seen < 0).any()  # neither expired request was ever computed
    assert model.sizes == [1, 1]
    await batcher.close()


async def test_a_cancelled_caller_is_skipped(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=8, max_queue_delay_ms=LONG)
    first = await hold_busy(batcher, model)
    gone = asyncio.create_task(batcher.submit(rows(-1.0)))
    kept = asyncio.create_task(batcher.submit(rows(1.0)))
    await settle()
    gone.cancel()
    await settle()
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, kept), BOUND)
    assert model.sizes == [1, 1] and batcher.queued_rows == 0
    await batcher.close()


async def test_close_fails_queued_requests_and_refuses_new_ones(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=8, max_queue_delay_ms=LONG)
    first = await hold_busy(batcher, model)
    queued = asyncio.create_task(batcher.submit(rows(1.0)))
    await settle()
    closing = asyncio.create_task(batcher.close())
    with pytest.raises(ModelNotReady):
        await asyncio.wait_for(queued, BOUND)
    with pytest.raises(ModelNotReady):
        await batcher.submit(rows(2.0))
    model.gate.set()  # the executing batch still finishes
    await asyncio.wait_for(asyncio.gather(first, closing), BOUND)


async def test_close_with_drain_runs_the_queue_first(model, executor) -> None:
    batcher = make(model, executor, max_batch_size=8, max_queue_delay_ms=LONG)
    first = await hold_busy(batcher, model)
    queued = asyncio.create_task(batcher.submit(rows(1.0)))
    await settle()
    closing = asyncio.create_task(batcher.close(drain=True))
    await settle()
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, queued, closing), BOUND)
    assert model.sizes == [1, 1]


# ---- through a real server ------------------------------------------------------------------


@pytest.fixture
async def batching_server(registry_root: Path) -> AsyncIterator[Server]:
    srv = Server(ServerConfig(registry=registry_root, http_port=0, grpc_port=0, admin_token=TOKEN,
                              grace_seconds=2.0,
                              batching=BatchPolicy(max_batch_size=16, max_queue_delay_ms=5)))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def histogram(srv: Server, name: str) -> tuple[float, float]:
    """(sum, count) of ``name`` for the digits model's version 2, read from /metrics."""
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{srv.http_port}/metrics") as r:
        text = await r.text()
    labels = f'{{model="{MODEL}",version="2"}}'
    values = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"{name}_{part}{labels} "):
                values[part] = float(line.split()[1])
    return values.get("sum", 0.0), values.get("count", 0.0)


async def test_concurrent_clients_share_batches_and_each_gets_its_own_rows(
    batching_server: Server
) -> None:
    srv = batching_server
    http = HttpClient(f"http://127.0.0.1:{srv.http_port}")
    grpc_client = GrpcClient(f"127.0.0.1:{srv.grpc_port}")
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((1 + i % 3, 1, 8, 8), dtype=np.float32) for i in range(48)]

    async def one(i: int, images: np.ndarray[Any, Any]) -> None:
        client = http if i % 2 else grpc_client
        outputs = ("label",) if i % 5 == 0 else ()  # requested outputs may differ in a batch
        result = await client.infer(MODEL, {"image": images}, outputs=outputs)
        logits, label = reference(2, images)
        np.testing.assert_array_equal(result.outputs["label"], label)
        if outputs:
            assert set(result.outputs) == {"label"}
        else:
            np.testing.assert_allclose(result.outputs["logits"], logits, rtol=1e-5, atol=1e-5)

    try:
        for _ in range(3):  # a few waves: the first request of each runs alone, the rest queue
            await asyncio.wait_for(asyncio.gather(*(one(i, b) for i, b in enumerate(batches))), 60)
    finally:
        await http.close()
        await grpc_client.close()
    rows_total = 3 * sum(len(b) for b in batches)
    size_sum, executed = await histogram(srv, "kloop_inference_batch_size")
    assert size_sum == rows_total  # every row computed exactly once
    assert executed < 3 * len(batches)  # fewer forward passes than requests: batches > 1
    queue_sum, queued = await histogram(srv, "kloop_inference_queue_seconds")
    assert queued == 3 * len(batches)  # one queue time per request
    assert (await histogram(srv, "kloop_inference_compute_seconds"))[1] == executed


async def test_max_batch_size_one_runs_every_request_alone(registry_root: Path) -> None:
    srv = Server(ServerConfig(registry=registry_root, http_port=0, grpc_port=0,
                              batching=BatchPolicy(max_batch_size=1)))
    await srv.start()
    http = HttpClient(f"http://127.0.0.1:{srv.http_port}")
    try:
        images = np.zeros((2, 1, 8, 8), dtype=np.float32)
        await asyncio.gather(*(http.infer(MODEL, {"image": images}) for _ in range(16)))
        assert await histogram(srv, "kloop_inference_batch_size") == (32.0, 16.0)
    finally:
        await http.close()
        await srv.stop()


def admin_of(srv: Server) -> AdminClient:
    return AdminClient(f"http://127.0.0.1:{srv.http_port}", TOKEN)


async def test_http_timeout_header_and_timeout_parameter_answer_504_before_compute(
    batching_server: Server
) -> None:
    srv = batching_server
    admin = admin_of(srv)
    url = f"http://127.0.0.1:{srv.http_port}/v2/models/{MODEL}/infer"
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8],
                        "data": [0.0] * 64}]}
    await asyncio.to_thread(admin.set_fault, MODEL, 2, Fault(extra_latency_ms=300))  # every request waits 300 ms
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body, headers={"X-Request-Timeout-Ms": "50"}) as r:
            assert r.status == 504, await r.text()
        with_param = {**body, "parameters": {"timeout": 50_000}}  # microseconds, as in Triton
        async with s.post(url, json=with_param) as r:
            assert r.status == 504, await r.text()
        async with s.post(url, json=body, headers={"X-Request-Timeout-Ms": "soon"}) as r:
            assert r.status == 400
        async with s.post(url, json=body, headers={"X-Request-Timeout-Ms": "60000"}) as r:
            assert r.status == 200
    assert (await histogram(srv, "kloop_inference_batch_size"))[1] == 1  # only the last ran


async def test_grpc_deadline_is_honoured(batching_server: Server) -> None:
    srv = batching_server
    admin = admin_of(srv)
    await asyncio.to_thread(admin.set_fault, MODEL, 2, Fault(extra_latency_ms=300))
    client = GrpcClient(f"127.0.0.1:{srv.grpc_port}", timeout=0.05)
    try:
        with pytest.raises(InferenceError) as info:
            await client.infer(MODEL, {"image": np.zeros((1, 1, 8, 8), dtype=np.float32)})
        assert info.value.code == "DEADLINE_EXCEEDED"
    finally:
        await client.close()
    await asyncio.sleep(0.5)  # the server side wakes from the fault and drops it
    assert (await histogram(srv, "kloop_inference_batch_size"))[1] == 0
    assert srv.dataplane.inflight == 0


async def test_overloaded_http_answer_says_when_to_retry(registry_root: Path) -> None:
    srv = Server(ServerConfig(registry=registry_root, http_port=0, grpc_port=0, admin_token=TOKEN,
                              max_inflight=1, grace_seconds=2.0))
    await srv.start()
    url = f"http://127.0.0.1:{srv.http_port}"
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8],
                        "data": [0.0] * 64}]}
    try:
        await asyncio.to_thread(admin_of(srv).set_fault, MODEL, 2, Fault(extra_latency_ms=300))
        async with aiohttp.ClientSession() as s:
            slow = asyncio.create_task(s.post(f"{url}/v2/models/{MODEL}/infer", json=body))
            while srv.dataplane.inflight == 0:
                await asyncio.sleep(0.005)
            async with s.post(f"{url}/v2/models/{MODEL}/infer", json=body) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
            async with await slow as r:
                assert r.status == 200
    finally:
        await srv.stop()


async def test_a_cancelled_caller_does_not_free_the_slot_while_its_call_still_runs(
        model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor) -> None:
    """A client that goes away mid-compute (gRPC cancels the handler) must not let a second
    model call start while the first still runs in its thread (max_concurrency=1)."""
    running, most = 0, 0
    lock = threading.Lock()

    def counting(inputs: tuple[np.ndarray[Any, Any], ...]) -> tuple[np.ndarray[Any, Any], ...]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return model(inputs)
        finally:
            with lock:
                running -= 1

    b = Batcher(counting, BatchPolicy(max_batch_size=4, max_queue_delay_ms=1), executor=executor,
                max_concurrency=1)
    model.gate.clear()
    first = asyncio.create_task(b.submit(rows(1)))
    assert await asyncio.to_thread(model.entered.wait, BOUND)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    model.entered.clear()
    later = [asyncio.create_task(b.submit(rows(v))) for v in (2, 3)]
    await asyncio.sleep(0.2)  # room for a wrongly started second call to enter the model
    assert most == 1
    model.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*later), BOUND)
    assert [float(r[1][0]) for r in results] == [6.0, 9.0]
    assert most == 1
    await b.close()


# ---- inline mode and company (a fake clock decides; the event loop's own timers never do) ----


class Clock:
    """An injected ``Batcher`` clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ThreadRecordingModel(FakeModel):
    """FakeModel that also records which thread ran each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, inputs: tuple[np.ndarray[Any, Any], ...]) -> tuple[np.ndarray[Any, Any], ...]:
        self.threads.append(threading.get_ident())
        return super().__call__(inputs)


def inline_batcher(fn: Any, executor: concurrent.futures.Executor, clock: Clock,
                   inline_below_s: float = 1.0, **policy: Any) -> Batcher:
    policy.setdefault("max_queue_delay_ms", LONG)
    return Batcher(fn, BatchPolicy(**policy), executor=executor, clock=clock,
                   inline_below_s=inline_below_s)


async def measure(batcher: Batcher, count: int = INLINE_AFTER_BATCHES) -> None:
    """``count`` batches one after the other (each alone, in a worker thread)."""
    for i in range(count):
        await asyncio.wait_for(batcher.submit(rows(float(i))), BOUND)


def recheck(batcher: Batcher) -> None:
    """What the batching loop's timer does when it fires: wake the loop to decide again."""
    assert batcher._wake is not None
    batcher._wake.set()


async def test_a_fast_model_goes_inline_and_merges_requests_of_one_loop_iteration(
    executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model = ThreadRecordingModel()
    batcher = inline_batcher(model, executor, Clock(), max_batch_size=2)
    await measure(batcher, INLINE_AFTER_BATCHES - 1)
    assert not batcher.inline  # not measured enough yet
    await measure(batcher, 1)
    assert batcher.inline
    loop_thread = threading.get_ident()
    assert loop_thread not in model.threads  # the measured batches ran in workers
    calls = len(model.batches)
    shapes = [(1.0,), (2.0,), (3.0,), (4.0,), (5.0,)]
    tasks = [asyncio.create_task(batcher.submit(rows(*s))) for s in shapes]
    results = await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    assert model.sizes[calls:] == [2, 2, 1]  # merged, at most max_batch_size rows a pass
    assert model.threads[calls:] == [loop_thread] * 3  # on the event loop
    for s, (doubled, summed) in zip(shapes, results, strict=True):
        np.testing.assert_array_equal(doubled, rows(*(2 * v for v in s))[0])
        np.testing.assert_array_equal(summed, [3 * v for v in s])
    await batcher.close()


async def test_inline_multi_row_requests_share_one_forward_pass(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    batcher = inline_batcher(model, executor, Clock(), max_batch_size=8)
    await measure(batcher)
    calls = len(model.batches)
    shapes = [(1.0, 2.0), (3.0,), (4.0, 5.0, 6.0)]
    tasks = [asyncio.create_task(batcher.submit(rows(*s))) for s in shapes]
    results = await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    assert model.sizes[calls:] == [6]
    for s, (doubled, summed) in zip(shapes, results, strict=True):
        np.testing.assert_array_equal(doubled, rows(*(2 * v for v in s))[0])
        np.testing.assert_array_equal(summed, [3 * v for v in s])
    await batcher.close()


async def test_an_inline_batch_that_fails_fails_each_request_and_the_next_is_fine(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model.fail_if_negative = True
    batcher = inline_batcher(model, executor, Clock())
    await measure(batcher)
    calls = len(model.batches)
    doomed = [asyncio.create_task(batcher.submit(rows(v))) for v in (1.0, -1.0, 2.0)]
    outcomes = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), BOUND)
    assert all(isinstance(o, InferenceFailed) and "negative" in str(o) for o in outcomes)
    assert model.sizes[calls:] == [3]
    assert batcher.inline and batcher.queued_rows == 0
    fine = [asyncio.create_task(batcher.submit(rows(v))) for v in (3.0, 4.0)]
    results = await asyncio.wait_for(asyncio.gather(*fine), BOUND)
    assert [float(r[1][0]) for r in results] == [9.0, 12.0]
    assert model.sizes[calls:] == [3, 2]
    await batcher.close()


async def test_an_inline_request_whose_deadline_passed_in_the_queue_is_not_computed(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    clock = Clock()

    def takes_a_second(inputs: tuple[np.ndarray[Any, Any], ...]) -> tuple[np.ndarray[Any, Any], ...]:
        clock.advance(1.0)  # on the batcher's clock, every forward pass takes a second
        return model(inputs)

    batcher = inline_batcher(takes_a_second, executor, clock)
    await measure(batcher)
    assert batcher.inline
    calls = len(model.batches)
    # Two shapes: two forward passes in one inline run, the second after the first's second.
    first = asyncio.create_task(batcher.submit(rows(1.0, width=3)))
    doomed = asyncio.create_task(batcher.submit(rows(-1.0, width=5), deadline=clock() + 0.5))
    kept = asyncio.create_task(batcher.submit(rows(2.0, width=5), deadline=clock() + 60))
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(doomed, BOUND)
    await asyncio.wait_for(asyncio.gather(first, kept), BOUND)
    assert model.sizes[calls:] == [1, 1]
    assert not (np.concatenate(model.batches[calls:], axis=None) < 0).any()
    assert batcher.queued_rows == 0
    await batcher.close()


async def test_on_a_busy_loop_an_inline_batch_waits_for_its_company_until_all_are_there(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    # The loop thread's CPU time advances with the clock: it is 100 % busy.
    monkeypatch.setattr(time, "thread_time", clock)
    batcher = inline_batcher(model, executor, clock, max_batch_size=8)
    await measure(batcher)
    calls = len(model.batches)
    together = [asyncio.create_task(batcher.submit(rows(v))) for v in (1.0, 2.0, 3.0)]
    await asyncio.wait_for(asyncio.gather(*together), BOUND)  # no company yet: no window
    assert model.sizes[calls:] == [3]
    clock.advance(SAMPLE_S)  # a new period: busy, and three came together
    back = [asyncio.create_task(batcher.submit(rows(4.0)))]
    await settle()
    assert model.sizes[calls:] == [3]  # waits (up to max_queue_delay_ms, LONG here)
    back.append(asyncio.create_task(batcher.submit(rows(5.0))))
    await settle()
    assert model.sizes[calls:] == [3]
    back.append(asyncio.create_task(batcher.submit(rows(6.0))))
    results = await asyncio.wait_for(asyncio.gather(*back), BOUND)  # all three: runs now
    assert model.sizes[calls:] == [3, 3]
    assert [float(r[1][0]) for r in results] == [12.0, 15.0, 18.0]
    await batcher.close()


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[tuple[int, list[float], float]] = []

    def batch_executed(self, rows: int, queue_seconds: Any, compute_seconds: float) -> None:
        self.batches.append((rows, list(queue_seconds), compute_seconds))


async def test_run_now_runs_an_idle_fast_models_request_on_the_calling_thread(
    executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    """``run_now`` is ``submit`` without the future, for when submit would run the request
    alone and at once: the same rows back, counted the same, on this thread."""
    model = ThreadRecordingModel()
    observer = RecordingObserver()
    batcher = Batcher(model, BatchPolicy(max_batch_size=4, max_queue_delay_ms=LONG),
                      executor=executor, clock=Clock(), inline_below_s=1.0, observer=observer)
    assert batcher.run_now(rows(1.0)) is None  # not measured yet: submit decides
    assert model.sizes == []
    await measure(batcher)
    calls, seen = len(model.batches), len(observer.batches)
    out = batcher.run_now(rows(1.0, 2.0, 3.0), requests=2)
    assert out is not None
    np.testing.assert_array_equal(out[0], rows(2.0, 4.0, 6.0)[0])
    np.testing.assert_array_equal(out[1], [3.0, 6.0, 9.0])
    assert model.sizes[calls:] == [3]
    assert model.threads[-1] == threading.get_ident()
    ((batch_rows, queue_seconds, _),) = observer.batches[seen:]
    assert batch_rows == 3 and queue_seconds == [0.0, 0.0]  # one queue time per request
    assert batcher.queued_rows == 0
    await batcher.close()


async def test_run_now_steps_aside_whenever_submit_would_not_run_at_once(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Too many rows, something queued (FIFO: nothing overtakes it), a wait for company, a
    closed batcher: run_now does nothing and returns None."""
    clock = Clock()
    batcher = inline_batcher(model, executor, clock, max_batch_size=4)
    await measure(batcher)
    calls = len(model.batches)
    assert batcher.run_now(rows(1.0, 2.0, 3.0, 4.0, 5.0)) is None  # over max_batch_size
    queued = asyncio.create_task(batcher.submit(rows(1.0)))
    await asyncio.sleep(0)  # queued; its inline run is scheduled, not yet run
    assert batcher.queued_rows == 1
    assert batcher.run_now(rows(2.0)) is None
    await asyncio.wait_for(queued, BOUND)
    assert model.sizes[calls:] == [1]
    # A busy loop whose requests came together: submit would wait for the company.
    monkeypatch.setattr(time, "thread_time", clock)
    clock.advance(SAMPLE_S)
    assert batcher.run_now(rows(3.0), requests=3) is not None  # this period: none together yet
    clock.advance(SAMPLE_S)  # the period closes: three came together, the loop was busy
    assert batcher.run_now(rows(4.0)) is None
    assert model.sizes[calls:] == [1, 1]
    await batcher.close()
    assert batcher.run_now(rows(5.0)) is None


async def test_run_now_raises_the_forward_passs_error_and_the_next_request_is_fine(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model.fail_if_negative = True
    batcher = inline_batcher(model, executor, Clock())
    await measure(batcher)
    with pytest.raises(InferenceFailed, match="negative"):
        batcher.run_now(rows(-1.0))
    out = batcher.run_now(rows(2.0))
    assert out is not None and float(out[1][0]) == 6.0
    await batcher.close()


async def test_without_an_inline_threshold_batches_always_run_in_threads(
    executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model = ThreadRecordingModel()
    batcher = inline_batcher(model, executor, Clock(), inline_below_s=0.0)
    await measure(batcher, 2 * INLINE_AFTER_BATCHES)
    assert not batcher.inline
    together = [asyncio.create_task(batcher.submit(rows(float(i)))) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*together), BOUND)
    assert threading.get_ident() not in model.threads
    await batcher.close()


async def test_a_model_slower_than_the_threshold_stays_in_threads(
    executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model = ThreadRecordingModel()

    def slow(inputs: tuple[np.ndarray[Any, Any], ...]) -> tuple[np.ndarray[Any, Any], ...]:
        time.sleep(0.005)  # compute is measured with time.perf_counter, not the batcher's clock
        return model(inputs)

    batcher = inline_batcher(slow, executor, Clock(), inline_below_s=0.001)
    await measure(batcher, INLINE_AFTER_BATCHES + 2)
    assert not batcher.inline
    assert threading.get_ident() not in model.threads
    await batcher.close()


async def together_then_idle(batcher: Batcher, model: FakeModel, clock: Clock, n: int) -> None:
    """``n`` requests inside the batcher at once (one executing, n - 1 queued), all answered,
    then a new sample period: the batcher's company is now ``n``."""
    first = await hold_busy(batcher, model)
    queued = [asyncio.create_task(batcher.submit(rows(float(i)))) for i in range(n - 1)]
    await settle()
    assert batcher.queued_rows == n - 1
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *queued), BOUND)
    assert model.sizes[-2:] == [1, n - 1]  # the clock did not move: no company yet, no wait
    clock.advance(SAMPLE_S)


async def test_an_idle_model_waits_until_its_recent_company_is_back(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    clock = Clock()
    batcher = Batcher(model, BatchPolicy(max_batch_size=8, max_queue_delay_ms=LONG),
                      executor=executor, clock=clock)
    await together_then_idle(batcher, model, clock, 4)
    calls = len(model.batches)
    back = [asyncio.create_task(batcher.submit(rows(10.0)))]
    await settle()
    assert len(model.batches) == calls and batcher.queued_rows == 1  # idle, yet it waits
    back += [asyncio.create_task(batcher.submit(rows(v))) for v in (11.0, 12.0)]
    await settle()
    recheck(batcher)
    await settle()
    assert len(model.batches) == calls  # three of the four
    back.append(asyncio.create_task(batcher.submit(rows(13.0))))
    results = await asyncio.wait_for(asyncio.gather(*back), BOUND)
    assert model.sizes[calls:] == [4]  # everyone back: one forward pass
    assert [float(r[1][0]) for r in results] == [30.0, 33.0, 36.0, 39.0]
    await batcher.close()


async def test_company_counts_the_members_of_groups(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    """Four clients that came together as one request and one group of three (a front end's
    fast lane) are a company of four: the idle model waits until four requests are back,
    however they are grouped, and does not run the first group of two alone."""
    clock = Clock()
    batcher = Batcher(model, BatchPolicy(max_batch_size=8, max_queue_delay_ms=LONG),
                      executor=executor, clock=clock)
    first = await hold_busy(batcher, model)
    group = asyncio.create_task(batcher.submit(rows(1.0, 2.0, 3.0), requests=3))
    await settle()
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, group), BOUND)
    clock.advance(SAMPLE_S)
    calls = len(model.batches)
    back = [asyncio.create_task(batcher.submit(rows(10.0, 11.0), requests=2)),
            asyncio.create_task(batcher.submit(rows(12.0)))]
    await settle()
    recheck(batcher)
    await settle()
    # Two items, as many as came together, but three of the four requests: it waits.
    assert len(model.batches) == calls and batcher.queued_rows == 3
    back.append(asyncio.create_task(batcher.submit(rows(13.0))))
    await asyncio.wait_for(asyncio.gather(*back), BOUND)
    assert model.sizes[calls:] == [4]  # everyone back: one forward pass
    await batcher.close()


async def test_an_idle_model_waits_for_company_no_longer_than_the_gather_time(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    clock = Clock()
    batcher = Batcher(model, BatchPolicy(max_batch_size=8, max_queue_delay_ms=LONG),
                      executor=executor, clock=clock)
    await together_then_idle(batcher, model, clock, 3)
    # However long max_queue_delay_ms, waiting for a guessed company is capped.
    assert batcher._gather_s() == MAX_GATHER_S
    calls = len(model.batches)
    lone = asyncio.create_task(batcher.submit(rows(1.0)))
    await settle()
    clock.advance(MAX_GATHER_S / 2)
    recheck(batcher)
    await settle()
    assert len(model.batches) == calls and not lone.done()
    clock.advance(MAX_GATHER_S / 2 + 0.001)  # past the gather time (by more than rounding)
    recheck(batcher)
    assert float((await asyncio.wait_for(lone, BOUND))[1][0]) == 3.0
    assert model.sizes[calls:] == [1]
    # A period of lone traffic later the company is gone: the next request runs at once,
    # without the batching loop (in the caller's task, nothing queued).
    clock.advance(SAMPLE_S)
    model.gate.clear()
    model.entered.clear()
    alone = asyncio.create_task(batcher.submit(rows(2.0)))
    assert await asyncio.to_thread(model.entered.wait, BOUND)
    assert batcher.queued_rows == 0 and batcher.executing == 1
    model.gate.set()
    assert float((await asyncio.wait_for(alone, BOUND))[1][0]) == 6.0
    await batcher.close()


async def test_a_lone_client_never_waits_for_company(
    model: FakeModel, executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    clock = Clock()
    batcher = Batcher(model, BatchPolicy(max_batch_size=8, max_queue_delay_ms=LONG),
                      executor=executor, clock=clock)
    for i in range(6):  # one request at a time, across sample periods
        model.gate.clear()
        model.entered.clear()
        task = asyncio.create_task(batcher.submit(rows(float(i))))
        # It reaches the model without any timer or clock having moved: it did not wait.
        assert await asyncio.to_thread(model.entered.wait, BOUND)
        assert batcher.queued_rows == 0
        model.gate.set()
        await asyncio.wait_for(task, BOUND)
        clock.advance(SAMPLE_S)
    assert model.sizes == [1] * 6
    await batcher.close()
