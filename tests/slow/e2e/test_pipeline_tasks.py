"""The pipeline on tasks other than the digits, with real torchrun training (2 processes, a few
epochs: seconds of training each):

* breast-cancer, in this process: the evaluate step measures the exported program with the
  task's metrics on the task's held-out split, records them with the primary metric and its
  direction, and refuses a run whose recorded metrics or split fingerprint it does not
  reproduce; the tables name the primary metric;
* a user's task from ``--code DIR`` (a regression, RMSE: lower is better), through ``kloop
  pipeline run`` as a real process started elsewhere: the workers and the evaluate step both
  import it, ``kloop runs`` heads its column "held-out rmse ↓"; a task that cannot be loaded
  is refused before anything starts, in one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.local.home import Home
from deploy.local.runs import Run, RunStore
from deploy.pipeline import report
from deploy.pipeline.runner import Pipeline, PipelineError
from deploy.rollout import RolloutPolicy
from tests.support.paths import REPO
from tests.support.processes import Processes
from trainer.launch import load_result
from trainer.spec import TrainSpec

SPEC = TrainSpec(model_name="breast-cancer", task="breast-cancer", epochs=3, nproc_per_node=2)


@dataclasses.dataclass
class Trained:
    home: Home
    pipeline: Pipeline
    run: Run


@pytest.fixture(scope="module")
def breast_cancer(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    home = Home(tmp_path_factory.mktemp("home"))
    pipeline = Pipeline(home, server=None, policy=RolloutPolicy(), log=lambda _: None,
                        progress=False)
    return Trained(home, pipeline, pipeline.run(SPEC, label="breast-cancer"))


def test_evaluate_measures_the_tasks_metrics_on_its_held_out_split(breast_cancer: Trained) -> None:
    run = breast_cancer.run
    assert (run.status, run.outcome, run.version) == ("succeeded", "champion (first version)", 1)
    assert set(run.metrics) == {"accuracy", "log_loss", "num_examples"}
    assert run.metrics["num_examples"] == 143  # a quarter of 569, stratified
    assert run.metrics["accuracy"] > 0.8  # the task's own threshold: the gate passed
    assert run.primary_metric == "accuracy" and run.direction("accuracy") == "higher"
    assert run.direction("log_loss") == "lower"
    evaluate = run.step("evaluate")
    assert evaluate.status == "succeeded"
    assert evaluate.message == (f"accuracy {run.metrics['accuracy']:.4f} (higher is better) on "
                                "143 held-out items")
    manifest = breast_cancer.home.registry.manifest("breast-cancer", 1)
    for name in ("accuracy", "log_loss"):  # what was measured here is what was published
        assert run.metrics[name] == pytest.approx(manifest.metrics[name], rel=1e-4)
    assert manifest.evaluation == run.evaluation
    assert RunStore(breast_cancer.home.db).get(run.id).evaluation == run.evaluation  # kept


@pytest.mark.parametrize(("key", "change", "message"), [
    ("accuracy", lambda v: v - 0.05, "does not reproduce training's held-out metrics: accuracy"),
    ("log_loss", lambda v: v * 1.01, "log_loss"),
    ("data_fingerprint", lambda v: "0" * 64, "not the one training measured"),
])
def test_evaluate_refuses_what_it_does_not_reproduce(breast_cancer: Trained, tmp_path: Path,
                                                     key: str, change: object, message: str) -> None:
    assert callable(change)
    train = tmp_path / "train"
    shutil.copytree(Path(breast_cancer.run.run_dir) / "train", train)
    metrics = json.loads((train / "metrics.json").read_text())
    metrics[key] = change(metrics[key])
    (train / "metrics.json").write_text(json.dumps(metrics))
    run = Run.new("breast-cancer", {}, tmp_path / "runs")
    Path(run.run_dir).mkdir(parents=True)
    with pytest.raises(PipelineError, match=message):
        breast_cancer.pipeline._evaluate(run, SPEC, load_result(train), resumed=False)
    assert run.step("evaluate").status == "failed"


def test_tables_name_the_primary_metric(breast_cancer: Trained) -> None:
    with report.console.capture() as out:
        report.print_runs([breast_cancer.run])
        report.print_comparison([breast_cancer.run, breast_cancer.run])
        report.print_status(breast_cancer.home.registry, None, breast_cancer.pipeline.rollouts,
                            "breast-cancer")
    text = out.get()
    assert "held-out accuracy ↑" in text  # runs and status
    assert "log_loss ↓" in text  # the comparison shows every metric with its direction
    assert f"{breast_cancer.run.metrics['accuracy']:.4f}" in text


USER_TASK = '''
from trainer.tasks.diabetes import Diabetes


class Progression(Diabetes):
    """The diabetes regression, as a user's own module."""
