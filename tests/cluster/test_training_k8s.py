"""Training on Kubernetes against the real kube-apiserver, with the test playing what does not
run here: the training operator (it writes the job's status through /status) and the master pod
(it runs the rendered container command on this machine, publishing to a tmp registry)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from deploy.cluster import training_jobs as kt
from deploy.cluster.kube import KINDS, Kube, NotFound
from kloop.artifact import Registry
from trainer import job_manifests as render
from trainer.spec import Elastic, Storage, TrainSpec

PTJ = KINDS["PyTorchJob"]
TJ = KINDS["TrainJob"]



def make_spec(root: Path, **changes) -> TrainSpec:
    storage = Storage(pvc_claim="kloop-runs", mount_path=str(root), registry_uri=f"file://{root}/registry")
    return TrainSpec(epochs=1, nproc_per_node=1, storage=storage, **changes)


def run_id() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


def set_conditions(kube: Kube, name: str, *conds: tuple[str, str, str], kind=PTJ) -> None:
    """Write status as the operator does: the whole conditions list, newest last, an empty
    message omitted (``omitempty``; this 1.20 server also reads a "" in a CR body as null)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"conditions": [{"type": t, "status": s, "reason": f"{kind.kind}{t}", "lastTransitionTime": now,
                              **({"message": m} if m else {})} for t, s, m in conds]}
    kube.patch(kind, name, {"status": status}, status=True)


