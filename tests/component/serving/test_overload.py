"""Past ``max_inflight`` the server answers at once (503 / RESOURCE_EXHAUSTED) instead of
queueing without bound, and serves again when the load is gone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from kloop.faults import Fault
from serving.app import Server, ServerConfig
from serving.client import AdminClient, GrpcClient, HttpClient, InferenceError
from tests.support.serving import MODEL, TOKEN


async def test_requests_past_max_inflight_are_refused_not_queued(registry_root: Path) -> None:
    srv = Server(ServerConfig(registry=registry_root, http_port=0, grpc_port=0, admin_token=TOKEN,
                              max_inflight=1, grace_seconds=1.0))
    await srv.start()
    http = HttpClient(f"http://127.0.0.1:{srv.http_port}")
    grpc_client = GrpcClient(f"127.0.0.1:{srv.grpc_port}")
    image = {"image": np.zeros((1, 1, 8, 8), dtype=np.float32)}
    try:
        admin = AdminClient(f"http://127.0.0.1:{srv.http_port}", TOKEN)
        await asyncio.to_thread(admin.set_fault, MODEL, 2, Fault(extra_latency_ms=500))  # hold one request 0.5 s
        slow = asyncio.create_task(http.infer(MODEL, image))
        while srv.dataplane.inflight == 0:  # until the slow request is really in flight
            await asyncio.sleep(0.005)
        for client, code in ((http, "503"), (grpc_client, "RESOURCE_EXHAUSTED")):
            try:
                await client.infer(MODEL, image)
                raise AssertionError("a request past max_inflight was accepted")
            except InferenceError as e:
                assert e.code == code, e
        assert (await slow).model_version == "2"
        await asyncio.to_thread(admin.clear_fault, MODEL, 2)
        assert (await grpc_client.infer(MODEL, image)).model_version == "2"
    finally:
        await http.close()
        await grpc_client.close()
        await srv.stop()



async def test_inflight_gauge_counts_requests_being_served(server, http_client, admin) -> None:
    """The gauge kloop's own HPA scales on (``kloop_inference_inflight_requests``) reads the
    live count at scrape time: 0 when idle, the held requests while a fault delays them."""
    import aiohttp

    url = f"http://127.0.0.1:{server.http_port}/metrics"

    async def gauge() -> float:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            text = await r.text()
        line = next(x for x in text.splitlines() if x.startswith("kloop_inference_inflight_requests "))
        return float(line.split()[1])

    image = {"image": np.zeros((1, 1, 8, 8), dtype=np.float32)}
    assert await gauge() == 0
    await asyncio.to_thread(admin.set_fault, MODEL, 2, Fault(extra_latency_ms=400))
    held = [asyncio.create_task(http_client.infer(MODEL, image)) for _ in range(3)]
    while server.dataplane.inflight < 3:
        await asyncio.sleep(0.005)
    assert await gauge() == 3
    await asyncio.gather(*held)
    assert await gauge() == 0
