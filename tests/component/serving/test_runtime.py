"""How a loaded program runs (serving.core.runtime), and the server's hot-path shortcuts: the
metrics' label cache, FaultInjector.active and the ServerConfig flags for both.

Models are built and exported here, each small: tracing and exporting cost well under a second.
Everything runs on CPU; the CUDA paths (cudagraph, dtype) are only checked for being refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kloop.artifact import Manifest, TensorSpec
from kloop.faults import Fault
from serving.app import ServerConfig
from serving.core import runtime
from serving.core.batching import BatchPolicy
from serving.core.errors import InferenceFailed
from serving.core.faults import FaultInjector
from serving.core.runtime import ModelRunner, RuntimeOptions, prepare
from serving.metrics import ServerMetrics

WIDTH = 4


def manifest(*inputs: TensorSpec, outputs: tuple[TensorSpec, ...] = ()) -> Manifest:
    return Manifest(
        name="m", version=1, created=0.0, framework="pytorch", torch_version=torch.__version__,
        format="torch.export", model_file="model.pt2", inputs=inputs,
        outputs=outputs or (TensorSpec("y", "FP32", (-1, WIDTH)),), metrics={}, params={},
        data_fingerprint="test", run_id="test", files={},
    )


BATCH_ONLY = manifest(TensorSpec("x", "FP32", (-1, WIDTH)))


def export(module: torch.nn.Module, *dims: int) -> torch.nn.Module:
    """``module`` exported on a (2, WIDTH) example, dynamic in ``dims`` (0: the batch)."""
    names = {0: "batch", 1: "width"}
    shapes = {"x": {d: torch.export.Dim(names[d], min=1, max=1024) for d in dims}}
    program = torch.export.export(module.eval(), (torch.randn(2, WIDTH),), dynamic_shapes=shapes)
    return program.module()


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(WIDTH, WIDTH)
        self.bn = torch.nn.BatchNorm1d(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.fc(x)))


class BakesTheBatch(torch.nn.Module):
    """Exports fine with a dynamic batch, but a trace records ``torch.full``'s size as the
    traced batch (2): at batch 1 the result broadcasts to 2 rows, at batch 3 it fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.full((x.shape[0], 1), 1.0)


