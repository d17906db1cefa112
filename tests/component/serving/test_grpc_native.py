"""The native gRPC front end (serving/grpc/native/grpc_front.cpp) on its own, with a real grpc.aio
client on 127.0.0.1: every call reaches Python once and gets its own answer, deadlines arrive,
answers are never given twice, stop() answers what Python still holds, and the server's
adapter maps bad input and unknown methods to clear statuses.

The OIP v2 behaviour through this front end is tested with every other gRPC test (the server
uses it wherever it is built; tests/component/serving/test_grpc_api.py runs against both servers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from serving.app import Server, ServerConfig
from serving.grpc import native
from tests.support.serving import require_native

METHOD = "/test.Echo/Call"


@pytest.fixture
async def front() -> AsyncIterator[Any]:
    require_native()
    assert native.grpc_front is not None
    f = native.grpc_front.Front("127.0.0.1:0")
    try:
        yield f
    finally:
        await asyncio.to_thread(f.stop, 0.0)


async def next_calls(front: Any, want: int) -> list[tuple[int, str, bytes, float | None]]:
    """Wait on the front's eventfd, as the server does, until ``want`` calls arrived."""
    loop = asyncio.get_running_loop()
    calls: list[tuple[int, str, bytes, float | None]] = []
    while len(calls) < want:
        readable = loop.create_future()
        loop.add_reader(front.fd, readable.set_result, None)
        try:
            await asyncio.wait_for(readable, 10)
        finally:
            loop.remove_reader(front.fd)
        calls.extend(front.poll())
    return calls


def unary(channel: grpc.aio.Channel, method: str = METHOD) -> Callable[..., Any]:
    return channel.unary_unary(method)  # bytes in, bytes out


async def test_each_call_gets_its_own_answer(front: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        call = unary(channel)
        pending = [asyncio.ensure_future(call(f"req-{i}".encode(), timeout=10))
                   for i in range(200)]
        calls = await next_calls(front, 200)
        assert {method for _, method, _, _ in calls} == {METHOD}
        assert front.held == 200
        for handle, _, body, _ in reversed(calls):  # answered out of arrival order
            assert front.respond(handle, 0, "", body.upper())
        answers = await asyncio.gather(*pending)
    assert answers == [f"REQ-{i}".encode() for i in range(200)]
    assert front.held == 0


async def test_statuses_deadlines_and_large_messages(front: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        call = unary(channel)
        with_deadline = asyncio.ensure_future(call(b"a", timeout=5))
        (handle, _, _, left), = await next_calls(front, 1)
        assert left is not None and 3 < left <= 5
        assert front.respond(handle, grpc.StatusCode.NOT_FOUND.value[0], "no such model", b"")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await with_deadline
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.NOT_FOUND,
                                                       "no such model")

        big = bytes(range(256)) * 4096  # 1 MiB each way
        no_deadline = asyncio.ensure_future(call(big))
        (handle, _, body, left), = await next_calls(front, 1)
        assert left is None and body == big
        assert front.respond(handle, 0, "", body[::-1])
        assert await no_deadline == big[::-1]

        with pytest.raises(grpc.aio.AioRpcError) as e:  # past max_receive_bytes (4 MiB)
            await call(b"x" * (5 << 20), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_an_answer_is_given_once(front: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        pending = asyncio.ensure_future(unary(channel)(b"once", timeout=10))
        (handle, _, _, _), = await next_calls(front, 1)
        assert front.respond(handle, 0, "", b"first")
        assert not front.respond(handle, 0, "", b"second")  # refused, never dereferenced
        assert await pending == b"first"


async def test_a_cancelled_call_can_still_be_answered(front: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        call = unary(channel)
        gone = asyncio.ensure_future(call(b"gone", timeout=10))
        (handle, _, _, _), = await next_calls(front, 1)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert front.respond(handle, 0, "", b"late")  # written to nobody, then freed
        assert front.held == 0
        again = asyncio.ensure_future(call(b"again", timeout=10))
        (handle, _, body, _), = await next_calls(front, 1)
        front.respond(handle, 0, "", body)
        assert await again == b"again"


async def test_stop_answers_held_calls_unavailable(front: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        pending = [asyncio.ensure_future(unary(channel)(b"held", timeout=10)) for _ in range(3)]
        calls = await next_calls(front, 3)
        await asyncio.to_thread(front.stop, 1.0)
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            assert isinstance(outcome, grpc.aio.AioRpcError)
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE
        assert not front.respond(calls[0][0], 0, "", b"too late")
        assert front.held == 0


def batch_threads() -> set[int]:
    """This process's threads that run as SCHED_BATCH."""
    batch = set()
    for tid in map(int, os.listdir("/proc/self/task")):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            if os.sched_getscheduler(tid) == os.SCHED_BATCH:
                batch.add(tid)
    return batch


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="needs Linux scheduling policies")
async def test_the_fronts_threads_never_preempt_the_thread_they_wake() -> None:
    """Its completion-queue and writer threads run as SCHED_BATCH (see grpc_front.cpp); the
    calling thread, the event loop's, keeps its policy."""
    require_native()
    assert native.grpc_front is not None
    before = batch_threads()
    f = native.grpc_front.Front("127.0.0.1:0")
    try:
        for _ in range(200):  # the threads set their own policy as they start
            if len(batch_threads() - before) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(batch_threads() - before) == 2
        assert os.sched_getscheduler(0) != os.SCHED_BATCH
    finally:
        await asyncio.to_thread(f.stop, 0.0)
    assert batch_threads() <= before  # gone with the front


async def test_a_taken_port_is_an_error(front: Any) -> None:
    assert native.grpc_front is not None
    with pytest.raises(RuntimeError, match="could not bind"):
        native.grpc_front.Front(f"127.0.0.1:{front.port}")


async def test_server_maps_garbage_and_unknown_methods(registry_root: Any) -> None:
    require_native()
    srv = Server(ServerConfig(registry=registry_root, http_port=0, grpc_port=0,
                              grpc_server="native"))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            infer = unary(channel, "/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await infer(b"\xff\xff\xff", timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ModelInferRequest" in (e.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await unary(channel, "/inference.GRPCInferenceService/Nope")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            live = unary(channel, "/inference.GRPCInferenceService/ServerLive")
            assert await live(b"", timeout=10) == b"\x08\x01"  # ServerLiveResponse(live=True)
    finally:
        await srv.stop()


def test_config_chooses_the_grpc_server(registry_root: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="grpc_server must be one of"):
        ServerConfig(registry=registry_root, grpc_server="fast")
    assert not ServerConfig(registry=registry_root, grpc_server="aio").native_grpc()
    monkeypatch.setattr(native, "grpc_front", None)
    monkeypatch.setattr(native, "UNAVAILABLE", "not built here")
    with pytest.raises(ValueError, match="not built here"):
        ServerConfig(registry=registry_root, grpc_server="native")
    assert not ServerConfig(registry=registry_root).native_grpc()  # auto falls back to grpc.aio


def test_serve_flag_chooses_the_grpc_server(tmp_path: Any) -> None:
    import argparse

    from serving import cli

    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)

    def chosen(*argv: str) -> str:
        args = parser.parse_args(["--registry", str(tmp_path), *argv])
        return cli.config_from_args(args).grpc_server

    assert chosen() == "auto"
    assert chosen("--grpc-server", "aio") == "aio"
    with pytest.raises(SystemExit):
        parser.parse_args(["--registry", str(tmp_path), "--grpc-server", "fast"])