class Phases:
    """``on_phase`` that lets the test operator wait until follow has seen a phase."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._cv = threading.Condition()

    def __call__(self, phase: str, message: str) -> None:
        with self._cv:
            self.seen.append((phase, message))
            self._cv.notify_all()

    def wait(self, phase: str, timeout: float = 15) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: any(p == phase for p, _ in self.seen), timeout), self.seen


def play_pod(job: dict) -> subprocess.CompletedProcess:
    """Run the master container's command here, as the operator would start it: torchrun
    configured through PET_* variables (one node, one process, a private port)."""
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    cmd = list(container["command"])
    assert cmd[:5] == ["python", "-m", "torch.distributed.run", "-m", "trainer.main"]
    cmd[0] = sys.executable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]},
           "PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_submit_follow_succeeded_and_find_published(kube, tmp_path):
    spec, rid = make_spec(tmp_path), run_id()
    job = kt.submit(kube, spec, name="digits-train", run_id=rid)
    assert job["metadata"]["uid"] and job["metadata"]["labels"]["kloop.dev/run-id"] == rid
    phases = Phases()
    pod: dict = {}

    def operator() -> None:
        phases.wait("Pending")  # each write only after follow saw the previous one: none coalesce
        set_conditions(kube, "digits-train", ("Created", "True", "PyTorchJob digits-train is created."))
        phases.wait("Created")
        set_conditions(kube, "digits-train", ("Created", "True", ""), ("Running", "True", "running"))
        phases.wait("Running")
        pod["result"] = play_pod(kube.get(PTJ, "digits-train"))
        set_conditions(kube, "digits-train", ("Created", "True", ""), ("Running", "False", ""),
                       ("Succeeded", "True", "PyTorchJob digits-train successfully completed."))

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    final = kt.follow(kube, "digits-train", deadline_s=150, on_phase=phases)
    t.join(10)
    assert pod["result"].returncode == 0, pod["result"].stdout[-2000:] + pod["result"].stderr[-2000:]
    assert final == "Succeeded"
    assert [p for p, _ in phases.seen] == ["Pending", "Created", "Running", "Succeeded"]
    assert phases.seen[-1][1] == "PyTorchJob digits-train successfully completed."

    manifest = kt.find_published(Registry(tmp_path / "registry"), "digits", rid)
    assert manifest is not None and manifest.run_id == rid and manifest.version == 1
    assert kt.find_published(Registry(tmp_path / "registry"), "digits", "another-run") is None
    assert kt.local_registry(spec) is not None
    # the run directory the job was told to use, on the "volume"
    assert (tmp_path / "runs" / rid).is_dir()


def test_failed_job_raises_with_the_conditions_message(kube, tmp_path):
    kt.submit(kube, make_spec(tmp_path), name="j", run_id=run_id())
    set_conditions(kube, "j", ("Created", "True", ""), ("Running", "False", ""),
                   ("Failed", "True", "PyTorchJob j is failed because 1 Master replica(s) failed."))
    with pytest.raises(kt.TrainingJobFailed, match="1 Master replica\\(s\\) failed") as e:
        kt.follow(kube, "j", deadline_s=30)
    assert e.value.reason == "PyTorchJobFailed"


def test_restarting_is_reported(kube, tmp_path):
    kt.submit(kube, make_spec(tmp_path), name="j", run_id=run_id())
    set_conditions(kube, "j", ("Created", "True", ""), ("Restarting", "True", "master restarted"))
    phases = Phases()

    def operator() -> None:
        phases.wait("Restarting")
        set_conditions(kube, "j", ("Created", "True", ""), ("Running", "False", ""), ("Succeeded", "True", ""))

    threading.Thread(target=operator, daemon=True).start()
    assert kt.follow(kube, "j", deadline_s=30, on_phase=phases) == "Succeeded"
    assert phases.seen == [("Restarting", "master restarted"), ("Succeeded", "")]


def test_deadline_cancels_the_job(kube, tmp_path):
    kt.submit(kube, make_spec(tmp_path), name="slow", run_id=run_id())
    set_conditions(kube, "slow", ("Created", "True", ""))
    with pytest.raises(kt.TrainingDeadlineExceeded, match="still Created"):
        kt.follow(kube, "slow", deadline_s=1.5)
    _assert_deleted(kube, "slow")


def test_cancel_deletes_the_job_and_is_idempotent(kube, tmp_path):
    kt.submit(kube, make_spec(tmp_path), name="j", run_id=run_id())
    assert kt.cancel(kube, "j") is True
    _assert_deleted(kube, "j")
    assert kt.cancel(kube, "j") is False
    assert kt.cancel(kube, "never-submitted") is False
    with pytest.raises(kt.TrainingCancelled):
        kt.follow(kube, "j", deadline_s=10)


def test_ctrl_c_in_run_on_kubernetes_cancels(kube, tmp_path):
    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        if line.endswith(": Pending"):
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread, at this point

    with pytest.raises(KeyboardInterrupt):
        kt.run_on_kubernetes(kube, make_spec(tmp_path), name="j", run_id=run_id(), out=out, logs=False)
    assert lines[0].startswith("submitted PyTorchJob")
    assert lines[-1].startswith("interrupted: cancelling PyTorchJob")
    _assert_deleted(kube, "j")


def test_run_on_kubernetes_reports_and_returns_none_without_a_readable_registry(kube, tmp_path):
    spec = make_spec(tmp_path / "not-mounted-here")
    lines: list[str] = []

    def operator() -> None:
        while not any(": Pending" in x for x in lines):
            threading.Event().wait(0.05)
        set_conditions(kube, "j", ("Succeeded", "True", "done"))

    threading.Thread(target=operator, daemon=True).start()
    assert kt.run_on_kubernetes(kube, spec, name="j", run_id=run_id(), out=lines.append,
                                deadline_s=30, logs=False) is None
    assert lines[-2].endswith("Succeeded: done")
    assert "not readable from here" in lines[-1]


def test_master_pod_lookup_and_logs_are_best_effort(kube, tmp_path):
    """The operator's pod labels find the master; its log cannot be served here (no kubelet),
    which follow reports once and survives."""
    kt.submit(kube, make_spec(tmp_path), name="j", run_id=run_id())
    assert kt.master_pod(kube, "j") is None
    labels = {"training.kubeflow.org/job-name": "j", "training.kubeflow.org/replica-index": "0",
              "training.kubeflow.org/operator-name": "pytorchjob-controller"}
    for rtype in ("worker", "master"):
        kube.create({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"j-{rtype}-0",
                                  "labels": {**labels, "training.kubeflow.org/replica-type": rtype}},
                     "spec": {"nodeName": "node-1",
                              "containers": [{"name": render.CONTAINER_NAME, "image": "busybox"}]}})
    assert kt.master_pod(kube, "j")["metadata"]["name"] == "j-master-0"
    kube.patch(KINDS["Pod"], "j-master-0", {"status": {"phase": "Running"}}, status=True)
    logs: list[str] = []
    got_log = threading.Event()

    def on_log(line: str) -> None:
        logs.append(line)
        got_log.set()

    def operator() -> None:
        got_log.wait(15)
        set_conditions(kube, "j", ("Succeeded", "True", ""))

    threading.Thread(target=operator, daemon=True).start()
    assert kt.follow(kube, "j", deadline_s=30, on_log=on_log) == "Succeeded"
    assert len(logs) == 1 and "logs of pod j-master-0 unavailable" in logs[0]


def test_trainjob_is_accepted_and_followed(kube, tmp_path):
    spec = make_spec(tmp_path, num_nodes=2)
    job = kt.submit(kube, spec, name="tj", run_id=run_id(), kind="trainjob")
    assert job["kind"] == "TrainJob"
    stored = kube.get(TJ, "tj")
    assert stored["spec"]["runtimeRef"]["name"] == render.TRAINJOB_RUNTIME
    assert stored["spec"]["trainer"]["numNodes"] == 2
    kube.patch(TJ, "tj", {"status": {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0,
                                                     "failed": 0, "suspended": 0}]}}, status=True)
    phases = Phases()

    def operator() -> None:
        phases.wait("Running")
        set_conditions(kube, "tj", ("Complete", "True", "TrainJob is completed"), kind=TJ)

    threading.Thread(target=operator, daemon=True).start()
    assert kt.follow(kube, "tj", kind="trainjob", deadline_s=30, on_phase=phases) == "Succeeded"
    assert phases.seen == [("Running", ""), ("Succeeded", "TrainJob is completed")]
    assert kt.cancel(kube, "tj", kind="trainjob") is True


@pytest.mark.parametrize(("kind", "changes", "message"), [
    ("trainjob", {"elastic": Elastic(min_replicas=1, max_replicas=2)}, "elastic training needs a PyTorchJob"),
    ("pytorchjob", {"storage": Storage()}, "storage.pvc_claim is not set"),
    ("pytorchjob", {"storage": Storage(pvc_claim="p", registry_uri="file:///elsewhere/registry")},
     "outside storage.mount_path"),
    ("pytorchjob", {"storage": Storage(pvc_claim="p", registry_uri="s3://bucket/registry")}, "file:// path"),
    ("pytorchjob", {"device": "cuda"}, "resources.gpus=0"),
])
def test_unsupported_spec_is_rejected_before_anything_is_applied(kube, tmp_path, kind, changes, message):
    spec = make_spec(tmp_path).replace(**changes)
    with pytest.raises(kt.UnsupportedSpec, match=message):
        kt.submit(kube, spec, name="j", run_id=run_id(), kind=kind)
    assert kube.list(kt.job_kind(kind))["items"] == []


def test_bad_names_are_rejected_before_anything_is_applied(kube, tmp_path):
    with pytest.raises(kt.UnsupportedSpec, match="job name"):
        kt.submit(kube, make_spec(tmp_path), name="Digits_Train", run_id=run_id())
    with pytest.raises(kt.UnsupportedSpec, match="run id"):
        kt.submit(kube, make_spec(tmp_path), name="j", run_id="run id with spaces")
    assert kube.list(PTJ)["items"] == []


def _assert_deleted(kube: Kube, name: str, kind=PTJ) -> None:
    """Deleted with Foreground propagation: gone, or (no garbage collector here) marked."""
    try:
        meta = kube.get(kind, name)["metadata"]
    except NotFound:
        return
    assert meta.get("deletionTimestamp") and "foregroundDeletion" in meta.get("finalizers", [])