'''


def kloop(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KLOOP_HOME"}
    return subprocess.run([sys.executable, "-m", "deploy.cli", "--home", str(home), *args],
                          check=False, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**env, "PYTHONPATH": str(REPO), "COLUMNS": "200"})


def test_a_users_regression_through_kloop_pipeline_run(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "usertask.py").write_text(USER_TASK)
    elsewhere = tmp_path / "elsewhere"  # not the code's directory: --code is what finds it
    elsewhere.mkdir()
    home = tmp_path / "home"
    out = kloop(home, "pipeline", "run", "--task", "usertask:Progression", "--code", str(code),
                "--epochs", "30", "--nproc", "2", "--set", "hidden=8", cwd=elsewhere)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "gate metric rmse (lower is better)" in out.stderr  # checked before it started
    [run] = RunStore(home / "kloop.db").list()
    assert run.model == "progression" and run.status == "succeeded"
    assert run.primary_metric == "rmse" and run.direction("rmse") == "lower"
    assert set(run.metrics) == {"rmse", "mae", "num_examples"}
    assert run.step("evaluate").message.startswith(f"rmse {run.metrics['rmse']:.4g} (lower is "
                                                   "better) on 111 held-out items")
    assert run.params["spec"]["config"] == {"hidden": 8}
    listed = kloop(home, "runs", cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert "held-out rmse ↓" in listed.stdout and "accuracy" not in listed.stdout
    status = kloop(home, "status", cwd=elsewhere)
    assert status.returncode == 0 and "held-out rmse ↓" in status.stdout, status.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "nosuchtask"], "not a registered task"),
    (["--task", "nosuchmodule:Task"], "cannot import 'nosuchmodule'"),
    (["--task", "diabetes", "--set", "hidden=many"], "--set hidden=many"),
])
def test_a_task_that_cannot_work_is_refused_before_anything_starts(
        tmp_path: Path, args: list[str], message: str) -> None:
    home = tmp_path / "home"
    out = kloop(home, "pipeline", "run", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_pipeline_run_with_traffic_canaries_on_the_tasks_own_inputs(
        tmp_path: Path, processes: Processes) -> None:
    """``--traffic``: while the run lasts, the server gets the task's held-out inputs (no
    clients needed for a first try), and the live primary metric per version is reported."""
    from deploy.local.server_process import discover

    home = tmp_path / "home"
    assert "needs a running server" in kloop(
        home, "pipeline", "run", "--task", "breast-cancer", "--traffic", "10", cwd=tmp_path).stderr
    processes.spawn([sys.executable, "-m", "deploy.cli", "--home", str(home), "serve",
                     "--http-port", "0", "--grpc-port", "0"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while discover(home) is None:
        assert time.monotonic() < deadline, "kloop serve did not record server.json"
        time.sleep(0.05)
    out = kloop(home, "pipeline", "run", "--task", "breast-cancer", "--epochs", "3",
                "--traffic", "60", "--steps", "100", "--min-requests", "20", "--min-duration", "1",
                "--retire-after", "0", "--interval", "0.3", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "champion (first version)" in out.stdout
    [line] = [ln for ln in out.stdout.splitlines() if ln.startswith("live traffic:")]
    assert "v1: " in line and ", 0 errors, live 0." in line, line  # live accuracy of v1
