"""The native front end's fast lane (serving/grpc/native/grpc_front.cpp, serving/grpc/native/server.py)
never changes an answer: two real ``python -m serving`` processes on one registry, one with the
lane and one without (``--no-grpc-fast-lane``), get the same bytes, and every byte of every
answer (status, details, response message) must agree, for well-formed requests the lane takes
and for any other (property-based: messages the lane must refuse, byte-level damage). Then what
the lane adds: it does take the common request (its counter), concurrent requests each get
their own rows, and it follows traffic weights, faults and loads at once."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kloop.faults import Fault
from kloop.pb import inference_pb2 as pb
from serving.client import AdminClient
from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.support.serving import MODEL, reference, require_native, wait_for_file

INFER = "/inference.GRPCInferenceService/ModelInfer"
TOKEN = "fast-token"


class Proc:
    def __init__(self, processes: Processes, root: Path, work: Path, *extra: str) -> None:
        ports_file = work / "ports.json"
        env = {**os.environ, "KLOOP_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
        self.processes = processes
        self.proc = processes.spawn(
            [sys.executable, "-m", "serving", "--registry", f"file://{root}", "--http-port", "0",
             "--grpc-port", "0", "--grpc-server", "native", "--ports-file", str(ports_file),
             *extra],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        ports = wait_for_file(ports_file, self.proc)
        self.admin = AdminClient(f"http://127.0.0.1:{ports['http']}", TOKEN)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
        self.target = f"127.0.0.1:{ports['grpc']}"
        self._infer = self.channel.unary_unary(INFER)  # bytes in, bytes out

    def call(self, body: bytes) -> tuple[str, str, bytes]:
        """(status, details, response bytes): the whole answer, comparable."""
        try:
            return "OK", "", self._infer(body, timeout=10)
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", b""

    def fast_count(self) -> float:
        text = self.admin.metrics_text()
        return sum(float(v) for v in re.findall(
            r"^kloop_inference_fast_lane_requests_total\{[^}]*\} (\S+)$", text, re.M))

    def close(self) -> None:
        self.channel.close()
        self.processes.stop(self.proc, grace_s=30)


@pytest.fixture(scope="module")
def servers(template_registry: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    """(with the fast lane, without), each serving versions 1 and 2, all traffic on 2."""
    require_native()
    root = tmp_path_factory.mktemp("fast-registry") / "registry"
    shutil.copytree(template_registry, root)
    procs: list[Proc] = []
    children = Processes()  # the module's own: the servers live as long as its tests
    try:
        for name, extra in (("fast", ()), ("general", ("--no-grpc-fast-lane",))):
            # One graph for both: "auto" measures at load, and two processes may choose
            # differently on a near-tie (oneDNN's sums round differently from the trace's).
            procs.append(Proc(children, root, tmp_path_factory.mktemp(name), "--optimize", "trace",
                              *extra))
            procs[-1].admin.load(MODEL, 1)
            # The lane's table catches up with a change at the next call, which itself takes
            # the general path (it was routed by the table before): make that call now.
            assert procs[-1].call(request(images(1)).SerializeToString())[0] == "OK"
        yield procs[0], procs[1]
    finally:
        for p in procs:
            p.close()
        children.close()


def request(images: np.ndarray, **kw: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL, **kw)
    req.inputs.add(name="image", datatype="FP32", shape=images.shape)
    req.raw_input_contents.append(images.tobytes())
    return req


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, 8, 8), dtype=np.float32)


def same_answer(servers: tuple[Proc, Proc], body: bytes) -> tuple[str, str, bytes]:
    fast, general = servers
    answer = fast.call(body)
    assert answer == general.call(body)
    return answer


def test_the_common_request_takes_the_lane_and_gets_the_general_paths_bytes(
        servers: tuple[Proc, Proc]) -> None:
    fast, general = servers
    before = fast.fast_count()
    bodies = [request(images(rows, rows), id=rid, model_version=version).SerializeToString()
              for rows in (1, 3, 32) for rid in ("", "req-7") for version in ("", "1", "2")]
    for body in bodies:
        status, _, payload = same_answer(servers, body)
        assert status == "OK"
    assert fast.fast_count() - before == len(bodies)
    assert general.fast_count() == 0
    # And the answer is the model's: version 2 unless pinned, the caller's id, its own rows.
    resp = pb.ModelInferResponse.FromString(fast.call(bodies[-1])[2])
    assert (resp.model_name, resp.model_version, resp.id) == (MODEL, "2", "req-7")
    want_logits, want_label = reference(2, images(32, 32))
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(32, 10),
                               want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[1], "<i8"), want_label)


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_wire_forms_protobuf_allows_are_understood_and_the_rest_is_left_alone(
        servers: tuple[Proc, Proc]) -> None:
    """Unpacked shape, a repeated singular field (the last counts), and an unknown field (the
    lane leaves it to the general path): each answered as the general path answers it."""
    fast = servers[0]
    data = images(2).tobytes()
    unpacked = b"".join(_varint(3 << 3) + _varint(d) for d in (2, 1, 8, 8))
    tensor = _field(1, b"image") + _field(2, b"FP32") + unpacked
    body = _field(1, b"other") + _field(1, MODEL.encode()) + _field(5, tensor) + _field(7, data)
    before = fast.fast_count()
    assert same_answer(servers, body)[0] == "OK"
    assert same_answer(servers, body + _field(99, b"x"))[0] == "OK"  # kept as unknown
    assert fast.fast_count() - before == 1


@st.composite
def variations(draw: st.DrawFn) -> bytes:
    """The common request with a few things changed, some of which the lane must refuse, and
    now and then bytes damaged after serialising."""
    rows = draw(st.sampled_from([1, 2, 33]))
    msg = request(images(rows, draw(st.integers(0, 3))), id=draw(st.sampled_from(["", "a", "é"])),
                  model_version=draw(st.sampled_from(["", "1", "2", "3", "x"])))
    changes = draw(st.lists(st.sampled_from([
        "model", "name", "datatype", "dim", "rank", "rows", "short-raw", "extra-raw", "no-raw",
        "parameter", "input-parameter", "output", "typed", "second-input"]), max_size=2))
    t = msg.inputs[0]
    for change in changes:
        if change == "model":
            msg.model_name = "nope"
        elif change == "name":
            t.name = "img"
        elif change == "datatype":
            t.datatype = draw(st.sampled_from(["FP64", "FP16", "BOOL", "BYTES", ""]))
        elif change == "dim":
            t.shape[2] = 7
        elif change == "rank":
            t.shape.pop()
        elif change == "rows":
            t.shape[0] = draw(st.sampled_from([0, rows + 1]))
        elif change == "short-raw" and msg.raw_input_contents:
            msg.raw_input_contents[0] = msg.raw_input_contents[0][:-4]
        elif change == "extra-raw":
            msg.raw_input_contents.append(b"\0" * 4)
        elif change == "no-raw":
            del msg.raw_input_contents[:]
        elif change == "parameter":
            msg.parameters["timeout"].int64_param = draw(st.sampled_from([0, 10**7, -1]))
        elif change == "input-parameter":
            t.parameters["binary_data_size"].int64_param = 4
        elif change == "output":
            msg.outputs.add(name=draw(st.sampled_from(["label", "probs"])))
        elif change == "typed":
            t.contents.fp32_contents.extend([0.0] * 4)
        elif change == "second-input":
            msg.inputs.add(name="image", datatype="FP32", shape=list(t.shape))
            msg.raw_input_contents.extend(msg.raw_input_contents[:1])
    body = msg.SerializeToString()
    damage = draw(st.sampled_from(["none", "none", "truncate", "append"]))
    if damage == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif damage == "append":
        body += draw(st.binary(min_size=1, max_size=6))
    return body


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=variations())
def test_no_request_gets_a_different_answer_from_the_lane(
        servers: tuple[Proc, Proc], body: bytes) -> None:
    same_answer(servers, body)


async def test_concurrent_requests_each_get_their_own_rows(servers: tuple[Proc, Proc]) -> None:
    fast = servers[0]
    before = fast.fast_count()
    rng = np.random.default_rng(5)
    sent = [(f"c-{i}", images(int(rng.integers(1, 5)), i)) for i in range(96)]
    async with grpc.aio.insecure_channel(fast.target) as channel:
        infer = channel.unary_unary(INFER)
        answers = await asyncio.gather(*(
            infer(request(x, id=rid).SerializeToString(), timeout=30) for rid, x in sent))
    for (rid, x), raw in zip(sent, answers, strict=True):
        resp = pb.ModelInferResponse.FromString(raw)
        assert resp.id == rid and list(resp.outputs[0].shape) == [len(x), 10]
        want_logits, want_label = reference(2, x)
        np.testing.assert_allclose(
            np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(len(x), 10), want_logits,
            rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[1], "<i8"),
                                      want_label)
    assert fast.fast_count() - before == len(sent)


def test_weights_faults_and_unloads_apply_to_the_very_next_request(
        servers: tuple[Proc, Proc]) -> None:
    fast = servers[0]
    x = images(1)
    plain = request(x).SerializeToString()
    pinned = {v: request(x, model_version=v).SerializeToString() for v in ("1", "2")}
    try:
        # A split: unversioned requests are drawn per request, so they leave the lane, and
        # both versions answer them; pinned ones stay in it.
        fast.admin.set_traffic(MODEL, {1: 50, 2: 50})
        before = fast.fast_count()
        seen = {pb.ModelInferResponse.FromString(fast.call(plain)[2]).model_version
                for _ in range(40)}
        assert seen == {"1", "2"}
        assert fast.fast_count() == before
        assert fast.call(pinned["1"])[0] == "OK"
        assert fast.fast_count() == before + 1
        # A fault on version 1: its very next request gets it.
        fast.admin.set_fault(MODEL, 1, Fault(error_rate=1.0))
        assert fast.call(pinned["1"])[:2] == ("INTERNAL", "injected fault")
        fast.admin.clear_fault(MODEL, 1)
        assert fast.call(pinned["1"])[0] == "OK"
        # Back to one version: unversioned requests return to the lane, and an unloaded
        # version is gone for them at once.
        fast.admin.set_traffic(MODEL, {2: 100})
        fast.admin.unload(MODEL, 1)
        before = fast.fast_count()
        assert fast.call(pinned["1"])[0] == "NOT_FOUND"
        status, _, raw = fast.call(plain)
        assert status == "OK" and pb.ModelInferResponse.FromString(raw).model_version == "2"
        assert fast.fast_count() == before + 1
    finally:  # the module's servers go on as they started
        fast.admin.set_traffic(MODEL, {2: 100})
        if 1 in fast.admin.traffic(MODEL):
            fast.admin.clear_fault(MODEL, 1)
        else:
            fast.admin.load(MODEL, 1)


def test_lane_requests_are_counted_like_any_other(servers: tuple[Proc, Proc]) -> None:
    fast = servers[0]

    def counts() -> tuple[float, float, float]:
        text = fast.admin.metrics_text()

        def one(name: str) -> float:
            m = re.search(rf'^{name}\{{[^}}]*model="{MODEL}"[^}}]*version="2"[^}}]*\}} (\S+)$',
                          text, re.M)
            return float(m.group(1)) if m else 0.0

        return (one("kloop_inference_requests_total"),
                one("kloop_inference_request_duration_seconds_count"),
                one("kloop_inference_queue_seconds_count"),
                one("kloop_inference_fast_lane_requests_total"))

    body = request(images(2)).SerializeToString()
    # After the changes earlier tests made, the first call still takes the general path (it
    # was routed by the table before, see the fixture).
    assert fast.call(body)[0] == "OK"
    before = counts()
    for _ in range(20):  # past the batches a fast model is measured on before it runs inline
        assert fast.call(body)[0] == "OK"
    after = counts()
    assert [a - b for a, b in zip(after, before, strict=True)] == [20, 20, 20, 20]
    inflight = re.search(r"^kloop_inference_inflight_requests (\S+)$", fast.admin.metrics_text(),
                         re.M)
    assert inflight is not None and float(inflight.group(1)) == 0