class Doubles(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def run(runner: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return runner(x)


# ---- prepare --------------------------------------------------------------------------------


def test_trace_agrees_with_the_exported_module_at_every_batch_size() -> None:
    module = export(Linear(), 0)
    runner = prepare(module, BATCH_ONLY, RuntimeOptions(optimize="trace"))
    assert runner.strategy == "trace"
    assert isinstance(runner._fn, torch.jit.ScriptModule)  # what runs is the frozen graph
    for rows in range(1, 6):
        x = torch.randn(rows, WIDTH)
        torch.testing.assert_close(run(runner, x), run(module, x), rtol=1e-4, atol=1e-5)


def test_a_trace_that_bakes_in_the_batch_size_is_caught_and_not_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = export(BakesTheBatch(), 0)
    with caplog.at_level(logging.WARNING, logger="serving.core.runtime"):
        runner = prepare(module, BATCH_ONLY, RuntimeOptions(optimize="trace"))
    assert runner.strategy == "none"
    assert runner._fn is module
    assert "disagrees" in caplog.text  # found by the check, not by an error while tracing
    for rows in range(1, 6):
        x = torch.randn(rows, WIDTH)
        torch.testing.assert_close(run(runner, x), x + 1)


def test_a_model_with_a_second_dynamic_dim_is_not_traced() -> None:
    module = export(Doubles(), 0, 1)
    m = manifest(TensorSpec("x", "FP32", (-1, -1)), outputs=(TensorSpec("y", "FP32", (-1, -1)),))
    runner = prepare(module, m, RuntimeOptions())
    assert runner.strategy == "none" and runner._fn is module
    for width in (1, 3, 7):  # what a trace at width 4 could have got wrong
        x = torch.randn(2, width)
        torch.testing.assert_close(run(runner, x), x * 2)


def test_optimize_none_keeps_the_exported_module() -> None:
    module = export(Linear(), 0)
    runner = prepare(module, BATCH_ONLY, RuntimeOptions(optimize="none"))
    assert runner.strategy == "none" and runner._fn is module
    assert runner.pad_to == () and runner.max_rows is None
    x = torch.randn(3, WIDTH)
    torch.testing.assert_close(run(runner, x), run(module, x))


class SmallConv(torch.nn.Module):
    """Conv + BN + ReLU and a linear head: what optimize_for_inference hands to oneDNN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


IMAGE = manifest(TensorSpec("x", "FP32", (-1, 3, 8, 8)))


def export_conv() -> torch.nn.Module:
    program = torch.export.export(SmallConv().eval(), (torch.randn(2, 3, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    return program.module()


def test_onednn_graph_runs_and_agrees_with_the_exported_module() -> None:
    module = export_conv()
    runner = prepare(module, IMAGE, RuntimeOptions(optimize="onednn"))
    assert runner.strategy == "onednn"
    for rows in range(1, 6):
        x = torch.randn(rows, 3, 8, 8)
        torch.testing.assert_close(run(runner, x), run(module, x), rtol=1e-4, atol=1e-5)
    # What ran is the oneDNN graph, not a plan compiled before the pass (see runtime._onednn)
    assert "mkldnn_convolution" in str(torch.jit.last_executed_optimized_graph())


@pytest.mark.parametrize(("share", "strategy"), [(0.78, "onednn"), (0.99, "trace")])
def test_auto_on_cpu_runs_onednn_only_when_it_measures_faster(
    monkeypatch: pytest.MonkeyPatch, share: float, strategy: str
) -> None:
    measured: list[tuple[list[str], int]] = []

    def relative_time(candidates: dict[str, Any], m: Manifest, max_rows: int,
                      clock: Any = None) -> tuple[dict[str, float], int]:
        measured.append((list(candidates), max_rows))
        return {"trace": 1.0, "onednn": share}, max_rows

    monkeypatch.setattr(runtime, "relative_time", relative_time)
    module = export_conv()
    runner = prepare(module, IMAGE, RuntimeOptions(), BatchPolicy(max_batch_size=16))  # "auto"
    assert runner.strategy == strategy
    assert measured == [(["trace", "onednn"], 16)]  # timed at the batcher's largest batch
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(run(runner, x), run(module, x), rtol=1e-4, atol=1e-5)


def test_trace_and_onednn_strategies_measure_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def relative_time(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("only auto measures")

    monkeypatch.setattr(runtime, "relative_time", relative_time)
    assert prepare(export_conv(), IMAGE, RuntimeOptions(optimize="trace")).strategy == "trace"
    assert prepare(export_conv(), IMAGE, RuntimeOptions(optimize="onednn")).strategy == "onednn"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def costing(clock: FakeClock, per_row_s: float, seen: list[int],
            extra: list[float] | None = None) -> Any:
    """A candidate graph that 'takes' ``per_row_s`` a row on ``clock`` (plus, once each, the
    delays in ``extra``: a busy spell on the box) and records the batch sizes it ran."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        clock.now += per_row_s * x.shape[0] + (extra.pop(0) if extra else 0.0)
        return x
    return fn


def test_relative_time_is_each_candidates_best_time_against_the_first() -> None:
    clock = FakeClock()
    seen_a: list[int] = []
    seen_b: list[int] = []
    # b is twice as fast, but its first timed calls hit a busy spell: the best call counts.
    a = costing(clock, 0.001, seen_a)
    b = costing(clock, 0.0005, seen_b, extra=[0.0, 0.0, 5.0, 5.0])  # warm-ups, then 2 slow
    share, rows = runtime.relative_time({"a": a, "b": b}, BATCH_ONLY, 32, clock)
    assert rows == 32
    assert share["a"] == 1.0
    assert share["b"] == pytest.approx(0.5)
    assert set(seen_a) == set(seen_b) == {1, 32}
    assert seen_b.count(1) == seen_b.count(32) == 1 + runtime.MEASURE_ROUNDS  # warm-up + rounds


def test_relative_time_halves_the_batch_until_a_call_fits_the_budget() -> None:
    clock = FakeClock()
    seen: list[int] = []
    slow = costing(clock, 0.02, seen)  # 32 rows: 0.64 s, 16: 0.32 s, 8: 0.16 s
    share, rows = runtime.relative_time({"trace": slow, "onednn": slow}, BATCH_ONLY, 32, clock)
    assert rows == 8
    assert seen[:3] == [32, 16, 8]  # the probes
    assert set(seen[3:]) == {1, 8}
    assert share == {"trace": 1.0, "onednn": 1.0}


def test_keep_onednn_needs_a_clear_margin() -> None:
    for per_row, keep in ((0.001 * 0.9, True), (0.001 * 0.97, False)):
        clock = FakeClock()
        candidates = {"trace": costing(clock, 0.001, []), "onednn": costing(clock, per_row, [])}
        assert runtime._keep_onednn(candidates, BATCH_ONLY, 32, "m v1", clock) is keep


def test_compile_without_preferred_sizes_traces_instead() -> None:
    assert RuntimeOptions(optimize="compile").strategy(BATCH_ONLY, BatchPolicy()) == "trace"
    assert RuntimeOptions().strategy(BATCH_ONLY, BatchPolicy()) == "trace"  # "auto" on CPU


# ---- padding --------------------------------------------------------------------------------


def test_padding_rounds_up_to_a_graph_size_and_cuts_the_answer_back() -> None:
    seen: list[int] = []

    def rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(x.shape[0])
        return x * 2, x.sum(1)

    runner = ModelRunner(rowwise, options=RuntimeOptions(optimize="none"), strategy="compile",
                         pad_to=(8, 4))
    assert runner.pad_to == (4, 8) and runner.max_rows == 8
    for rows, padded in ((3, 4), (4, 4), (5, 8), (9, 9)):  # 9: larger than every graph
        x = torch.randn(rows, WIDTH)
        doubled, summed = runner(x)
        assert seen[-1] == padded
        assert doubled.shape == (rows, WIDTH) and summed.shape == (rows,)
        torch.testing.assert_close(doubled, x * 2)
        torch.testing.assert_close(summed, x.sum(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_give_each_batch_its_own_outputs_in_the_declared_dtype() -> None:
    module = export(Linear(), 0)
    reference = Linear().eval()
    options = RuntimeOptions(device="cuda", dtype="fp16", optimize="cudagraph")
    runner = prepare(module, BATCH_ONLY, options, BatchPolicy(preferred_batch_sizes=(2, 4)))
    assert runner.strategy == "cudagraph" and runner.pad_to == (2, 4)
    for rows in (1, 3, 4, 3):  # padded to 2 and 4: replays of the captured graphs
        x = torch.randn(rows, WIDTH)
        out = run(runner, x)
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        torch.testing.assert_close(out, run(reference, x), rtol=2e-2, atol=2e-2)


# ---- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"optimize": "fast"}, "optimize must be one of"),
    ({"device": "tpu"}, "device must be cpu, cuda or cuda:N"),
    ({"dtype": "int4", "device": "cuda"}, "dtype must be one of"),
    ({"dtype": "bf16"}, "reduced dtype is for GPUs"),
    ({"optimize": "cudagraph"}, "CUDA graphs need a CUDA device"),
    ({"optimize": "onednn", "device": "cuda"}, "oneDNN"),
])
def test_runtime_options_reject_bad_combinations(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeOptions(**kwargs)


def test_runtime_options_accept_gpu_settings_and_take_the_batchers_sizes() -> None:
    options = RuntimeOptions(device="cuda:1", dtype="fp16", optimize="cudagraph")
    batching = BatchPolicy(preferred_batch_sizes=(8, 1, 4))
    assert options.cuda and batching.preferred_batch_sizes == (1, 4, 8)
    assert options.strategy(BATCH_ONLY, batching) == "cudagraph"
    assert RuntimeOptions(device="cuda").strategy(BATCH_ONLY, batching) == "cudagraph"  # auto
    assert RuntimeOptions(device="cuda").strategy(BATCH_ONLY, BatchPolicy()) == "trace"
    assert not RuntimeOptions().cuda


# ---- server configuration -------------------------------------------------------------------


def test_server_config_defaults_intra_op_threads_to_the_cores(tmp_path: Path) -> None:
    config = ServerConfig(registry=tmp_path)
    assert isinstance(config.intra_op_threads, int) and config.intra_op_threads >= 1
    assert config.runtime == RuntimeOptions() and config.batching == BatchPolicy()


@pytest.mark.parametrize("kwargs, message", [
    ({"model_instances": 0}, "model_instances"),
    ({"inline_batch_ms": -0.1}, "inline_batch_ms"),
    ({"inline_batch_ms": 100.5}, "inline_batch_ms"),
    ({"runtime": {"optimize": "bogus"}}, "optimize"),
    ({"runtime": {"dtype": "fp16"}}, "dtype"),  # on the default device, cpu
])
def test_server_config_rejects_bad_runtime_flags(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):  # the nested options check their own
        if "runtime" in kwargs:
            kwargs = {**kwargs, "runtime": RuntimeOptions(**kwargs["runtime"])}
        ServerConfig(registry=tmp_path, **kwargs)


@pytest.mark.parametrize("ms", [0.0, 100.0])
def test_server_config_accepts_inline_batch_ms_bounds(tmp_path: Path, ms: float) -> None:
    assert ServerConfig(registry=tmp_path, inline_batch_ms=ms).inline_batch_ms == ms


# ---- hot-path shortcuts ---------------------------------------------------------------------


def sample(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_metrics_label_cache_counts_every_observation() -> None:
    metrics = ServerMetrics()
    labels = {"model": "m", "version": "1", "protocol": "grpc"}
    metrics.observe("m", "1", "grpc", 0.01, None)
    metrics.observe("m", "1", "grpc", 0.02, None)
    metrics.observe("m", "1", "rest", 0.03, None)
    assert sample(metrics, "kloop_inference_requests_total", **labels) == 2.0
    assert sample(metrics, "kloop_inference_request_duration_seconds_count", **labels) == 2.0
    assert sample(metrics, "kloop_inference_request_duration_seconds_sum",
                  **labels) == pytest.approx(0.03)
    metrics.observe_batch("m", "1", 3, [0.001, 0.002, 0.003], 0.01)
    metrics.observe_batch("m", "1", 2, [0.001, 0.002], 0.01)
    assert sample(metrics, "kloop_inference_batch_size_sum", model="m", version="1") == 5.0
    assert sample(metrics, "kloop_inference_queue_seconds_count", model="m", version="1") == 5.0
    assert b'kloop_inference_requests_total{model="m",protocol="grpc",version="1"} 2.0' \
        in metrics.exposition()


def test_metrics_unload_drops_the_versions_cached_labels_only() -> None:
    metrics = ServerMetrics()
    for version in ("1", "2"):
        metrics.model_loaded("m", int(version), True)
        metrics.observe("m", version, "grpc", 0.01, InferenceFailed("boom"))
        metrics.observe_batch("m", version, 1, [0.001], 0.01)
    metrics.model_loaded("m", 1, False)
    assert {k[:2] for k in metrics._request_children} == {("m", "2")}
    assert {k[:2] for k in metrics._batch_children} == {("m", "2")}
    assert sample(metrics, "kloop_model_loaded", model="m", version="1") == 0.0
    metrics.observe("m", "1", "grpc", 0.01, None)  # reloaded later: counting goes on
    assert sample(metrics, "kloop_inference_requests_total",
                  model="m", version="1", protocol="grpc") == 2.0
    assert sample(metrics, "kloop_inference_errors_total",
                  model="m", version="1", protocol="grpc", code="500") == 1.0


def test_bulk_histogram_updates_agree_with_prometheus_clients_observe() -> None:
    """_observe_all works on prometheus_client's histogram internals: the same values give the
    same buckets and count as observe() one by one (bounds themselves included), and the same
    sum up to float rounding (one sum() of the values, not 500 additions: Python 3.12's sum()
    compensates rounding, which the one-by-one additions do not)."""
    from prometheus_client import CollectorRegistry, Histogram

    from serving.metrics import DURATION_BUCKETS, _observe_all

    rng = np.random.default_rng(7)
    values = [0.0, *DURATION_BUCKETS, 1e9, *rng.exponential(0.01, 500).tolist()]
    registry = CollectorRegistry()
    one_by_one = Histogram("a", "a", ["k"], buckets=DURATION_BUCKETS, registry=registry)
    in_bulk = Histogram("b", "b", ["k"], buckets=DURATION_BUCKETS, registry=registry)
    for v in values:
        one_by_one.labels("x").observe(v)
    _observe_all(in_bulk.labels("x"), values)
    samples = {m.name: [(s.name[1:], s.labels, s.value) for s in m.samples
                        if not s.name.endswith("_created")]  # when the child was made
               for m in registry.collect()}
    assert len(samples["a"]) == len(DURATION_BUCKETS) + 3  # the buckets, +Inf, count, sum
    exact = [s for s in samples["a"] if s[0] != "_sum"]
    assert [s for s in samples["b"] if s[0] != "_sum"] == exact  # names differ in their 1st letter
    (sum_a,), (sum_b,) = ([v for n, _, v in samples[k] if n == "_sum"] for k in ("a", "b"))
    assert sum_b == pytest.approx(sum_a, rel=1e-12)


def test_observations_wait_for_a_scrape_or_until_enough_wait() -> None:
    """The hot path only queues an observation; reading the registry applies what waits, and
    PENDING_MAX waiting are applied without a scrape (memory stays bounded)."""
    from serving.metrics import PENDING_MAX

    def applied() -> float:  # the counter itself, not the registry: nothing is flushed
        (family,) = metrics.requests.collect()
        return sum(s.value for s in family.samples if s.name.endswith("_total"))

    metrics = ServerMetrics()
    for _ in range(PENDING_MAX - 1):
        metrics.observe("m", "1", "grpc", 0.01, None)
    assert applied() == 0
    metrics.observe_group("m", "1", "grpc", [0.01, 0.02], None)
    assert applied() == PENDING_MAX + 1
    metrics.observe("m", "1", "rest", 0.01, None)
    assert applied() == PENDING_MAX + 1
    assert sample(metrics, "kloop_inference_requests_total",
                  model="m", version="1", protocol="rest") == 1.0  # collected: applied
    assert sample(metrics, "kloop_inference_fast_lane_requests_total",
                  model="m", version="1") == 2.0


def test_several_workers_apply_every_observation_at_once() -> None:
    """Any worker may answer a scrape, so none keeps observations waiting."""
    metrics = ServerMetrics(multiprocess=True)
    (before,) = metrics.requests.collect()
    metrics.observe("m", "1", "grpc", 0.01, None)
    (after,) = metrics.requests.collect()
    total = [s.value for s in after.samples if s.name.endswith("_total")]
    assert [s.value for s in before.samples] == [] and total == [1.0]


def test_fault_injector_is_active_only_while_a_fault_is_set() -> None:
    faults = FaultInjector()
    assert not faults.active
    faults.set("m", 1, Fault(error_rate=0.5))
    assert faults.active
    faults.clear("m", 1)
    assert not faults.active


async def test_the_dataplane_never_batches_past_the_largest_padding_size() -> None:
    """With --max-batch-size 32 but graphs captured up to 4 rows, 6 concurrent requests run as
    batches the runner can pad (at most 4 rows), each answered with its own rows."""
    import asyncio

    import numpy as np

    from serving.core.batching import BatchPolicy
    from serving.core.dataplane import DataPlane
    from serving.core.repository import ModelRepository
    from serving.core.types import InferenceRequest, InferInput

    seen: list[int] = []

    def twice(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x * 2

    runner = ModelRunner(twice, options=RuntimeOptions(optimize="none"), strategy="compile",
                         pad_to=(2, 4))
    m = manifest(TensorSpec("x", "FP32", (-1, WIDTH)))
    repo = ModelRepository(None, loader=lambda path, man: runner)
    repo._add(repo._build(Path("/unused"), m))
    dp = DataPlane(repo, batch_policy=BatchPolicy(max_batch_size=32, max_queue_delay_ms=50))
    try:
        def request(i: int) -> InferenceRequest:
            data = np.full((1, WIDTH), float(i), dtype=np.float32)
            return InferenceRequest(model="m", inputs=(InferInput("x", "FP32", (1, WIDTH), data),))

        answers = await asyncio.gather(*(dp.infer(request(i), "test") for i in range(6)))
        for i, answer in enumerate(answers):
            np.testing.assert_array_equal(answer.outputs[0].data, np.full((1, WIDTH), 2.0 * i))
        assert seen and max(seen) <= 4
    finally:
        await dp.aclose()


class Wide(torch.nn.Module):
    """Elementwise work over 65 536 values a row: enough for torch to run it on several threads
    (an OpenMP parallel region), which a small model's ops are not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + 1


def _native_threads_outside_python() -> set[int]:
    """OS threads of this process that Python did not start and that kept the name they
    inherited (gRPC's name themselves): here, OpenMP's helpers."""
    import os
    import threading

    def name(tid: str) -> str:
        try:
            return Path(f"/proc/self/task/{tid}/comm").read_text()
        except OSError:  # ended meanwhile
            return ""

    inherited = name(str(os.getpid()))
    return ({int(t) for t in os.listdir("/proc/self/task") if name(t) == inherited}
            - {t.native_id for t in threading.enumerate()})


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
async def test_loading_and_serving_start_one_openmp_team(tmp_path: Path) -> None:
    """Only the inference worker runs torch on several threads: loading (which traces and checks
    the model, so runs it) stays on one, so the process has one OpenMP team. A second team, even
    idle, makes libgomp stop spinning at every barrier of both, once their helpers outnumber
    the cores (11-12 ms against 9 ms a forward pass for the benchmark CNN)."""
    import numpy as np

    from kloop.artifact import Registry
    from serving.core.dataplane import DataPlane
    from serving.core.management import Management
    from serving.core.repository import ModelRepository
    from serving.core.types import InferenceRequest, InferInput

    width = 1 << 16
    program = torch.export.export(Wide(), (torch.zeros(2, width),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    src = tmp_path / "src"
    src.mkdir()
    torch.export.save(program, str(src / "model.pt2"))
    registry = Registry(tmp_path / "registry")
    registry.publish("wide", src, model_file="model.pt2", format="torch.export",
                     torch_version=torch.__version__,
                     inputs=(TensorSpec("x", "FP32", (-1, width)),),
                     outputs=(TensorSpec("y", "FP32", (-1, width)),), metrics={}, params={},
                     data_fingerprint="t", run_id="t")
    # and a conv net: under "auto" the loader builds its oneDNN graph, checks and times it
    conv = torch.export.export(SmallConv().eval(), (torch.zeros(2, 3, 32, 32),),
                               dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    (tmp_path / "conv").mkdir()
    torch.export.save(conv, str(tmp_path / "conv" / "model.pt2"))
    registry.publish("conv", tmp_path / "conv", model_file="model.pt2", format="torch.export",
                     torch_version=torch.__version__,
                     inputs=(TensorSpec("x", "FP32", (-1, 3, 32, 32)),),
                     outputs=(TensorSpec("y", "FP32", (-1, WIDTH)),), metrics={}, params={},
                     data_fingerprint="t", run_id="t")
    before = _native_threads_outside_python()
    dp = DataPlane(ModelRepository(registry), intra_op_threads=2, inline_below_ms=0)
    management = Management(dp)
    try:
        await management.load("wide", 1)
        await management.load("conv", 1)
        x = np.linspace(-1, 1, 3 * width, dtype=np.float32).reshape(3, width)
        request = InferenceRequest(model="wide", inputs=(InferInput("x", "FP32", x.shape, x),))
        image = np.random.default_rng(0).standard_normal((64, 3, 32, 32), dtype=np.float32)
        images = InferenceRequest(
            model="conv", inputs=(InferInput("x", "FP32", image.shape, image),))
        for _ in range(3):
            answer = await dp.infer(request, "test")
            await dp.infer(images, "test")
        np.testing.assert_allclose(answer.outputs[0].data, np.sin(x) * 2 + 1, atol=1e-5)
        helpers = _native_threads_outside_python() - before
        assert len(helpers) == 1, f"OpenMP helper threads started: {len(helpers)}; want one team"
    finally:
        await dp.aclose()
        await management.aclose()
