"""PyTorchJob and TrainJob renderings validate against the real upstream CRD schemas."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
import yaml

from tests.support.crds import validate
from trainer import job_manifests as jm
from trainer.job_manifests import render_pytorchjob, render_trainjob, to_yaml
from trainer.spec import Code, Elastic, Resources, Storage, TrainSpec

SHARED = Storage(pvc_claim="kloop-runs")
CPU = TrainSpec(num_nodes=3, global_batch_size=96, resources=Resources(cpu="2", memory="2Gi"), clean_pod_policy="Running", storage=SHARED)
GPU = TrainSpec(num_nodes=2, nproc_per_node=4, device="cuda", resources=Resources(cpu="8", memory="32Gi", gpus=4), storage=SHARED)
ELASTIC = TrainSpec(num_nodes=2, global_batch_size=48, elastic=Elastic(min_replicas=1, max_replicas=4), storage=Storage(pvc_claim="kloop-runs"))
ARCHIVE = b"not really a tar.gz, but the renderer only hashes and encodes it"
CODE = Code(path="/home/me/churn", sha256=hashlib.sha256(ARCHIVE).hexdigest())
WITH_CODE = TrainSpec(task="churn.task:Churn", num_nodes=2, code=CODE, storage=SHARED, active_deadline_seconds=7200)


def _container(job: dict, replica: str) -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("spec", [CPU, GPU, ELASTIC, TrainSpec()], ids=["cpu", "gpu", "elastic", "single-node"])
def test_pytorchjob_validates_against_crd(spec: TrainSpec) -> None:
    job = render_pytorchjob(spec, name="digits-run1", namespace="ml", run_id="run1")
    validate(job)
    validate(yaml.safe_load(to_yaml(job)))


def test_pytorchjob_fixed_size_shape() -> None:
    job = render_pytorchjob(CPU, name="j", namespace="ml", run_id="r1")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert replicas["Master"]["restartPolicy"] == "OnFailure"
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 3, "ttlSecondsAfterFinished": 86400}
    assert job["spec"]["nprocPerNode"] == "2"
    c = _container(job, "Master")
    assert c["name"] == "pytorch"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["command"][:5] == ["python", "-m", "torch.distributed.run", "-m", "trainer.main"]
    spec_json = c["command"][c["command"].index("--spec-json") + 1]
    assert TrainSpec.from_dict(json.loads(spec_json)) == CPU  # the pod trains exactly this spec
    assert "--resume" in c["command"]
    assert job["metadata"]["labels"]["kloop.dev/run-id"] == "r1"
    assert "Worker" not in render_pytorchjob(TrainSpec(), name="j", namespace="ml", run_id="r")["spec"]["pytorchReplicaSpecs"]


def test_pytorchjob_gpu_limits() -> None:
    c = _container(render_pytorchjob(GPU, name="j", namespace="ml", run_id="r"), "Master")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "nvidia.com/gpu" not in c["resources"]["requests"]


def test_pytorchjob_elastic_is_workers_only() -> None:
    job = render_pytorchjob(ELASTIC, name="j", namespace="ml", run_id="r")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Worker"}
    assert job["spec"]["elasticPolicy"] == {
        "rdzvBackend": "c10d", "minReplicas": 1, "maxReplicas": 4, "maxRestarts": 3, "nProcPerNode": 2,
        "metrics": [{"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}],
    }
    validate(job)
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "kloop-runs"}


@pytest.mark.parametrize("spec", [CPU, GPU, TrainSpec()], ids=["cpu", "gpu", "single-node"])
def test_trainjob_validates_against_crd(spec: TrainSpec) -> None:
    job = render_trainjob(spec, name="digits-run1", namespace="ml", run_id="run1")
    validate(job)
    t = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert t["numNodes"] == spec.num_nodes and t["numProcPerNode"] == spec.nproc_per_node
    assert ("nvidia.com/gpu" in t["resourcesPerNode"]["limits"]) == (spec.resources.gpus > 0)


def test_trainjob_rejects_elastic() -> None:
    with pytest.raises(ValueError, match="elastic"):
        render_trainjob(ELASTIC, name="j", namespace="ml", run_id="r")


def test_crd_validation_catches_a_typo() -> None:
    job = render_pytorchjob(CPU, name="j", namespace="ml", run_id="r")
    job["spec"]["runPolicy"]["cleanPodPolicyy"] = "All"
    with pytest.raises(AssertionError, match="cleanPodPolicyy"):
        validate(job)


def test_several_pods_without_a_shared_volume_are_refused() -> None:
    with pytest.raises(ValueError, match="shared volume"):
        render_pytorchjob(TrainSpec(num_nodes=2), name="j", namespace="default", run_id="r")


def test_pytorchjob_run_policy_ttl_and_deadline() -> None:
    job = render_pytorchjob(CPU.replace(ttl_seconds_after_finished=600, active_deadline_seconds=3600),
                            name="j", namespace="ml", run_id="r")
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 3,
                                        "ttlSecondsAfterFinished": 600, "activeDeadlineSeconds": 3600}
    validate(job)
    job = render_pytorchjob(CPU.replace(ttl_seconds_after_finished=None), name="j", namespace="ml", run_id="r")
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 3}


def test_trainjob_deadline_and_no_ttl_field() -> None:
    job = render_trainjob(CPU.replace(active_deadline_seconds=900), name="j", namespace="ml", run_id="r")
    assert job["spec"]["activeDeadlineSeconds"] == 900
    assert "ttlSecondsAfterFinished" not in json.dumps(job)  # TrainJob v1alpha1 has no such field
    validate(job)
    assert "activeDeadlineSeconds" not in render_trainjob(CPU, name="j", namespace="ml", run_id="r")["spec"]


def test_code_is_mounted_from_its_configmap_and_wraps_the_command() -> None:
    job = render_pytorchjob(WITH_CODE, name="churn-r1", namespace="ml", run_id="r1")
    validate(job)
    for replica in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        assert {"name": "kloop-code", "configMap": {"name": "churn-r1-code", "defaultMode": 0o444}} in pod["volumes"]
        c = pod["containers"][0]
        assert {"name": "kloop-code", "mountPath": "/var/run/kloop/code", "readOnly": True} in c["volumeMounts"]
        cmd = c["command"]
        sep = cmd.index("--")
        assert cmd[:sep] == ["python", "-m", "trainer.code", "run", "--archive", "/var/run/kloop/code/code.tar.gz",
                             "--sha256", CODE.sha256, "--run-dir", "/var/lib/kloop/runs/r1"]
        entry = cmd[sep + 1:]
        assert entry == jm.entry_command(WITH_CODE, "r1")
        assert entry[:5] == ["python", "-m", "torch.distributed.run", "-m", "trainer.main"]
        assert TrainSpec.from_dict(json.loads(entry[entry.index("--spec-json") + 1])) == WITH_CODE
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200
    # without code: no code volume, the entry point as the command
    plain = _container(render_pytorchjob(CPU, name="j", namespace="ml", run_id="r"), "Master")
    assert [m["name"] for m in plain["volumeMounts"]] == ["kloop-storage"]


def test_trainjob_mounts_the_code_through_a_runtime_patch() -> None:
    job = render_trainjob(WITH_CODE, name="churn-r1", namespace="ml", run_id="r1")
    validate(job)
    assert job["spec"]["trainer"]["command"][:4] == ["python", "-m", "trainer.code", "run"]
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == "kloop.dev/trainer"
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rj["template"]["spec"]["template"]["spec"]
    assert rj["name"] == "node" and pod["containers"][0]["name"] == "node"
    assert pod["volumes"][0]["configMap"]["name"] == "churn-r1-code"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == jm.CODE_MOUNT
    assert "runtimePatches" not in render_trainjob(CPU, name="j", namespace="ml", run_id="r")["spec"]


def test_spec_command_replaces_the_entry_point() -> None:
    own = ("python", "-m", "churn.train", "--fast")
    c = _container(render_pytorchjob(CPU.replace(command=own), name="j", namespace="ml", run_id="r"), "Master")
    assert c["command"] == list(own)
    wrapped = jm.command(WITH_CODE.replace(command=own), "r")
    assert wrapped[wrapped.index("--") + 1:] == list(own) and wrapped[2] == "trainer.code"
    t = render_trainjob(CPU.replace(command=own), name="j", namespace="ml", run_id="r")
    assert t["spec"]["trainer"]["command"] == list(own)


def test_code_configmap() -> None:
    cm = jm.render_code_configmap(WITH_CODE, name="churn-r1", namespace="ml", run_id="r1", archive=ARCHIVE)
    assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap" and cm["immutable"] is True
    assert cm["metadata"]["name"] == "churn-r1-code" and cm["metadata"]["namespace"] == "ml"
    assert base64.b64decode(cm["binaryData"]["code.tar.gz"]) == ARCHIVE
    assert cm["metadata"]["annotations"] == {"kloop.dev/code-sha256": CODE.sha256}
    labels = cm["metadata"]["labels"]
    assert labels["kloop.dev/run-id"] == "r1" and labels["app.kubernetes.io/instance"] == "churn-r1"
    assert labels["app.kubernetes.io/managed-by"] == "kloop"
    assert yaml.safe_load(to_yaml(cm)) == cm
    with pytest.raises(ValueError, match="sha256"):
        jm.render_code_configmap(WITH_CODE, name="j", namespace="ml", run_id="r", archive=ARCHIVE + b"!")
    with pytest.raises(ValueError, match="no code"):
        jm.render_code_configmap(CPU, name="j", namespace="ml", run_id="r", archive=ARCHIVE)
