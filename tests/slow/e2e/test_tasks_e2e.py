"""Each example task through the whole loop, as a user drives it from the command line: train
with 2 DDP processes (``kloop train --task ... --publish``), serve (``kloop serve``), infer over
gRPC and HTTP with the task's own tensor names and datatypes, and roll out: the first version
becomes the champion on the task's threshold, a better candidate is promoted under live traffic
(judged by the task's primary metric, in its direction), a worse one is stopped by the gate.

The wine task is a user's file (``examples/wine``), trained with ``--code DIR`` from another
directory; the other two are registered tasks (``kloop tasks``)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.local.server_process import discover
from deploy.local.traffic import LiveData, LiveStats, TrafficConfig, TrafficGenerator
from kloop import modelfile
from kloop.artifact import Registry
from serving.client import GrpcClient, HttpClient
from tests.support.paths import REPO
from tests.support.processes import Processes

WINE = REPO / "examples" / "wine"


@dataclasses.dataclass(frozen=True)
class Case:
    task: str
    model: str
    first: tuple[str, ...]  # a weak first version, above the task's threshold
    better: tuple[str, ...]
    worse: tuple[str, ...]
    code: Path | None = None


CASES = [
    Case("breast-cancer", "breast-cancer", ("--epochs", "1", "--set", "lr=0.002"),
         ("--epochs", "20"), ("--epochs", "20", "--set", "shuffle_labels=true")),
    Case("diabetes", "diabetes", ("--epochs", "4", "--set", "lr=0.002"),
         ("--epochs", "40"), ("--epochs", "40", "--set", "shuffle_targets=true")),
    Case("wine_task:Wine", "wine", ("--epochs", "1", "--set", "lr=0.002"),
         ("--epochs", "5"), ("--epochs", "5", "--set", "lr=0.0001"), code=WINE),
]
ROLLOUT = ("--steps", "50,100", "--min-requests", "20", "--min-duration", "1", "--interval", "0.3",
           "--retire-after", "0", "--max-p99-ratio", "5")


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _better(direction: str, a: float, b: float) -> bool:
    return a > b if direction == "higher" else a < b


@pytest.mark.parametrize("case", CASES, ids=[c.model for c in CASES])
def test_task_trains_serves_and_rolls_out(case: Case, tmp_path: Path, processes: Processes) -> None:
    home = tmp_path / "home"
    reg = Registry(home / "registry")
    kloop = [sys.executable, "-m", "deploy.cli", "--home", str(home)]
    code = ("--code", str(case.code)) if case.code else ()

    def train(args: tuple[str, ...]) -> int:
        out = subprocess.run([*kloop, "train", "--task", case.task, *code, "--batch-size", "16",
                              "--nproc", "2", "--publish", *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "on 2 process(es)" in out.stdout
        return reg.versions(case.model)[-1]

    def rollout(version: int, *, first: bool = False,
                ) -> tuple[subprocess.CompletedProcess[str], dict[str, LiveStats]]:
        """``kloop rollout`` of ``version`` while clients send the task's held-out inputs;
        none fails, except, for a model's first version, those sent before it was loaded."""
        config = reg.manifest(case.model, version).lineage["config"]
        sys.path.insert(0, str(case.code or REPO))
        try:
            data = LiveData.for_task(case.task, config, max_items=64)
        finally:
            sys.path.remove(str(case.code or REPO))
        cfg = TrafficConfig(model=case.model, http_url=handle.http_url,
                            grpc_target=handle.grpc_target, rate_per_s=100)
        with TrafficGenerator(cfg, data) as traffic:
            out = subprocess.run([*kloop, "rollout", case.model, "--candidate", str(version), *ROLLOUT],
                                 capture_output=True, text=True, timeout=240, check=False)
            live = traffic.by_version()
        failures = traffic.failures()
        if first:
            failures = {k: n for k, n in failures.items() if "is not loaded" not in k}
        assert not failures, failures
        return out, live

    server = processes.spawn([*kloop, "serve", "--http-port", "0", "--grpc-port", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: discover(home) is not None, 60, "kloop serve did not record server.json")
    handle = discover(home)
    assert handle is not None

    v1 = train(case.first)
    first, _ = rollout(v1, first=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert reg.alias(case.model, "champion") == v1
    m1 = reg.manifest(case.model, v1)
    primary, direction = m1.primary_metric, m1.direction(m1.primary_metric)
    assert direction in ("higher", "lower")
    assert m1.lineage["task_ref"] == case.task and m1.lineage["run_id"] == m1.run_id
    if case.code:
        assert m1.lineage["code"]["kind"] == "directory" and len(m1.lineage["code"]["sha256"]) == 64

    _infers_with_its_signature(handle.grpc_target, handle.http_url, reg, case, v1)

    v2 = train(case.better)
    m2 = reg.manifest(case.model, v2)
    assert _better(direction, m2.metrics[primary], m1.metrics[primary]), (m1.metrics, m2.metrics)
    promoted, live = rollout(v2)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "Succeeded" in promoted.stdout
    assert reg.alias(case.model, "champion") == v2
    assert live[str(v1)].requests > 0 and live[str(v2)].requests > 0
    live_value = live[str(v2)].value
    assert live_value is not None and np.isfinite(live_value)  # the answers judged, by the metric

    v3 = train(case.worse)
    m3 = reg.manifest(case.model, v3)
    assert _better(direction, m2.metrics[primary], m3.metrics[primary])
    stopped, live = rollout(v3)
    assert stopped.returncode != 0
    assert "RolledBack" in stopped.stdout + stopped.stderr
    assert primary in stopped.stdout + stopped.stderr  # the gate names the metric it judged
    assert reg.alias(case.model, "champion") == v2
    assert handle.admin().traffic(case.model) == {v2: 100}
    assert str(v3) not in live  # stopped before any request reached it

    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0


def _infers_with_its_signature(grpc_target: str, http_url: str, reg: Registry, case: Case,
                               version: int) -> None:
    """Both protocols answer with the manifest's output names and datatypes, and the numbers
    the exported program computes in this process on the same raw inputs."""
    m = reg.manifest(case.model, version)
    rng = np.random.default_rng(0)
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    inputs = {t.name: (rng.random((3, *t.shape[1:])) * 10).astype(dtypes[t.datatype]) for t in m.inputs}
    program = modelfile.load_exported(reg.path(case.model, version) / m.model_file)
    with torch.no_grad():
        want = program(*(torch.from_numpy(inputs[t.name]) for t in m.inputs))
    want = want if isinstance(want, tuple | list) else (want,)

    async def ask() -> list[dict[str, np.ndarray]]:
        answers = []
        async with GrpcClient(grpc_target) as g:
            meta = await g.model_metadata(case.model)
            assert [i["name"] for i in meta["inputs"]] == [t.name for t in m.inputs]
            assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [(t.name, t.datatype) for t in m.outputs]
            answers.append((await g.infer(case.model, inputs)).outputs)
        async with HttpClient(http_url) as h:
            answers.append((await h.infer(case.model, inputs)).outputs)
        return answers

    for outputs in asyncio.run(ask()):
        assert list(outputs) == [t.name for t in m.outputs]
        for t, expected in zip(m.outputs, want, strict=True):
            got = outputs[t.name]
            assert got.dtype == dtypes[t.datatype] and got.shape == (3, *t.shape[1:])
            np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
