"""Real torchrun runs: DDP parity across process counts, resume, a worker killed mid-training
and restarted by torchrun, progress, the artifact round trip, and failures surfacing with the
processes' output. Each run takes a few seconds."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kloop.artifact import ArtifactCorrupt, Registry
from tests.support.paths import REPO
from tests.support.processes import Processes
from trainer.data import fingerprint
from trainer.evaluate import finalize, metric_sums
from trainer.launch import TrainingFailed, TrainResult, run_local
from trainer.publish import load_published, publish
from trainer.spec import TrainSpec
from trainer.tasks.digits import Digits, DigitsConfig
from trainer.tasks.digits_data import load_split

EPOCHS, RESUME_AFTER = 4, 2
SPEC = TrainSpec(epochs=EPOCHS, global_batch_size=64, seed=3, log_every_steps=5)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return run_local(SPEC, tmp_path_factory.mktemp("two"), progress=False)


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return run_local(SPEC.replace(nproc_per_node=1), tmp_path_factory.mktemp("one"), progress=False)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, TrainResult]:
    d = tmp_path_factory.mktemp("resumed")
    first = run_local(SPEC.replace(epochs=RESUME_AFTER), d, progress=False)
    return first, run_local(SPEC, d, resume=True, progress=False)


def test_ddp_parity_one_vs_two_processes(one: TrainResult, two: TrainResult) -> None:
    assert one.result["world_size"] == 1 and two.result["world_size"] == 2
    assert two.result["train"]["loss"] == pytest.approx(one.result["train"]["loss"], abs=1e-4)
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], abs=1e-4)
    assert two.metrics["accuracy"] == pytest.approx(one.metrics["accuracy"], abs=1 / 450 + 1e-9)
    for r in (one, two):  # both learned: chance is 0.1
        assert r.metrics["accuracy"] > 0.8, r.metrics
    data = Digits(DigitsConfig()).datasets()
    assert one.metrics["data_fingerprint"] == two.metrics["data_fingerprint"] == fingerprint(data.definition, data.held_out)


def test_progress_events_and_files(two: TrainResult) -> None:
    kinds = [e["event"] for e in two.events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    epochs = [e for e in two.events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    assert all(e["epochs"] == EPOCHS and e["samples_per_s"] > 0 and 0 <= e["held_out"]["accuracy"] <= 1 for e in epochs)
    assert epochs[-1]["held_out"]["accuracy"] == pytest.approx(two.metrics["accuracy"], abs=1e-9)
    assert "step" in kinds
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    on_disk = [json.loads(line) for line in (two.run_dir / "progress.jsonl").read_text().splitlines()]
    assert on_disk == two.events
    assert json.loads((two.run_dir / "metrics.json").read_text()) == two.metrics
    assert set(two.metrics) == {"accuracy", "loss", "num_examples", "data_fingerprint"}
    assert two.metrics["num_examples"] == 450
    assert two.result["evaluation"] == {"primary": "accuracy", "metrics": {
        "accuracy": {"direction": "higher", "threshold": 0.5}, "loss": {"direction": "lower", "threshold": None}}}
    assert two.model_path == two.run_dir / "export" / "model.pt2" and two.model_path.is_file()
    assert two.duration_s > 0


def test_resume_matches_uninterrupted_run(resumed: tuple[TrainResult, TrainResult], two: TrainResult) -> None:
    first, second = resumed
    assert [e["epoch"] for e in first.events if e["event"] == "epoch"] == list(range(1, RESUME_AFTER + 1))
    start = second.events[0]
    assert start["event"] == "start" and start["resumed"] is True and start["start_epoch"] == RESUME_AFTER + 1
    assert [e["epoch"] for e in second.events if e["event"] == "epoch"] == list(range(RESUME_AFTER + 1, EPOCHS + 1))
    assert second.result["train"]["loss"] == pytest.approx(two.result["train"]["loss"], abs=1e-5)
    assert second.metrics["accuracy"] == two.metrics["accuracy"]
    assert second.metrics["loss"] == pytest.approx(two.metrics["loss"], abs=1e-5)
    log = [json.loads(line) for line in (second.run_dir / "progress.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log].count("start") == 2  # one log tells both launches


def test_artifact_round_trip(two: TrainResult, tmp_path: Path) -> None:
    reg = Registry(f"file://{tmp_path / 'registry'}")
    m = publish(reg, SPEC, two.run_dir, run_id="run-1")
    assert (m.name, m.version, m.format, m.run_id) == ("digits", 1, "torch.export", "run-1")
    assert m.metrics == two.metrics and m.data_fingerprint == two.metrics["data_fingerprint"]
    assert TrainSpec.from_dict(m.params) == SPEC
    assert m.primary_metric == "accuracy" and m.direction("loss") == "lower" and m.threshold("accuracy") == 0.5
    assert m.lineage["task"] == "trainer.tasks.digits:Digits" and m.lineage["run_id"] == "run-1"
    assert m.lineage["config"] == {"lr": 0.05, "momentum": 0.9, "shuffle_labels": False, "label_seed": 0}
    assert m.lineage["data_fingerprint"] == m.data_fingerprint and len(m.lineage["code"]["sha256"]) == 64
    assert [t.to_dict() for t in m.inputs] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [(t.name, t.datatype, t.shape) for t in m.outputs] == [("logits", "FP32", (-1, 10)), ("label", "INT64", (-1,))]
    assert set(m.files) == {"model.pt2"} and m.torch_version == torch.__version__

    module = load_published(reg, "digits", "latest")
    data = Digits(DigitsConfig()).datasets()
    again = finalize(Digits.metrics, metric_sums(module, data.held_out, range(450), ("image",),
                                                 ("logits", "label"), Digits.metrics))
    assert again["accuracy"] == two.metrics["accuracy"]
    assert again["loss"] == pytest.approx(two.metrics["loss"], abs=1e-6)
    for batch in (1, 7):  # the exported batch dimension is dynamic
        logits, label = module(torch.from_numpy(load_split().test_images[:batch]))
        assert logits.shape == (batch, 10) and torch.equal(label, logits.argmax(1))

    f = reg.path("digits", 1) / "model.pt2"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt):
        load_published(reg, "digits", 1)


def test_shuffled_labels_make_a_bad_candidate_on_the_same_data(two: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = run_local(SPEC.replace(config={"shuffle_labels": True}, epochs=2), tmp_path, progress=True)
    assert bad.metrics["data_fingerprint"] == two.metrics["data_fingerprint"]
    assert bad.metrics["accuracy"] < 0.3 < two.metrics["accuracy"]
    out = capsys.readouterr().out  # not a tty: plain progress lines
    assert "epoch 1/2 loss" in out and "train: done" in out


def test_failure_raises_with_output_tail(two: TrainResult, tmp_path: Path) -> None:
    shutil.copy(two.run_dir / "checkpoint.pt", tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingFailed) as e:
        run_local(SPEC.replace(seed=99), tmp_path, resume=True, progress=False)
    assert e.value.returncode != 0
    assert "CheckpointMismatch" in e.value.output_tail and "seed" in e.value.output_tail
    assert not (tmp_path / "result.json").exists()


def test_bare_entry_point_is_a_world_of_one(tmp_path: Path) -> None:
    """A pod with one process per node may run the entry point without torchrun."""
    spec = SPEC.replace(epochs=1, nproc_per_node=1)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", "--spec-json", json.dumps(spec.to_dict()), "--run-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "epoch 1/1" in proc.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 1 and np.isfinite(result["metrics"]["loss"])


def test_resume_after_a_killed_run(tmp_path: Path, two: TrainResult, processes: Processes) -> None:
    """Kill torchrun (SIGKILL, whole process group) once epoch 2 is checkpointed: a resumed run
    continues at epoch 3 and ends where an uninterrupted run ends."""
    import os
    import signal
    import time

    from trainer.launch import _child_env, _free_port, torchrun_command
    from trainer.progress import read_events

    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    proc = processes.spawn(torchrun_command(SPEC, run_dir, resume=False, port=_free_port()),
                           env=_child_env(SPEC), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    offset, epochs_done = 0, 0
    try:
        while epochs_done < RESUME_AFTER:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, f"epoch {RESUME_AFTER} never finished"
            events, offset = read_events(run_dir / "progress.jsonl", offset)
            epochs_done = max([epochs_done] + [e["epoch"] for e in events if e["event"] == "epoch"])
            time.sleep(0.02)
    finally:
        # torchrun's workers run in their own process groups: kill the whole tree, like a
        # node that loses power.
        for pid in _descendants(proc.pid) + [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)
    assert not (run_dir / "result.json").exists()  # it really died mid-run
    resumed = run_local(SPEC, run_dir, resume=True, progress=False)
    start = resumed.events[0]
    assert start["event"] == "start" and start["resumed"] is True and start["start_epoch"] >= RESUME_AFTER + 1
    assert resumed.metrics["loss"] == pytest.approx(two.metrics["loss"], abs=1e-5)
    assert resumed.metrics["accuracy"] == two.metrics["accuracy"]


def test_a_killed_worker_is_restarted_and_the_job_completes_by_itself(
        tmp_path: Path, two: TrainResult) -> None:
    """SIGKILL one worker mid-epoch (after a step checkpoint): torchrun restarts the group, the
    workers resume from the checkpoint, and the run completes without anyone resuming it,
    within a point of held-out accuracy of an uninterrupted run (here: the same)."""
    import os
    import signal
    import threading
    import time

    from tests.slow.trainer.test_process_lifetime import training_processes
    from trainer.progress import read_events

    spec = SPEC.replace(checkpoint_every_steps=7, max_restarts=2)
    run_dir = tmp_path / "restarted"
    outcome: dict[str, object] = {}
    t = threading.Thread(target=lambda: outcome.update(r=run_local(spec, run_dir, progress=False)))
    t.start()
    deadline, offset, killed = time.monotonic() + 120, 0, None
    while killed is None:
        assert t.is_alive(), "training ended before a worker could be killed"
        assert time.monotonic() < deadline, "no mid-epoch checkpoint of epoch 2"
        events, offset = read_events(run_dir / "progress.jsonl", offset)
        if any(e["event"] == "checkpoint" and e["epoch"] == 2 for e in events):
            workers = [pid for pid, cmd in training_processes(str(run_dir)).items()
                       if "trainer.main" in cmd and "torch.distributed.run" not in cmd]
            assert len(workers) == 2, workers
            killed = max(workers)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    t.join(180)
    assert not t.is_alive()
    result = outcome["r"]
    assert isinstance(result, TrainResult)
    starts = [e for e in result.events if e["event"] == "start"]
    assert [s["restart"] for s in starts] == [0, 1]
    assert starts[1]["resumed"] is True and (starts[1]["start_epoch"], starts[1]["start_step"]) >= (2, 7)
    assert abs(result.metrics["accuracy"] - two.metrics["accuracy"]) <= 0.01
    assert result.metrics["data_fingerprint"] == two.metrics["data_fingerprint"]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], check=True, capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found
