"""Training on Kubernetes against the real kube-apiserver, with the test playing what does not
run here: the training operator (it writes the job's status through /status), the kubelet (it
mounts the code ConfigMap: the test reads it back from the server into a file) and the master
pod (it runs the rendered container command on this machine, publishing to a tmp registry)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from deploy.cluster import training_jobs as kt
from deploy.cluster.kube import KINDS, Conflict, Kube, NotFound
from kloop.artifact import Registry
from trainer import code as packed
from trainer import job_manifests as render
from trainer.spec import Code, Elastic, Storage, TrainSpec

PTJ = KINDS["PyTorchJob"]
TJ = KINDS["TrainJob"]
CM = KINDS["ConfigMap"]


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


def play_pod(job: dict, mounts: dict[str, Path] | None = None) -> subprocess.CompletedProcess:
    """Run the master container's command here, as the operator would start it: torchrun
    configured through PET_* variables (one node, one process, a private port). ``mounts``:
    where the pod's mount paths are on this machine (the code ConfigMap's), rewritten in the
    command; the storage volume needs none (the spec's mount_path is a local dir already).
    pip may not reach an index (PIP_NO_INDEX): nothing downloads."""
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    cmd = list(container["command"])
    for pod_path, here in (mounts or {}).items():
        cmd = [str(here) + a[len(pod_path):] if a.startswith(pod_path + "/") else a for a in cmd]
    entry = cmd.index("--") + 1 if cmd[2] == "trainer.code" else 0
    assert cmd[entry:entry + 5] == ["python", "-m", "torch.distributed.run", "-m", "trainer.main"]
    cmd[0] = cmd[entry] = sys.executable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]},
           "PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "PIP_NO_INDEX": "1"}
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


# ---- the task's code as a ConfigMap ---------------------------------------------------------

TASK_MODULE = '''\
"""A user's task, shipped with kloop train --code: a linear classifier on generated points."""

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import kloop_blobs_helper  # from the vendored wheel in requirements.txt (installed in the pod)
from trainer.task import Datasets, Metric, Task


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 0.1


def correct(served, target):
    return (served["label"] == target).float()


class Blobs(Task[Config]):
    Config = Config
    metrics = (Metric("accuracy", "higher", correct),)
    primary_metric = "accuracy"

    def datasets(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, kloop_blobs_helper.FEATURES, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long()
        return Datasets(TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:]),
                        {"source": "generated", "seed": 0, "rows": 256})

    def model(self):
        return nn.Linear(kloop_blobs_helper.FEATURES, 2)

    def loss(self, outputs, target):
        return F.cross_entropy(outputs, target)

    def serve(self, outputs):
        return {"logits": outputs, "label": outputs.argmax(dim=1)}

    def example_input(self):
        return {"features": torch.zeros(2, kloop_blobs_helper.FEATURES)}
