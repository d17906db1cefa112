"""Dynamic batching: merge concurrent requests to one model version into one forward pass.

A forward pass over 32 rows costs little more than one over a single row (the per-call
overhead of Python, torch dispatch and thread hand-off dominates small models), so under
concurrent load the server runs many requests' rows at once and splits the answer back.

One ``Batcher`` per loaded (model, version). Each request's inputs are arrays whose dim 0 is
the batch dimension; a request of ``n`` rows takes ``n`` rows of a batch. Shapes:

* a batch holds at most ``max_batch_size`` rows, unless one request alone is bigger: it runs
  alone, never split;
* only requests with equal trailing shapes and dtypes merge (``key``): a model whose second
  dimension is ``-1`` still batches, per shape;
* FIFO: a batch is the oldest request plus the following ones of its key that fit; a request
  that does not fit waits for the next batch, nothing overtakes it.

When a batch runs (the delay adapts to the load):

* nothing executing (the model is idle): run what is queued now. A lone client never pays a
  delay, and under load the queue fills while the previous batch runs, so batches grow with
  load by themselves. Except right after requests came together: while the most requests
  inside the batcher at once over the last SAMPLE_S (its "company") is 2 or more, an idle
  model waits until that many are queued, at most ``_gather_s()`` (never past MAX_GATHER_S),
  so closed-loop clients coming back one by one share one forward pass instead of two;
* otherwise run when the rows reach ``max_batch_size``, or a prefix of the queue is exactly a
  preferred size (the largest such), or the oldest request has waited ``max_queue_delay_ms``.

Every request has its own future; the batch's outputs are split back along dim 0 by row
counts. A failing batch fails each of its requests with the same error, and the next batch
starts clean. Past ``max_queue_size`` waiting rows, ``submit`` raises ``Overloaded`` at once
instead of queueing latency. A request past its deadline is answered ``DeadlineExceeded`` when
it expires and is never computed; a request whose caller gave up (cancelled) is skipped.

Concatenation, the model call and the split run in a worker thread (``executor``): only list
bookkeeping happens on the event loop. A request that finds the model idle runs in its own
task; the loop task that forms batches starts with the first request that has to queue.

Inline mode (``inline_below_s`` > 0): once INLINE_AFTER_BATCHES batches were measured and their
average compute is below ``inline_below_s``, batches run on the event loop itself, since for a
tiny model the hand-off to a thread and back costs more than the forward pass. Requests then
queue and one callback runs everything queued, in batches of at most ``max_batch_size``: soon
after the first request, or, while the loop thread is busy and requests recently came
together, after up to ``max_queue_delay_ms`` (see ``Batcher._inline_window``). The averages
keep being measured: a model that gets slower goes back to threads. A front end that already
merged the requests that arrived together (the gRPC fast lane) may call ``run_now`` instead of
``submit``: when submit would run the request alone and at once anyway, it runs right there,
without the future, the task and the callback.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import numpy as np

from serving.core.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded

log = logging.getLogger(__name__)

Arrays = tuple[np.ndarray[Any, Any], ...]
# Batches measured (in threads) before a model may switch to running on the event loop.
INLINE_AFTER_BATCHES = 8
# Inline batches wait for company while the loop thread is busier than this (see
# Batcher._inline_window), sampled every SAMPLE_S seconds (as is the recent company).
INLINE_BUSY_FRACTION = 0.85
SAMPLE_S = 0.05
# The longest an idle model waits for requests that recently came together (seconds).
MAX_GATHER_S = 0.05
# The model on a whole batch: one array per input (dim 0 = rows) -> one per output, same rows.
BatchFn = Callable[[Arrays], Arrays]
Clock = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """How requests to one model version are merged; validated at construction. The server's
    (``serving.app.ServerConfig.batching``) applies to every version whose manifest has a batch
    dimension (-1 first in every input and output); the CLI builds it from its flags."""

    # Rows per forward pass; a tiny model gains up to ~30x under load. 1 disables batching:
    # every request runs alone, as it arrives.
    max_batch_size: int = 32
    # Longest a request waits for company while the model is busy, milliseconds. Small: under
    # load the queue fills during the running batch anyway; this only rounds up stragglers. An
    # idle model runs a lone request at once, so this never taxes a single client.
    max_queue_delay_ms: float = 2.0
    # Batch sizes (rows) the model runs best at (e.g. those compiled or captured); a queue
    # prefix of exactly such a size runs without waiting for the delay. With CUDA graphs or
    # torch.compile (serving.core.runtime) they are also the sizes every batch is padded to.
    preferred_batch_sizes: tuple[int, ...] = ()
    # Rows waiting (not yet executing) before new requests are refused with Overloaded (503 /
    # RESOURCE_EXHAUSTED): bounded latency (~16 full batches) instead of an unbounded queue. An
    # empty queue admits any request.
    max_queue_size: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.max_queue_delay_ms <= 60_000:
            raise ValueError(
                f"max_queue_delay_ms must be in [0, 60000], got {self.max_queue_delay_ms}"
            )
        sizes = tuple(self.preferred_batch_sizes)
        if any(not 1 <= s <= self.max_batch_size for s in sizes):
            raise ValueError(
                f"preferred_batch_sizes {list(sizes)} must each be in 1..max_batch_size "
                f"({self.max_batch_size})"
            )
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"preferred_batch_sizes {list(sizes)} repeat a size")
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(sizes)))
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) must be >= max_batch_size "
                f"({self.max_batch_size}), or no full batch could ever queue"
            )

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


class BatchObserver(Protocol):
    """Told about every executed batch (the metrics)."""

    def batch_executed(
        self, rows: int, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None: ...


@dataclasses.dataclass(eq=False)
class _Item:
    arrays: Arrays
    rows: int
    key: Hashable
    future: asyncio.Future[Arrays]
    enqueued: float
    deadline: float | None
    requests: int = 1  # clients' requests it stands for (a front end's group: several)
    queued: bool = True
    timer: asyncio.TimerHandle | None = None


def batch_key(arrays: Arrays) -> Hashable:
    """Requests merge only when every input agrees on dtype and on all dims after the first;
    BYTES inputs (object arrays) also on their longest element, since the model sees them padded
    to it: a batch neighbour must never change what the model sees for a request."""
    return tuple((a.dtype.str, a.shape[1:],
                  max((len(x) for x in a.reshape(-1)), default=0) if a.dtype == object else None)
                 for a in arrays)


def rows_of(arrays: Arrays) -> int | None:
    """The request's batch size: dim 0 shared by every input, or None when they disagree."""
    if not arrays or any(a.ndim == 0 for a in arrays):
        return None
    rows = {a.shape[0] for a in arrays}
    return rows.pop() if len(rows) == 1 else None


