"""The control plane's API over real HTTP (aiohttp on 127.0.0.1) and real gRPC (the generated
stub against grpc.aio), on a real store: auth, bad input, paging and filters, rollout
operations with optimistic concurrency (two writers racing: one wins, one conflicts), undo's
fast path, the OpenAPI document against the routes, and the service's /metrics.

No model server here and no training: runs are records written to the store as the pipeline
writes them, rollouts are created in the store and moved by their pure operations. The ticker
and the pipeline threads run in the slow tier (tests/slow/e2e/test_control_plane.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from google.protobuf.struct_pb2 import Struct

from deploy.control.http_api import make_app
from deploy.control.service import ControlPlane
from deploy.local.home import Home
from deploy.local.runs import Run
from deploy.rollout import Phase, RolloutPolicy, new_rollout
from kloop.pb import control_pb2 as pb
from kloop.pb import control_pb2_grpc as pb_grpc
from tests.support.artifacts import publish_dummy

TOKEN = "control-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOLD = RolloutPolicy.from_dict({"steps": [10, 50, 100], "min_duration_s": 3600.0,
                                "step_timeout_s": 7200.0})


class Api:
    def __init__(self, plane: ControlPlane, http: aiohttp.ClientSession, base: str,
                 stub: pb_grpc.ControlStub):
        self.plane, self.http, self.base, self.stub = plane, http, base, stub

    async def call(self, method: str, path: str, body: Any = None, *, token: bool = True,
                   raw: bytes | None = None) -> tuple[int, Any]:
        headers = dict(AUTH) if token else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(method, self.base + path, data=data, headers=headers) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text and r.content_type == "application/json"
                              else text)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    home = Home(tmp_path / "home")
    plane = ControlPlane(home, server=lambda: None, tick_interval_s=0.05)
    app = make_app(plane, TOKEN, ui=False)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server = grpc.aio.server()
    from deploy.control.grpc_api import add_to_server

    add_to_server(server, plane, TOKEN)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    async with aiohttp.ClientSession() as http:
        yield Api(plane, http, f"http://127.0.0.1:{port}", pb_grpc.ControlStub(channel))
    await channel.close()
    await server.stop(0)
    await runner.cleanup()


def _run(home: Home, model: str, created: float, status: str, accuracy: float) -> Run:
    run = Run(id=f"r{created:08.0f}-{model}", model=model, created=created,
              params={"spec": {"task": "digits", "epochs": int(created) % 7 + 1}, "label": ""},
              status=status, metrics={"accuracy": accuracy},
              evaluation={"primary": "accuracy", "metrics": {"accuracy": {"direction": "higher"}}},
              run_dir=str(home.runs_dir / f"r{created}"), finished=created + 5)
    return run


def _seed_runs(plane: ControlPlane, n: int) -> list[Run]:
    runs = []
    for i in range(n):
        run = _run(plane.home, "digits" if i % 3 else "wine", 1000.0 + i,
                   "failed" if i % 5 == 0 else "succeeded", 0.5 + i / (2 * n))
        plane.runs.save(run)
        runs.append(run)
    return runs


async def test_writes_need_the_token_reads_do_not(api: Api) -> None:
    status, body = await api.call("POST", "/api/v1/runs", {"spec": {"task": "digits"}}, token=False)
    assert status == 401 and "token" in body["error"]
    status, body = await api.call("GET", "/api/v1/runs", token=False)
    assert status == 200 and body == {"runs": [], "next_page_token": ""}
    async with api.http.post(api.base + "/api/v1/runs", data=b"{}",
                             headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
    # gRPC: a write without the token is UNAUTHENTICATED; a read is open
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.stub.CancelRun(pb.RunRequest(id="x"))
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    listed = await api.stub.ListRuns(pb.ListRunsRequest())
    assert list(listed.runs) == []


@pytest.mark.parametrize(("body", "says"), [
    ({"spec": {"task": "digits", "epochs": "3"}}, "epochs must be an integer"),
    ({"spec": {"task": "digits", "epochs": 2.5}}, "epochs must be an integer"),
    ({"spec": {"task": "digits"}, "label": 5}, "label must be a string"),
    ({"spec": {"task": "digits"}, "colour": "red"}, "unknown fields ['colour']"),
    ({"spec": "digits"}, "spec must be an object"),
    ({"spec": {"task": "no.such:Task"}}, "no.such"),
    ({"spec": {"task": "digits", "lr": 0.1}}, "unknown fields ['lr']"),
    ({"spec": {"task": "digits"}, "policy": {"min_requests": "100"}}, "policy.min_requests must be a whole number"),
    ({"spec": {"task": "digits"}, "policy": {"steps": [10, True]}}, "policy.steps must be a list of whole percents"),
    ({"spec": {"task": "digits"}, "policy": {"stepz": [10]}}, "unknown rollout policy fields"),
    ({"spec": {"task": "digits"}, "inject_fault": True}, "inject_fault must be"),
    ({}, "missing required fields ['spec']"),
    ([1, 2], "must be a JSON object"),
])
async def test_bad_input_is_400_with_a_message_and_nothing_starts(api: Api, body: Any,
                                                                  says: str) -> None:
    status, answer = await api.call("POST", "/api/v1/runs", body)
    assert status == 400, answer
    assert says in answer["error"]
    assert api.plane.live_runs() == []
    assert api.plane.runs.page().runs == []


async def test_bad_json_and_bad_query_parameters_are_400(api: Api) -> None:
    status, answer = await api.call("POST", "/api/v1/runs", raw=b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = await api.call("POST", "/api/v1/runs", raw=b'{"spec": {"task": "digits", "epochs": NaN}}')
    assert status == 400
    for query, says in [("page_size=0", "limit must be in 1..1000"),
                        ("page_size=ten", "page_size must be an integer"),
                        ("status=happy", "status 'happy' is not one of"),
                        ("page_token=garbage", "not one this service wrote"),
                        ("order_by=name", "order_by"), ("colour=red", "unknown query parameters"),
                        ("created_after=inf", "finite")]:
        status, answer = await api.call("GET", f"/api/v1/runs?{query}")
        assert status == 400 and says in answer["error"], (query, answer)


async def test_grpc_bad_input_is_invalid_argument(api: Api) -> None:
    spec = Struct()
    spec.update({"task": "digits", "epochs": 2.5})
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.stub.CreateRun(pb.CreateRunRequest(spec=spec), metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "epochs must be an integer" in (e.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.stub.GetRun(pb.GetRunRequest(id="nope"))
    assert e.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.stub.ListRuns(pb.ListRunsRequest(page_token="garbage"))
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_runs_are_listed_newest_first_in_keyset_pages_with_filters(api: Api) -> None:
    runs = await asyncio.to_thread(_seed_runs, api.plane, 120)
    seen: list[str] = []
    token = ""
    while True:
        status, page = await api.call("GET", f"/api/v1/runs?page_size=50&page_token={token}")
        assert status == 200
        seen += [r["id"] for r in page["runs"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == [r.id for r in sorted(runs, key=lambda r: r.created, reverse=True)]
    status, page = await api.call("GET", "/api/v1/runs?model=wine&status=failed&page_size=1000")
    want = [r.id for r in reversed(runs) if r.model == "wine" and r.status == "failed"]
    assert [r["id"] for r in page["runs"]] == want and want
    status, page = await api.call("GET", "/api/v1/runs?created_after=1010&created_before=1020"
                                         "&order_by=created%20asc")
    assert [r["created"] for r in page["runs"]] == [1000.0 + i for i in range(10, 20)]
    row = page["runs"][0]
    assert row["primary_metric"] == "accuracy" and row["direction"] == "higher"
    assert row["has_primary_value"] and row["primary_value"] == pytest.approx(0.5 + 10 / 240)
    # the same pages over gRPC, through the generated stub
    got: list[str] = []
    grpc_token = ""
    while True:
        resp = await api.stub.ListRuns(pb.ListRunsRequest(page_size=70, page_token=grpc_token))
        got += [r.id for r in resp.runs]
        grpc_token = resp.next_page_token
        if not grpc_token:
            break
    assert got == seen
    one = await api.stub.GetRun(pb.GetRunRequest(id=runs[7].id))
    assert one.model == runs[7].model and one.status == runs[7].status
    assert one.params["spec"]["task"] == "digits"


async def test_compare_diffs_parameters_and_lines_up_metrics(api: Api) -> None:
    runs = await asyncio.to_thread(_seed_runs, api.plane, 3)
    status, cmp = await api.call("GET", f"/api/v1/compare?ids={runs[1].id},{runs[2].id}")
    assert status == 200
    assert cmp["param_diff"] == {"spec.epochs": [runs[1].params["spec"]["epochs"],
                                                 runs[2].params["spec"]["epochs"]]}
    assert cmp["metrics"]["accuracy"] == [runs[1].metrics["accuracy"], runs[2].metrics["accuracy"]]
    status, answer = await api.call("GET", f"/api/v1/compare?ids={runs[1].id}")
    assert status == 400
    resp = await api.stub.CompareRuns(pb.CompareRunsRequest(ids=[runs[1].id, runs[2].id]))
    assert [r.id for r in resp.runs] == [runs[1].id, runs[2].id]


def _rollout(plane: ControlPlane, candidate: int, champion: int | None, *, id: str = "r1") -> str:
    r = new_rollout(id, "digits", candidate, champion, HOLD, plane.clock.now())
    plane.rollouts.create(r)
    return r.id


async def test_rollout_operations_race_one_wins_the_other_conflicts(api: Api) -> None:
    rid = await asyncio.to_thread(_rollout, api.plane, 2, 1)
    status, r = await api.call("GET", f"/api/v1/rollouts/{rid}")
    assert status == 200 and r["phase"] == "Pending" and not r["paused"]
    seen = r["resource_version"]
    # two writers who both read `seen`: one pause wins, the other is told the rollout moved
    (s1, a1), (s2, a2) = await asyncio.gather(
        api.call("POST", f"/api/v1/rollouts/{rid}/pause", {"resource_version": seen}),
        api.call("POST", f"/api/v1/rollouts/{rid}/pause", {"resource_version": seen,
                                                            "reason": "me too"}))
    assert sorted((s1, s2)) == [200, 409], (a1, a2)
    loser = a1 if s1 == 409 else a2
    assert "another writer moved it" in loser["error"] or "generation" in loser["error"]
    status, r = await api.call("GET", f"/api/v1/rollouts/{rid}")
    assert r["paused"] and r["resource_version"] != seen
    # without a resource_version the operation applies to the current state
    status, r = await api.call("POST", f"/api/v1/rollouts/{rid}/resume", {})
    assert status == 200 and not r["paused"]
    # promote before the gate passed: the state refuses it (409), with the reason
    status, answer = await api.call("POST", f"/api/v1/rollouts/{rid}/promote")
    assert status == 409 and "gate" in answer["error"]
    # gRPC: pause with a stale resource_version is FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.stub.PauseRollout(pb.RolloutActionRequest(id=rid, resource_version=seen),
                                    metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    paused = await api.stub.PauseRollout(pb.RolloutActionRequest(id=rid, reason="hold"),
                                         metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert paused.paused and paused.phase == "Pending"
    # abort: traffic back to the champion (the next tick applies it)
    status, r = await api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "enough"})
    assert status == 200 and r["phase"] == "RollingBack" and r["reason"] == "enough"
    status, answer = await api.call("POST", f"/api/v1/rollouts/{rid}/wiggle")
    assert status in (404, 405)
    status, answer = await api.call("POST", "/api/v1/rollouts/nope/pause")
    assert status == 404
    status, answer = await api.call("POST", f"/api/v1/rollouts/{rid}/pause",
                                    {"resource_version": 7})
    assert status == 400 and "resource_version must be a string" in answer["error"]


async def test_undo_to_a_former_champion_skips_the_gate_and_others_are_candidates(
        api: Api, tmp_path: Path) -> None:
    plane = api.plane
    await asyncio.to_thread(publish_dummy, plane.registry.root, "digits", 3)
    plane.registry.set_alias("digits", "champion", 2)

    def history() -> None:  # v1 was champion until v2 replaced it
        r = new_rollout("old", "digits", 2, 1, HOLD, 10.0)
        plane.rollouts.create(r)
        from dataclasses import replace
        plane.rollouts.save(replace(r, phase=Phase.SUCCEEDED), expected_generation=1)

    await asyncio.to_thread(history)
    status, r = await api.call("POST", "/api/v1/models/digits/undo", {"to_version": 1})
    assert status == 201, r
    assert r["undo"] and r["candidate"] == 1 and r["champion"] == 2
    status, answer = await api.call("POST", "/api/v1/models/digits/undo", {"to_version": 3})
    assert status == 409 and "active rollout" in answer["error"]  # one active rollout per model
    await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort")
    await asyncio.to_thread(_finish_abort, plane, r["id"])
    undo3 = await api.stub.UndoRollout(pb.UndoRolloutRequest(model="digits", to_version=3),
                                       metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert not undo3.undo and undo3.candidate == 3  # never champion: gate and steps
    for body, code in [({"to_version": 2}, 409), ({"to_version": 9}, 404),
                       ({"to_version": "1"}, 400), ({"to_version": True}, 400), ({}, 400)]:
        status, answer = await api.call("POST", "/api/v1/models/digits/undo", body)
        assert status == code, (body, answer)
    status, model = await api.call("GET", "/api/v1/models/digits")
    assert [v["version"] for v in model["versions"]] == [3, 2, 1]
    assert model["aliases"] == {"champion": 2}
    assert model["active_rollout"] == undo3.id
    assert next(v for v in model["versions"] if v["version"] == 2)["rollouts"] == ["old"]


def _finish_abort(plane: ControlPlane, rid: str) -> None:
    from dataclasses import replace

    r = plane.rollouts.get(rid)
    plane.rollouts.save(replace(r, phase=Phase.ABORTED), expected_generation=r.generation)


async def test_the_openapi_document_lists_every_route(api: Api) -> None:
    status, doc = await api.call("GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app = make_app(api.plane, TOKEN, ui=False)
    served = {(r.method, r.resource.canonical.replace("{id}", "{id}"))
              for r in app.router.routes() if r.resource is not None
              and r.resource.canonical.startswith("/api/v1") and r.method != "HEAD"
              and not r.resource.canonical.endswith("openapi.json")}
    assert served == documented
    for schema in doc["components"]["schemas"].values():
        for prop in schema["properties"].values():
            ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
            if ref:
                assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
    assert doc["paths"]["/api/v1/runs"]["post"]["security"] == [{"bearer": []}]


async def test_service_metrics_count_runs_and_export_rollout_phase_and_weight(api: Api) -> None:
    await asyncio.to_thread(_seed_runs, api.plane, 10)
    await asyncio.to_thread(publish_dummy, api.plane.registry.root, "digits", 2)

    def progressing() -> None:
        from dataclasses import replace
        r = new_rollout("m1", "digits", 2, 1, HOLD, 5.0)
        api.plane.rollouts.create(r)
        api.plane.rollouts.save(replace(r, phase=Phase.PROGRESSING, step=1,
                                        weights={2: 50, 1: 50}), expected_generation=1)

    await asyncio.to_thread(progressing)
    status, text = await api.call("GET", "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert 'kloop_control_runs{status="failed"} 2.0' in lines
    assert 'kloop_control_runs{status="succeeded"} 8.0' in lines
    assert 'kloop_rollout_phase{model="digits",phase="Progressing"} 1.0' in lines
    assert 'kloop_rollout_phase{model="digits",phase="Succeeded"} 0.0' in lines
    assert 'kloop_rollout_canary_weight{model="digits"} 50.0' in lines


async def test_more_bad_input_is_400_not_500(api: Api, tmp_path: Path) -> None:
    for body in [{"model": "Bad Name", "candidate": "1"}, {"model": "digits", "candidate": "Foo"},
                 {"model": "digits", "candidate": -1}]:
        status, answer = await api.call("POST", "/api/v1/rollouts", body)
        assert status in (400, 404), (body, status, answer)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.stub.CreateRollout(pb.CreateRolloutRequest(model="Bad Name", candidate="1"),
                                     metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    code = tmp_path / "code"
    code.mkdir()
    (code / "boom_task.py").write_text("raise RuntimeError('boom at import')\n")
    status, answer = await api.call("POST", "/api/v1/runs", {
        "spec": {"task": "boom_task:Task"}, "pythonpath": [str(code)]})
    assert status == 400 and "boom at import" in answer["error"], answer
    status, answer = await api.call("POST", "/api/v1/models/Bad Name/undo", {"to_version": 1})
    assert status in (400, 404), answer


async def test_a_request_for_another_host_name_is_refused(api: Api) -> None:
    """DNS rebinding: a page whose domain now resolves to 127.0.0.1 cannot read the API."""
    async with api.http.get(api.base + "/api/v1/runs", headers={"Host": "evil.example:80"}) as r:
        assert r.status == 421
    async with api.http.get(api.base + "/api/v1/runs", headers={"Host": "localhost"}) as r:
        assert r.status == 200


async def test_a_watch_sends_progress_with_nan_as_null_and_ends(api: Api) -> None:
    run = _run(api.plane.home, "digits", 5000.0, "failed", float("nan"))
    train = Path(run.run_dir) / "train"
    train.mkdir(parents=True)
    (train / "progress.jsonl").write_text(
        json.dumps({"event": "start", "time": 1.0, "epochs": 2, "start_epoch": 1}) + "\n"
        + json.dumps({"event": "epoch", "time": 2.0, "epoch": 1, "epochs": 2, "steps": 3,
                      "loss": float("nan"), "held_out": {"accuracy": float("nan")},
                      "samples_per_s": 10.0}) + "\n")
    (Path(run.run_dir) / "pipeline.log").write_text("a line\n")
    await asyncio.to_thread(api.plane.runs.save, run)
    async with api.http.get(api.base + f"/api/v1/runs/{run.id}/watch") as r:
        text = await r.text()
    kinds = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds[-1] == "end" and {"log", "progress", "run"} <= set(kinds), kinds
    progress = next(json.loads(block.split("data: ", 1)[1]) for block in text.split("\n\n")
                    if block.startswith("event: progress"))
    assert progress["events"][-1]["loss"] is None and progress["percent"] == 50.0