'''


def vendored_wheel(directory: Path) -> str:
    """A one-module wheel built here (a wheel is a zip with metadata): a requirement pip
    installs with no index, so the pod's requirements step runs without a network."""
    name, version = "kloop_blobs_helper", "1.0"
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": b"FEATURES = 4\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: kloop-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
                     for p, d in files.items()) + f"{dist}/RECORD,,\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for p, d in {**files, f"{dist}/RECORD": record.encode()}.items():
            z.writestr(p, d)
    return wheel.name


def code_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "kloop_blobs_task.py").write_text(TASK_MODULE)
    (root / "wheels").mkdir()
    (root / "requirements.txt").write_text(f"./wheels/{vendored_wheel(root / 'wheels')}\n")
    return root


def code_spec(tmp_path: Path, **changes) -> TrainSpec:
    src = code_dir(tmp_path / "user-code")
    return make_spec(tmp_path / "volume", task="kloop_blobs_task:Blobs", model_name="blobs",
                     code=Code(path=str(src), sha256=packed.digest(src)), **changes)


def wait_for(predicate, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_code_task_runs_from_its_configmap_publishes_and_the_configmap_goes(kube, tmp_path):
    spec, rid, name = code_spec(tmp_path), run_id(), "blobs-train"
    lines: list[str] = []
    outcome: dict = {}

    def submitter() -> None:
        try:
            outcome["manifest"] = kt.run_on_kubernetes(kube, spec, name=name, run_id=rid, out=lines.append,
                                                       deadline_s=200, logs=False)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = e

    t = threading.Thread(target=submitter, daemon=True)
    t.start()
    wait_for(lambda: any(x.startswith("submitted") for x in lines) or outcome, what="the submission")
    assert "error" not in outcome, outcome
    job = kube.get(PTJ, name)

    # the kubelet's part: the ConfigMap the server stored, its archive as the mounted file
    cm = kube.get(CM, render.code_configmap_name(name))
    assert cm["immutable"] is True and cm["metadata"]["labels"]["kloop.dev/run-id"] == rid
    assert cm["metadata"]["ownerReferences"] == [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                                                  "name": name, "uid": job["metadata"]["uid"]}]
    archive = base64.b64decode(cm["binaryData"][render.CODE_KEY])
    assert hashlib.sha256(archive).hexdigest() == spec.code.sha256
    mount = tmp_path / "kubelet" / "code"
    mount.mkdir(parents=True)
    (mount / render.CODE_KEY).write_bytes(archive)
    pod_spec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert {"name": render.CODE_VOLUME, "mountPath": render.CODE_MOUNT, "readOnly": True} in \
        pod_spec["containers"][0]["volumeMounts"]

    set_conditions(kube, name, ("Created", "True", ""), ("Running", "True", ""))
    pod = play_pod(job, mounts={render.CODE_MOUNT: mount})
    assert pod.returncode == 0, pod.stdout[-3000:] + pod.stderr[-3000:]
    set_conditions(kube, name, ("Created", "True", ""), ("Running", "False", ""),
                   ("Succeeded", "True", f"PyTorchJob {name} successfully completed."))
    t.join(30)
    assert "error" not in outcome, outcome
    manifest = outcome["manifest"]
    assert manifest is not None and manifest.name == "blobs" and manifest.run_id == rid
    assert manifest.lineage["code"]["sha256"] == spec.code.sha256  # what ran, by digest
    with pytest.raises(NotFound):
        kube.get(CM, render.code_configmap_name(name))

    # what ran is on the volume, by digest: the archive, the code, its requirements
    code_root = tmp_path / "volume" / "runs" / rid / "code"
    assert (code_root / f"{spec.code.sha256}.tar.gz").read_bytes() == archive
    assert (code_root / spec.code.sha256 / "kloop_blobs_task.py").is_file()
    assert (code_root / spec.code.sha256 / ".deps" / "kloop_blobs_helper.py").is_file()


def test_trainjob_with_code_is_accepted_and_cancel_deletes_its_configmap(kube, tmp_path):
    spec = code_spec(tmp_path, active_deadline_seconds=600)
    job = kt.submit(kube, spec, name="tj", run_id=run_id(), kind="trainjob")
    stored = kube.get(TJ, "tj")
    assert stored["spec"]["activeDeadlineSeconds"] == 600
    assert stored["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "tj-code"
    cm = kube.get(CM, "tj-code")
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert kt.cancel(kube, "tj", kind="trainjob") is True
    with pytest.raises(NotFound):
        kube.get(CM, "tj-code")


def test_pytorchjob_run_policy_is_accepted(kube, tmp_path):
    spec = make_spec(tmp_path, ttl_seconds_after_finished=120, active_deadline_seconds=3600)
    kt.submit(kube, spec, name="j", run_id=run_id())
    policy = kube.get(PTJ, "j")["spec"]["runPolicy"]
    assert policy["ttlSecondsAfterFinished"] == 120 and policy["activeDeadlineSeconds"] == 3600


def test_changed_code_is_refused_before_anything_is_applied(kube, tmp_path):
    spec = code_spec(tmp_path)
    (Path(spec.code.path) / "kloop_blobs_task.py").write_text("# edited after the spec was made\n")
    with pytest.raises(kt.UnsupportedSpec, match="changed since the spec was made"):
        kt.submit(kube, spec, name="j", run_id=run_id())
    assert kube.list(PTJ)["items"] == [] and kube.list(CM)["items"] == []


def test_a_refused_job_leaves_no_code_configmap(kube, tmp_path):
    kt.submit(kube, make_spec(tmp_path / "first"), name="j", run_id=run_id())  # the name is taken
    with pytest.raises(Conflict):
        kt.submit(kube, code_spec(tmp_path), name="j", run_id=run_id())
    assert [c["metadata"]["name"] for c in kube.list(CM)["items"] if c["metadata"]["name"] == "j-code"] == []
