"""A registry version refused at start does not keep the server down: real in-process servers on
127.0.0.1 over registries with a damaged version. The server serves the newest older version
that loads, reports the refused one (``/admin/models``'s ``rejected``, the repository index), a
model with no loadable version does not stop the others, and a refused runtime load is logged.
Also: a server removes its ports file only while it records this process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
import torch

from kloop.artifact import Registry
from serving.app import Server, ServerConfig
from serving.client import AdminClient, AdminError, HttpClient
from tests.support.serving import INPUTS, MODEL, OUTPUTS, TOKEN

T = TypeVar("T")
X = {"image": np.zeros((1, 1, 8, 8), np.float32)}
OTHER = "letters"  # a second model, healthy


async def call(fn: Callable[..., T], *args: Any) -> T:
    """The synchronous AdminClient off the loop the server runs on."""
    return await asyncio.to_thread(fn, *args)


def flip_byte(registry_root: Path, version: int) -> None:
    model_file = registry_root / MODEL / str(version) / "model.pt2"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))


def publish_file(registry_root: Path, name: str, model_file: Path, work: Path) -> int:
    """Publish ``model_file`` (verified hashes) as a new version of ``name``."""
    src = work / f"src-{name}"
    src.mkdir()
    shutil.copy(model_file, src / "model.pt2")
    return Registry(registry_root).publish(
        name, src, model_file="model.pt2", format="torch.export",
        torch_version=torch.__version__, inputs=INPUTS, outputs=OUTPUTS, metrics={}, params={},
        data_fingerprint="test", run_id="test").version


@pytest.fixture
async def started(registry_root: Path) -> AsyncIterator[Callable[[], Any]]:
    """Start a server on ``registry_root`` as the test has left it (stopped at the end)."""
    servers: list[Server] = []

    async def start() -> Server:
        srv = Server(ServerConfig(registry=registry_root, http_port=0, grpc_port=0,
                                  admin_token=TOKEN, grace_seconds=1.0))
        servers.append(srv)
        await srv.start()
        return srv

    yield start
    for srv in servers:
        await srv.stop()


async def index(url: str) -> list[dict[str, str]]:
    async with aiohttp.ClientSession(url) as http, http.post("/v2/repository/index") as r:
        assert r.status == 200
        return list(await r.json())


async def status_of(url: str, path: str) -> int:
    async with aiohttp.ClientSession(url) as http, http.get(path) as r:
        return r.status


async def test_a_champion_failing_verification_is_reported_and_the_previous_version_served(
    registry_root: Path, started: Callable[[], Any], caplog: pytest.LogCaptureFixture,
) -> None:
    Registry(registry_root).set_alias(MODEL, "champion", 2)
    pristine = (registry_root / MODEL / "2" / "model.pt2").read_bytes()
    flip_byte(registry_root, 2)
    with caplog.at_level(logging.INFO, logger="serving.app"):
        srv = await started()
    url = f"http://127.0.0.1:{srv.http_port}"
    admin = AdminClient(url, TOKEN)

    assert await call(admin.models) == {MODEL: {"versions": ["1"], "weights": {"1": 100}}}
    rejected = await call(admin.rejected)
    assert list(rejected) == [MODEL] and list(rejected[MODEL]) == [2]
    assert "sha256 of model.pt2" in rejected[MODEL][2]
    async with aiohttp.ClientSession(url) as http, http.get(
            "/admin/models", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        body = await r.json()
    assert body["rejected"] == {MODEL: {"2": rejected[MODEL][2]}}
    assert await index(url) == [
        {"name": MODEL, "version": "1", "state": "READY"},
        {"name": MODEL, "version": "2", "state": "UNAVAILABLE", "reason": rejected[MODEL][2]},
    ]
    async with HttpClient(url) as client:
        assert (await client.infer(MODEL, X)).model_version == "1"
    assert await status_of(url, "/v2/health/ready") == 200

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"{MODEL} v2" in m and "sha256 of model.pt2" in m for m in errors), errors
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"serving {MODEL} v1 instead of the champion v2" in warnings

    # Repaired and loaded again, the version is no longer reported.
    (registry_root / MODEL / "2" / "model.pt2").write_bytes(pristine)
    await call(admin.load, MODEL, 2)
    assert await call(admin.rejected) == {}
    assert {e["version"]: e["state"] for e in await index(url)} == {"1": "READY", "2": "READY"}


async def test_a_latest_version_whose_model_file_does_not_load_falls_back_too(
    registry_root: Path, tmp_path: Path, started: Callable[[], Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    not_a_model = tmp_path / "model.pt2"
    not_a_model.write_bytes(b"not a model")
    assert publish_file(registry_root, MODEL, not_a_model, tmp_path) == 3  # hashes verify
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        srv = await started()
    admin = AdminClient(f"http://127.0.0.1:{srv.http_port}", TOKEN)
    assert await call(admin.traffic, MODEL) == {2: 100}
    rejected = await call(admin.rejected)
    assert "the model file did not load" in rejected[MODEL][3]
    assert f"serving {MODEL} v2 instead of the latest version v3" in caplog.messages


async def test_a_model_with_no_loadable_version_does_not_stop_the_others(
    registry_root: Path, tmp_path: Path, started: Callable[[], Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    publish_file(registry_root, OTHER, registry_root / MODEL / "1" / "model.pt2", tmp_path)
    flip_byte(registry_root, 1)
    flip_byte(registry_root, 2)
    with caplog.at_level(logging.ERROR, logger="serving.app"):
        srv = await started()
    url = f"http://127.0.0.1:{srv.http_port}"
    admin = AdminClient(url, TOKEN)

    assert await call(admin.models) == {OTHER: {"versions": ["1"], "weights": {"1": 100}}}
    assert sorted((await call(admin.rejected))[MODEL]) == [1, 2]
    async with HttpClient(url) as client:
        assert (await client.infer(OTHER, X)).model_name == OTHER
        assert not await client.model_ready(MODEL)
        # Readiness waits for the models that loaded, not for the one that cannot.
        assert await client.ready()
    states = {(e["name"], e["version"]): (e["state"], e.get("reason", "")) for e in await index(url)}
    assert states[(OTHER, "1")] == ("READY", "")
    for v in ("1", "2"):
        state, reason = states[(MODEL, v)]
        assert state == "UNAVAILABLE" and "sha256 of model.pt2" in reason
    assert any(f"no version of {MODEL}" in m and "not served" in m for m in caplog.messages)


async def test_versions_newer_than_the_champion_are_no_fallback(
    registry_root: Path, started: Callable[[], Any],
) -> None:
    """v2 was never promoted (or was rolled back): all traffic on it would be a silent wrong
    answer, so a refused champion v1 leaves the model unserved and reported instead."""
    Registry(registry_root).set_alias(MODEL, "champion", 1)
    flip_byte(registry_root, 1)
    srv = await started()
    admin = AdminClient(f"http://127.0.0.1:{srv.http_port}", TOKEN)
    assert await call(admin.models) == {}
    assert list((await call(admin.rejected))[MODEL]) == [1]


async def test_a_refused_load_is_logged_with_model_version_and_reason(
    registry_root: Path, started: Callable[[], Any], caplog: pytest.LogCaptureFixture,
) -> None:
    srv = await started()
    admin = AdminClient(f"http://127.0.0.1:{srv.http_port}", TOKEN)
    flip_byte(registry_root, 1)
    with caplog.at_level(logging.WARNING, logger="serving.http.admin_routes"):
        with pytest.raises(AdminError) as refused:
            await call(admin.load, MODEL, 1)
        assert refused.value.status == 422
        with pytest.raises(AdminError) as missing:
            await call(admin.load, MODEL, 9)
        assert missing.value.status == 404
    logged = [r.getMessage() for r in caplog.records
              if r.name == "serving.http.admin_routes" and r.levelno == logging.WARNING]
    assert len(logged) == 2, logged
    assert logged[0].startswith(f"refused to load {MODEL} version 1: ")
    assert refused.value.message in logged[0] and "sha256 of model.pt2" in logged[0]
    assert logged[1].startswith(f"refused to load {MODEL} version 9: ")
    assert list((await call(admin.rejected))[MODEL]) == [1]  # a 404 is no rejected version


async def test_stop_leaves_a_ports_file_that_records_another_process(
    registry_root: Path, tmp_path: Path,
) -> None:
    ports_file = tmp_path / "server.json"
    config = ServerConfig(registry=registry_root, http_port=0, grpc_port=0, grace_seconds=0.5,
                          ports_file=ports_file)
    srv = Server(config)
    await srv.start()
    assert json.loads(ports_file.read_text())["pid"] == os.getpid()
    other = {"http": 1, "grpc": 2, "pid": os.getppid()}  # another server wrote it since
    ports_file.write_text(json.dumps(other))
    await srv.stop()
    assert json.loads(ports_file.read_text()) == other

    # A server that never started (its port is taken) leaves the file alone too.
    blocker = Server(config)
    await blocker.start()
    taken = ServerConfig(registry=registry_root, http_port=0, grpc_port=blocker.grpc_port,
                         grace_seconds=0.5, ports_file=ports_file)
    ports_file.write_text(json.dumps(other))
    try:
        with pytest.raises(OSError):
            await Server(taken).start()
        assert json.loads(ports_file.read_text()) == other
    finally:
        await blocker.stop()
    assert json.loads(ports_file.read_text()) == other  # blocker's own record was overwritten

    # Its own record, a server removes.
    srv = Server(config)
    await srv.start()
    await srv.stop()
    assert not ports_file.exists()
