"""The built-in live traffic against a real server on loopback (``serving.app.Server`` on the
test's event loop, gRPC + HTTP on port 0), for a model that is not the digits: a regression
with two named inputs, ``demographics`` FP32 [-1, 4] and ``serum`` FP32 [-1, 6] ->
``progression`` FP32 [-1], like the diabetes task. Two versions serve half the traffic each;
each is off by its own error on every item, so its live RMSE is known exactly whichever items
it answered: the traffic sends both inputs by name, judges each answer with the task's metric
and finalizes (the root of the mean) per version."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from deploy.local.traffic import LiveData, LiveStats, TrafficConfig, TrafficGenerator
from kloop.artifact import Registry, TensorSpec
from serving.app import Server, ServerConfig
from serving.client import AdminClient
from trainer import served
from trainer.task import Metric

MODEL = "progression"
TOKEN = "test-token"
ERRORS = {1: 3.0, 2: -5.0}  # each version's error on every item: its live RMSE is |error|


def squared_error(out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return (out["progression"] - target) ** 2


RMSE = Metric("rmse", "lower", squared_error, finalize=math.sqrt)


class Truth(torch.nn.Module):
    """The target's own formula, off by ``error``."""

    def __init__(self, error: float) -> None:
        super().__init__()
        self.register_buffer("error", torch.tensor(error))

    def forward(self, demographics: torch.Tensor, serum: torch.Tensor) -> torch.Tensor:
        return demographics.sum(1) * 2 + serum.sum(1) + self.error


class Patients(Dataset[tuple[dict[str, torch.Tensor], torch.Tensor]]):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.demographics = torch.rand(n, 4, generator=g) * 100
        self.serum = torch.rand(n, 6, generator=g) * 10
        self.y = Truth(0.0)(self.demographics, self.serum)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"serum": self.serum[i], "demographics": self.demographics[i]}, self.y[i]


def publish(registry: Registry, work: Path) -> None:
    example = {"demographics": torch.zeros(2, 4), "serum": torch.zeros(2, 6)}
    for version, error in ERRORS.items():
        graph = served.ServedGraph(Truth(error), None, lambda out: {"progression": out},
                                   output_names=("progression",))
        path = served.save(served.export(graph, example), work / f"v{version}" / "model.pt2")
        registry.publish(
            MODEL, path.parent, model_file=path.name, format="torch.export",
            torch_version=torch.__version__,
            inputs=(TensorSpec("demographics", "FP32", (-1, 4)), TensorSpec("serum", "FP32", (-1, 6))),
            outputs=(TensorSpec("progression", "FP32", (-1,)),),
            metrics={"rmse": abs(error)}, params={}, data_fingerprint="test", run_id=f"v{version}",
            evaluation={"primary": "rmse", "metrics": {"rmse": {"direction": "lower", "threshold": None}}},
        )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    registry = Registry(tmp_path / "registry")
    publish(registry, tmp_path / "export")
    registry.set_alias(MODEL, "champion", 1)
    srv = Server(ServerConfig(registry=registry.root, http_port=0, grpc_port=0,
                              admin_token=TOKEN, grace_seconds=2.0))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)  # the server runs on this loop: yield to it


async def test_live_rmse_per_version_of_a_two_input_model(server: Server) -> None:
    http_url = f"http://127.0.0.1:{server.http_port}"
    admin = AdminClient(http_url, TOKEN)
    await asyncio.to_thread(admin.load, MODEL, 2)
    await asyncio.to_thread(admin.set_traffic, MODEL, {1: 50, 2: 50})
    data = LiveData.from_dataset(Patients(40), ["demographics", "serum"], RMSE)
    assert set(data.items[0][0]) == {"demographics", "serum"}
    assert data.items[0][0]["serum"].shape == (1, 6)
    cfg = TrafficConfig(model=MODEL, http_url=http_url,
                        grpc_target=f"127.0.0.1:{server.grpc_port}", rate_per_s=200)
    traffic = TrafficGenerator(cfg, data).start()
    try:
        await _until(lambda: all(traffic.by_version().get(str(v), LiveStats()).judged >= 20
                                 for v in ERRORS), 30, f"too few answers: {traffic.by_version()}")
    finally:
        await asyncio.to_thread(traffic.stop)
    assert traffic.error is None, traffic.error
    assert traffic.failures() == {}
    by_version = traffic.by_version()
    assert set(by_version) == {"1", "2"}
    for v, error in ERRORS.items():
        s = by_version[str(v)]
        assert s.errors == 0 and s.judged == s.requests
        assert s.value == pytest.approx(abs(error), rel=1e-4), (v, s)
    assert {p for p, _ in traffic.stats()} == {"grpc", "http"}  # both protocols judged


def test_the_live_value_is_the_finalized_mean_not_a_mean_of_roots() -> None:
    s = LiveStats(metric=RMSE)
    assert s.value is None  # nothing answered yet
    for squared in (1.0, 49.0):
        s.add(LiveStats(requests=1, total=squared, judged=1))
    s.add(LiveStats(requests=1, errors=1))  # an error is not judged
    assert (s.requests, s.errors, s.judged) == (3, 1, 2)
    assert s.value == pytest.approx(5.0)  # sqrt((1 + 49) / 2), not (1 + 7) / 2


def test_digits_traffic_is_judged_by_accuracy_of_its_labels() -> None:
    data = LiveData.for_task("digits", {}, max_items=50)
    assert data.metric.name == "accuracy" and data.metric.direction == "higher"
    assert len(data.items) == 50
    inputs, target = data.items[0]
    assert list(inputs) == ["image"] and inputs["image"].shape == (1, 1, 8, 8)
    right = {"label": torch.as_tensor(target), "logits": torch.zeros(1, 10)}
    assert float(data.metric.per_example(right, target).sum()) == 1.0


@pytest.mark.parametrize("address", ["http://10.1.2.3:8080", "http://example.com:80"])
def test_traffic_goes_to_loopback_only_unless_allowed(address: str) -> None:
    with pytest.raises(ValueError, match="not on loopback"):
        TrafficConfig(model=MODEL, http_url=address, grpc_target="127.0.0.1:1")
    TrafficConfig(model=MODEL, http_url=address, grpc_target="127.0.0.1:1", allow_remote=True)
    TrafficConfig(model=MODEL, http_url="http://localhost:1", grpc_target="[::1]:2")


def test_rate_and_workers_are_bounded() -> None:
    for bad in ({"rate_per_s": 0}, {"rate_per_s": 10_000}, {"concurrency": 1},
                {"concurrency": 1000}, {"duration_s": 0}):
        with pytest.raises(ValueError):
            TrafficConfig(model=MODEL, http_url="http://127.0.0.1:1", grpc_target="127.0.0.1:2",
                          **bad)