class Batcher:
    """Batches ``submit``-ted requests onto ``fn``; see the module docstring.

    ``max_concurrency``: batches of this model executing at once (in ``executor``'s threads).
    ``clock``: seconds, the same clock as deadlines passed to ``submit`` (monotonic).
    """

    def __init__(
        self,
        fn: BatchFn,
        policy: BatchPolicy,
        *,
        executor: concurrent.futures.Executor,
        max_concurrency: int = 1,
        observer: BatchObserver | None = None,
        clock: Clock = time.monotonic,
        name: str = "batcher",
        inline_below_s: float = 0.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.policy = policy
        self.name = name
        self._fn = fn
        self._executor = executor
        self._max_concurrency = max_concurrency
        self._observer = observer
        self._clock = clock
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._queued_requests = 0  # clients' requests queued (a group counts each member)
        self._executing = 0
        self._closed = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        # Inline mode (see the module docstring): on while the model's recent batches took less
        # than ``inline_below_s`` (an exponential average); 0 keeps every batch in a thread.
        self._inline_below = inline_below_s
        self._compute_avg: float | None = None
        self._measured = 0
        self._inline_scheduled = False
        self._inline_timer: asyncio.TimerHandle | None = None
        self._util = 0.0  # the loop thread's busy fraction, sampled (see _inline_window)
        self._util_wall = 0.0
        self._util_cpu = 0.0
        self._running_requests = 0  # clients' requests in batches executing (thread mode)
        self._last_submit = 0.0
        # The most requests inside this batcher at once (queued or executing) in the last
        # sample period: how many clients recently came together. Counted in clients'
        # requests, so a front end's group (``submit(requests=)``) counts each member.
        self._company = 0
        self._period_peak = 0  # ... and so far in this one

    @property
    def inline(self) -> bool:
        """Whether batches now run on the event loop (a fast model, measured)."""
        return (self._inline_below > 0 and self._measured >= INLINE_AFTER_BATCHES
                and self._compute_avg is not None and self._compute_avg < self._inline_below)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def executing(self) -> int:
        return self._executing

    async def submit(self, arrays: Arrays, *, deadline: float | None = None,
                     requests: int = 1) -> Arrays:
        """Queue one request (``arrays``: one per input, dim 0 = its rows) and await its own
        rows of the batch's outputs. Raises ``Overloaded``, ``DeadlineExceeded``,
        ``ModelNotReady`` (closed), or the batch's error.

        ``requests``: how many clients' requests these rows are (a group a front end merged);
        the observer's queue times count each."""
        rows = rows_of(arrays)
        if rows is None:
            raise ValueError("every input of a batched request needs the same dim 0")
        if self._closed:
            raise ModelNotReady(f"{self.name}: no longer accepting requests")
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"{self.name}: the request's deadline passed before it queued")
        if self._queued_rows and self._queued_rows + rows > self.policy.max_queue_size:
            raise Overloaded(
                f"{self.name}: {self._queued_rows} rows already queued (max_queue_size "
                f"{self.policy.max_queue_size}); try again later"
            )
        loop = asyncio.get_running_loop()
        item = _Item(arrays, rows, batch_key(arrays), loop.create_future(), now, deadline,
                     requests)
        self._sample(now)
        if self.inline:
            self._enqueue(loop, item)
            waiting = self._queued_requests
            if not self._inline_scheduled:
                self._inline_scheduled = True
                window = self._inline_window(now)
                if window > 0:
                    self._inline_timer = loop.call_later(window, self._inline_fire)
                else:
                    loop.call_soon(self._inline_fire)
            elif self._inline_timer is not None and (
                    waiting >= self._company or self._queued_rows >= self.policy.max_batch_size):
                # Everyone who recently waited together is here, or the batch is full: more
                # waiting gains nothing.
                self._inline_timer.cancel()
                self._inline_timer = None
                loop.call_soon(self._inline_fire)
            return await item.future
        if self._executing == 0 and not self._queue and self._company < 2:
            # Idle and alone: this request is a batch of its own right now; running it in the
            # caller's task skips the hand-off to the loop task (the lone client's latency).
            item.queued = False
            self._executing += 1
            await self._execute(loop, [item])
            return item.future.result()
        self._enqueue(loop, item)
        self._start(loop)
        return await item.future

    def run_now(self, arrays: Arrays, *, requests: int = 1) -> Arrays | None:
        """Run a request right here, on the event loop, when ``submit`` would run it alone and
        at once anyway: inline mode, nothing queued, scheduled or executing, no wait for
        company, at most ``max_batch_size`` rows, not closed. Returns its outputs, or None
        when it did nothing (``submit`` then decides). Raises the forward pass's error.

        For a front end that already merged the requests that arrived together (the gRPC fast
        lane's groups): the future, the task and the callback a submit costs are most of a
        fast model's time on the loop."""
        if (self._closed or self._queue or self._inline_scheduled or self._executing
                or not self.inline):
            return None
        rows = rows_of(arrays)
        if rows is None or rows > self.policy.max_batch_size:
            return None
        now = self._clock()
        self._sample(now)
        self._period_peak = max(self._period_peak, requests)
        if self._inline_window(now) > 0:  # submit would wait for company
            return None
        outputs, started, compute = _compute(self._fn, [arrays], self._clock)
        self._measure(compute)
        self._observe(rows, [started - now] * requests, compute)
        return outputs[0]

    async def close(self, reason: str = "shutting down", *, drain: bool = False) -> None:
        """Refuse new requests; with ``drain``, run every queued one first, else fail them with
        ``ModelNotReady``; stop the loop. Executing batches finish (threads cannot be stopped)."""
        self._closed = True
        # Shutdown and unload only; polling keeps the hot path free of extra signalling.
        while drain and (self._executing or any(not i.future.done() for i in self._queue)):
            await asyncio.sleep(0.005)
        for item in list(self._queue):
            if not item.future.done():
                item.future.set_exception(ModelNotReady(f"{self.name}: {reason}"))
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    # ---- the loop ------------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop(), name=f"{self.name}-loop")
            self._task.add_done_callback(self._loop_ended)
        self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._drop_dead_head()
            wait: float | None = None
            if self._queue and self._executing < self._max_concurrency:
                batch, wait = self._next_batch()
                if batch:
                    self._launch(loop, batch)
                    continue
            self._wake.clear()
            # Woken by a new request, a finished batch, or (``wait``) the oldest one's delay.
            timer = loop.call_later(wait, self._wake.set) if wait is not None else None
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # a bug in the batcher: never leave a caller waiting forever
            log.error("%s: batching loop failed", self.name, exc_info=error)
            for item in list(self._queue):
                if not item.future.done():
                    item.future.set_exception(error)
            self._queue.clear()

    def _next_batch(self, ignore_delay: bool = False) -> tuple[list[_Item], float | None]:
        """The batch to run now, or ([], seconds until the oldest request's delay ends)."""
        policy = self.policy
        head = self._queue[0]
        batch: list[_Item] = []
        rows = 0
        prefix_rows: list[int] = []
        full = False
        for item in self._queue:
            if item.future.done() or item.key != head.key:
                continue
            if batch and rows + item.rows > policy.max_batch_size:
                full = True
                break
            batch.append(item)
            rows += item.rows
            prefix_rows.append(rows)
            if rows >= policy.max_batch_size:
                full = True
                break
        if full or ignore_delay:
            return batch, None
        if self._executing == 0:
            # Idle: run now, unless requests recently came together and not all are back yet
            # (closed-loop clients return one by one after their answers): a batch of one
            # followed by one of the rest would cost two forward passes for one's work.
            if self._company < 2 or sum(i.requests for i in batch) >= self._company:
                return batch, None
            remaining = self._gather_s() - (self._clock() - head.enqueued)
            return (batch, None) if remaining <= 0 else ([], remaining)
        for size in reversed(policy.preferred_batch_sizes):
            if size in prefix_rows:
                return batch[: prefix_rows.index(size) + 1], None
        waited = self._clock() - head.enqueued
        remaining = policy.max_queue_delay_ms / 1000 - waited
        if remaining <= 0:
            return batch, None
        return [], remaining

    def _launch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        self._take(batch)
        self._executing += 1
        task = loop.create_task(self._execute(loop, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def _release(self) -> None:
        """One model call ended (in the thread, not merely in the awaiting task)."""
        self._executing -= 1
        if self._wake is not None:
            self._wake.set()

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        submitted = False
        running = sum(i.requests for i in batch)
        self._running_requests += running
        try:
            live = self._live(batch)
            if not live:
                return
            cf = self._executor.submit(_compute, self._fn, [i.arrays for i in live], self._clock,
                                       [i.deadline for i in live])
            submitted = True
            # The slot is freed when the THREAD is done: a cancelled caller (a gRPC client that
            # went away) must not let a second call start while this one still runs.
            cf.add_done_callback(lambda _: _call_soon(loop, self._release))
            try:
                outputs, started, compute = await asyncio.wrap_future(cf, loop=loop)
            except BaseException as e:  # every waiter gets the batch's error, even a cancel
                for item in live:
                    if item.future.done():
                        continue
                    if isinstance(e, asyncio.CancelledError):
                        item.future.cancel()
                    else:
                        item.future.set_exception(e)
                if not isinstance(e, Exception):
                    raise
                return
            self._finish(live, outputs, started, compute)
        finally:
            self._running_requests -= running
            if not submitted:
                self._release()

    def _inline_window(self, now: float) -> float:
        """How long a request that opens an inline batch may wait for company.

        Waiting pays only while the event loop has other work (other requests being received
        and answered): then the batch grows at no cost, and fewer, larger forward passes free
        the loop. With a single client it would only add latency. So the window is
        ``max_queue_delay_ms`` while, over the last SAMPLE_S, the loop thread was busier
        than INLINE_BUSY_FRACTION (its CPU time over wall time) and requests did queue together
        (``_company``, the most that waited at once); 0 otherwise. It also closes early once
        ``_company`` requests wait (see ``submit``)."""
        if self._util > INLINE_BUSY_FRACTION and self._company >= 2:
            return self.policy.max_queue_delay_ms / 1000
        return 0.0

    def _sample(self, now: float) -> None:
        """Every SAMPLE_S: the loop thread's busy fraction (inline mode) and ``_company``, the
        most requests inside the batcher at once over the last period (queued; in thread mode
        queued or executing)."""
        if now - self._util_wall >= SAMPLE_S:
            cpu = time.thread_time()
            self._util = (cpu - self._util_cpu) / (now - self._util_wall)
            self._util_wall, self._util_cpu = now, cpu
            # After a quiet spell (no request for two periods, or two forward passes of a slow
            # model) the clients that came together are gone: do not make the next one wait.
            quiet = now - self._last_submit > max(2 * SAMPLE_S, 2 * (self._compute_avg or 0.0))
            self._company = 0 if quiet else self._period_peak
            self._period_peak = 0
        self._last_submit = now

    def _gather_s(self) -> float:
        """How long an idle model may wait for its recent company (thread mode): at least
        ``max_queue_delay_ms``, up to half a batch's compute time (a forward pass of one row
        costs nearly as much as one of many, so waiting a fraction of it for the others pays),
        never more than MAX_GATHER_S (a long ``max_queue_delay_ms`` included: the company is a
        guess, and nobody may be coming)."""
        half = 0.5 * (self._compute_avg or 0.0)
        return min(max(self.policy.max_queue_delay_ms / 1000, half), MAX_GATHER_S)

    def _inline_fire(self) -> None:
        self._inline_scheduled = False
        self._inline_timer = None
        self._run_inline()

    def _run_inline(self) -> None:
        """Run every queued request now, on the loop, in batches of at most max_batch_size."""
        while True:
            self._drop_dead_head()
            if not self._queue:
                return
            batch, _ = self._next_batch(ignore_delay=True)
            self._take(batch)
            live = self._live(batch)
            if not live:
                continue
            try:
                outputs, started, compute = _compute(self._fn, [i.arrays for i in live],
                                                     self._clock)
            except Exception as e:  # noqa: BLE001  (every waiter gets the batch's error)
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            self._finish(live, outputs, started, compute)

    def _finish(self, live: list[_Item], outputs: list[Arrays], started: float,
                compute: float) -> None:
        for item, result in zip(live, outputs, strict=True):
            if not item.future.done():  # the caller may have given up meanwhile
                item.future.set_result(result)
        self._measure(compute)
        self._observe(sum(i.rows for i in live),
                      [started - i.enqueued for i in live for _ in range(i.requests)], compute)

    def _measure(self, compute: float) -> None:
        self._compute_avg = compute if self._compute_avg is None else (
            0.8 * self._compute_avg + 0.2 * compute)
        self._measured += 1

    def _observe(self, rows: int, queue_seconds: list[float], compute: float) -> None:
        if self._observer is None:
            return
        try:
            self._observer.batch_executed(rows, queue_seconds, compute)
        except Exception:  # metrics must never cost an answer
            log.exception("%s: batch observer failed", self.name)

    # ---- queue bookkeeping ---------------------------------------------------------------

    def _enqueue(self, loop: asyncio.AbstractEventLoop, item: _Item) -> None:
        """Queue a request (its deadline armed) and count it towards the recent company."""
        item.future.add_done_callback(lambda _: self._dequeue(item))
        if item.deadline is not None:
            item.timer = loop.call_later(item.deadline - item.enqueued, self._expire, item)
        self._queue.append(item)
        self._queued_rows += item.rows
        self._queued_requests += item.requests
        self._period_peak = max(self._period_peak, self._queued_requests + self._running_requests)

    def _take(self, batch: list[_Item]) -> None:
        """Move a batch's requests out of the queue (they are about to run)."""
        for item in batch:
            item.queued = False
            self._queued_rows -= item.rows
            self._queued_requests -= item.requests
            if item.timer is not None:
                item.timer.cancel()
        ids = {id(item) for item in batch}
        self._queue = collections.deque(
            i for i in self._queue if id(i) not in ids and not i.future.done())

    def _live(self, batch: list[_Item]) -> list[_Item]:
        """The batch's requests still worth computing: expired ones are answered
        DeadlineExceeded here (never computed), given-up ones skipped."""
        now = self._clock()
        for item in batch:
            if not item.future.done() and item.deadline is not None and item.deadline <= now:
                item.future.set_exception(
                    DeadlineExceeded(f"{self.name}: the request's deadline passed in the queue"))
        return [i for i in batch if not i.future.done()]

    def _dequeue(self, item: _Item) -> None:
        """A queued request finished without running (expired, cancelled, closed)."""
        if item.queued:
            item.queued = False
            self._queued_rows -= item.rows
            self._queued_requests -= item.requests
            if item.timer is not None:
                item.timer.cancel()

    def _drop_dead_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _expire(self, item: _Item) -> None:
        if not item.future.done():
            item.future.set_exception(
                DeadlineExceeded(f"{self.name}: the request's deadline passed in the queue"))


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while the thread ran (shutdown)
        loop.call_soon_threadsafe(fn)


def _compute(
    fn: BatchFn, requests: list[Arrays], clock: Clock, deadlines: Sequence[float | None] = ()
) -> tuple[list[Arrays], float, float]:
    """Concatenate, run, split (in a worker thread): each request's rows of every output, when
    the thread took the batch (``clock``; queue time ends there) and the model's seconds.
    A batch whose every request expired while it waited for a thread is not computed."""
    started = clock()
    if deadlines and all(d is not None and d <= started for d in deadlines):
        raise DeadlineExceeded("the request's deadline passed before a worker took it")
    counts = [r[0].shape[0] for r in requests]
    if len(requests) == 1:
        inputs = requests[0]
    else:
        inputs = tuple(np.concatenate(parts) for parts in zip(*requests, strict=True))
    start = time.perf_counter()
    outputs = fn(inputs)
    compute = time.perf_counter() - start
    if len(requests) == 1:
        return [tuple(outputs)], started, compute
    total = sum(counts)
    for i, out in enumerate(outputs):
        if out.ndim == 0 or out.shape[0] != total:
            raise BatchShapeError(
                f"output {i} has shape {list(out.shape)}: a batch of {total} rows needs dim 0 "
                f"= {total}"
            )
    # Each request's rows of every output: views, as np.split gives, at a tenth of its cost.
    spans = itertools.pairwise(itertools.accumulate(counts, initial=0))
    return [tuple(out[a:b] for out in outputs) for a, b in spans], started, compute


class BatchShapeError(InferenceFailed):
    """The model's output does not have one row per input row, so it cannot be split back."""
