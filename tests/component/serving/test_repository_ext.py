"""The model repository extension over HTTP: the index lists every registry version with its
state, load and unload change what is served and need the admin token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from kloop.artifact import Registry
from serving.app import Server, ServerConfig
from tests.support.serving import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _post(http: aiohttp.ClientSession, path: str, body: Any = None,
                auth: bool = True) -> tuple[int, Any]:
    async with http.post(path, json=body, headers=AUTH if auth else {}) as r:
        return r.status, await r.json()


async def test_index_load_unload(server: Server, http_url: str) -> None:
    async with aiohttp.ClientSession(http_url) as http:
        status, index = await _post(http, "/v2/repository/index", auth=False)
        assert status == 200
        assert index == [{"name": "digits", "version": "1", "state": "UNAVAILABLE",
                          "reason": "unloaded"},
                         {"name": "digits", "version": "2", "state": "READY"}]
        assert (await _post(http, "/v2/repository/index", {"ready": True}))[1] == [
            {"name": "digits", "version": "2", "state": "READY"}]

        # load and unload take the admin token
        assert (await _post(http, "/v2/repository/models/digits/unload", auth=False))[0] == 401
        assert (await _post(http, "/v2/repository/models/digits/load", {}, auth=False))[0] == 401

        # a kloop parameter loads one more version (weight 0, as the admin API does)
        status, body = await _post(http, "/v2/repository/models/digits/load",
                                   {"parameters": {"version": "1"}})
        assert status == 200 and body["versions"] == ["1", "2"]
        status, body = await _post(http, "/v2/repository/models/digits/unload", {})
        assert status == 200 and body["unloaded"] == ["1", "2"]
        async with http.get("/v2/models/digits/ready") as r:
            assert r.status == 503
        states = {e["version"]: e["state"] for e in (await _post(http, "/v2/repository/index"))[1]}
        assert states == {"1": "UNAVAILABLE", "2": "UNAVAILABLE"}

        # without a version: the champion (else the latest) with all the traffic
        status, body = await _post(http, "/v2/repository/models/digits/load")
        assert status == 200 and body["versions"] == ["2"]
        async with http.get("/v2/models/digits/ready") as r:
            assert r.status == 200
        # loading a loaded model changes nothing
        assert (await _post(http, "/v2/repository/models/digits/load"))[1]["versions"] == ["2"]


async def test_errors(server: Server, http_url: str) -> None:
    async with aiohttp.ClientSession(http_url) as http:
        assert (await _post(http, "/v2/repository/models/nope/load"))[0] == 404
        assert (await _post(http, "/v2/repository/models/nope/unload"))[0] == 404
        assert (await _post(http, "/v2/repository/models/Bad..Name/load"))[0] == 400
        status, body = await _post(http, "/v2/repository/models/digits/load",
                                   {"parameters": {"config": "{}"}})
        assert status == 400 and "config" in body["error"]
        assert (await _post(http, "/v2/repository/index", {"ready": "yes"}))[0] == 400


async def test_model_dir_server_lists_its_version_and_refuses_loads(
    template_registry: Path, tmp_path: Path
) -> None:
    version_dir = Registry(template_registry).path("digits", 1)
    srv = Server(ServerConfig(model_dir=version_dir, http_port=0, grpc_port=0, admin_token=TOKEN))
    await srv.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{srv.http_port}") as http:
            assert (await _post(http, "/v2/repository/index"))[1] == [
                {"name": "digits", "version": "1", "state": "READY"}]
            assert (await _post(http, "/v2/repository/models/other/load"))[0] == 409
    finally:
        await srv.stop()
