"""The main job end to end: ``kloop demo`` as a real process (torchrun training, a real server
subprocess, live gRPC + HTTP traffic, rollouts ticked on the real clock), then the state it
left is checked through the stores and the CLI: one promotion, one gate rollback, one rollback
by live analysis, and no process left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.runs import RunStore
from deploy.rollout import Phase
from kloop.artifact import Registry


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    d = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "demo", "--dir", str(d), "--epochs", "6", "--v1-epochs", "2",
         "--step-seconds", "2", "--min-requests", "40", "--rate", "100"],
        check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )
    return d, proc


def kloop(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", "--home", str(home), *args],
                          check=False, capture_output=True, text=True, timeout=120)


def test_demo_completes_the_loop(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    d, proc = demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "no kloop process left running" in proc.stdout
    # the step log speaks the history's words ("[rollout] wait: ..."), not Python's enum reprs
    assert "[rollout] wait: " in proc.stdout and "Action." not in proc.stdout
    reg = Registry(d / "registry")
    assert reg.versions("digits") == [1, 2, 3, 4]
    assert reg.aliases("digits") == {"champion": 2}
    for v in (1, 2, 3, 4):
        reg.verify("digits", v)  # every published version is intact
    m1, m2, m3 = (reg.manifest("digits", v) for v in (1, 2, 3))
    assert m2.metrics["accuracy"] > m1.metrics["accuracy"]
    assert m3.metrics["accuracy"] < 0.3  # shuffled labels learn nothing
    assert len({m.data_fingerprint for m in (m1, m2, m3)}) == 1


def test_runs_record_each_decision(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    d, _ = demo
    runs = list(reversed(RunStore(d / "kloop.db").list()))
    assert [r.outcome for r in runs] == [
        "champion (first version)", "promoted", "rolled back by the gate", "rolled back by live analysis"]
    assert all(r.status == "succeeded" for r in runs)
    for r in runs:
        assert [s.name for s in r.steps] == ["train", "evaluate", "publish", "gate", "canary", "decide"]
        assert r.step("train").status == "succeeded" and r.step("train").duration_s > 0
        assert (Path(r.run_dir) / "train" / "progress.jsonl").is_file()
    assert runs[2].step("gate").status == "failed" and runs[2].step("canary").status == "skipped"
    assert runs[3].step("gate").status == "succeeded" and runs[3].step("canary").status == "failed"


def test_rollouts_stepped_and_judged_live(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    d, _ = demo
    by_candidate = {r.candidate: r for r in SQLiteRolloutStore(d / "kloop.db").list()}
    promoted, gated, faulty = by_candidate[2], by_candidate[3], by_candidate[4]
    assert promoted.phase is Phase.SUCCEEDED
    steps = [e.weights.get(2) for e in promoted.history if e.kind_name == "set_weights"]
    assert steps == [10, 50, 100]  # each step analysed live; then promotion
    assert any(e.kind_name == "promote" and e.weights.get(2) == 100 for e in promoted.history)
    assert gated.phase is Phase.ROLLED_BACK
    assert not any(e.kind_name == "set_weights" for e in gated.history)  # no traffic ever
    assert faulty.phase is Phase.ROLLED_BACK and "error rate" in faulty.reason
    assert faulty.weights == {2: 100}


def test_server_is_gone(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    d, _ = demo
    assert not (d / "server.json").exists()
    ps = subprocess.run(["ps", "-eo", "args"], check=False, capture_output=True, text=True).stdout
    assert str(d) not in ps


def test_cli_status_and_runs_read_the_same_state(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    d, _ = demo
    status = kloop(d, "status")
    assert status.returncode == 0, status.stderr
    assert "champion" in status.stdout and "RolledBack" in status.stdout and "Succeeded" in status.stdout
    runs = kloop(d, "runs")
    assert runs.returncode == 0 and runs.stdout.count("digits") >= 4
    ids = [r.id for r in RunStore(d / "kloop.db").list()]
    cmp = kloop(d, "runs", "compare", ids[-1], ids[-2])
    assert cmp.returncode == 0 and "spec.epochs" in cmp.stdout  # v1 (2 epochs) vs v2 (6 epochs)


def test_kserve_dry_run_validates_against_crds(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    from tests.support.crds import validate

    d, _ = demo
    for mode in ("Standard", "Serverless"):
        out = kloop(d, "rollout", "digits", "--candidate", "4", "--target", "kserve", "--dry-run",
                    "--mode", mode, "--weight", "10")
        assert out.returncode == 0, out.stderr
        objs = [o for o in yaml.safe_load_all(out.stdout) if o]
        kinds = sorted(o["kind"] for o in objs)
        if mode == "Standard":
            assert kinds == ["GRPCRoute", "HTTPRoute", "InferenceService", "InferenceService"]
        else:
            assert kinds == ["InferenceService"]
            assert objs[0]["spec"]["predictor"]["canaryTrafficPercent"] == 10
            annotations = objs[0]["metadata"]["annotations"]
            assert annotations["autoscaling.knative.dev/class"] == "hpa.autoscaling.knative.dev"
            assert objs[0]["spec"]["predictor"]["model"]["runtime"] == "kloop-knative"
        for o in objs:
            if o["apiVersion"] != "autoscaling/v2":
                validate(o)
            if o["kind"] == "InferenceService":
                assert o["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
                assert "serving.kserve.io/deploymentMode" in o["metadata"]["annotations"]
