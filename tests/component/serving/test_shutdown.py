"""SIGTERM under load loses no request: ``python -m serving`` as a real process, requests in
flight on both protocols (held by an injected delay, so they are inside the server, some in the
batcher's queue, when the signal lands), then SIGTERM.

Every request admitted before the signal gets its own correct answer; a request sent after it
gets either an answer or a clean refusal (HTTP 503 with Retry-After, gRPC UNAVAILABLE), never a
dropped connection; the process exits 0. "Admitted" is observed, not assumed: the test waits
until the server's in-flight gauge counts every request before it sends the signal.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np

from kloop.faults import Fault
from serving.client import AdminClient, GrpcClient, InferenceError
from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.support.serving import MODEL, reference, wait_for_file

TOKEN = "shutdown-token"
HELD_MS = 1500  # how long each request is held inside the server before the model runs
PER_PROTOCOL = 8


def json_body(images: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(images.shape),
                        "data": images.reshape(-1).tolist()}]}


async def inflight(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(f"{base}/metrics") as r:
        text = await r.text()
    line = next(x for x in text.splitlines() if x.startswith("kloop_inference_inflight_requests "))
    return float(line.split()[1])


async def late_requests(base: str, target: str, images: np.ndarray[Any, Any]) -> list[str]:
    """After SIGTERM: send until both protocols have been refused once; return what came back.
    A fresh HTTP connection per request, so a refusal is the server's answer, not a reused
    connection the server closed."""
    seen: list[str] = []
    refused = {"http": False, "grpc": False}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, GrpcClient(target) as client:
        deadline = time.monotonic() + 1.0  # well inside the HELD_MS drain
        while not all(refused.values()) and time.monotonic() < deadline:
            async with session.post(f"{base}/v2/models/{MODEL}/infer", json=json_body(images)) as r:
                await r.read()
                seen.append(f"http {r.status}")
                if r.status == 503:
                    assert r.headers["Retry-After"] == "1"
                    assert r.headers.get("Connection", "").lower() == "close"
                    refused["http"] = True
            try:
                await client.infer(MODEL, {"image": images})
                seen.append("grpc OK")
            except InferenceError as e:
                seen.append(f"grpc {e.code}")
                refused["grpc"] = e.code == "UNAVAILABLE"
            async with session.get(f"{base}/v2/health/ready") as r:
                seen.append(f"ready {r.status}")
            await asyncio.sleep(0.02)
    return seen


async def test_sigterm_under_load_answers_every_admitted_request(
    registry_root: Path, tmp_path: Path, processes: Processes
) -> None:
    ports_file = tmp_path / "ports.json"
    env = {**os.environ, "KLOOP_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    proc = processes.spawn(
        [sys.executable, "-m", "serving", "--registry", f"file://{registry_root}",
         "--http-port", "0", "--grpc-port", "0", "--ports-file", str(ports_file),
         "--grace-seconds", "20", "--max-batch-size", "8"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        ports = await asyncio.to_thread(wait_for_file, ports_file, proc)
        base, target = f"http://127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['grpc']}"
        await asyncio.to_thread(AdminClient(base, TOKEN).set_fault, MODEL, 2, Fault(extra_latency_ms=HELD_MS))
        rng = np.random.default_rng(3)
        inputs = [rng.standard_normal((1 + i % 3, 1, 8, 8), dtype=np.float32)
                  for i in range(2 * PER_PROTOCOL)]

        async with aiohttp.ClientSession() as session, GrpcClient(target) as client:
            async def over_http(images: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
                url = f"{base}/v2/models/{MODEL}/infer"
                async with session.post(url, json=json_body(images)) as r:
                    body = await r.json()
                    assert r.status == 200, body
                out = {o["name"]: o for o in body["outputs"]}["label"]
                return np.array(out["data"]).reshape(out["shape"])

            async def over_grpc(images: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
                return (await client.infer(MODEL, {"image": images})).outputs["label"]

            admitted = [asyncio.create_task((over_http if i % 2 else over_grpc)(images))
                        for i, images in enumerate(inputs)]
            give_up = time.monotonic() + 10
            while await inflight(session, base) < len(admitted):
                assert time.monotonic() < give_up, "requests never all reached the server"
                await asyncio.sleep(0.01)

            proc.send_signal(signal.SIGTERM)
            seen = await late_requests(base, target, inputs[0])
            labels = await asyncio.wait_for(asyncio.gather(*admitted), 30)

        for images, label in zip(inputs, labels, strict=True):
            np.testing.assert_array_equal(label, reference(2, images)[1])
        assert "http 503" in seen and "grpc UNAVAILABLE" in seen, seen
        assert set(seen) <= {"http 200", "http 503", "grpc OK", "grpc UNAVAILABLE",
                             "ready 200", "ready 503"}, seen
        assert "ready 503" in seen, seen
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0, proc.stderr.read()  # type: ignore[union-attr]
        assert not ports_file.exists()
        # Gone for good: the next connection is refused (not hung, not half-answered).
        with grpc.insecure_channel(target) as channel:
                grpc.channel_ready_future(channel).result(timeout=0.5)
        raise AssertionError("the server still accepts connections after exiting")
    except grpc.FutureTimeoutError:
        pass
