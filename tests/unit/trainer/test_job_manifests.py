"""PyTorchJob and TrainJob renderings validate against the real upstream CRD schemas."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.support.crds import validate
from trainer.job_manifests import render_pytorchjob, render_trainjob, to_yaml
from trainer.spec import Elastic, Resources, Storage, TrainSpec

SHARED = Storage(pvc_claim="kloop-runs")
CPU = TrainSpec(num_nodes=3, global_batch_size=96, resources=Resources(cpu="2", memory="2Gi"), clean_pod_policy="Running", storage=SHARED)
GPU = TrainSpec(num_nodes=2, nproc_per_node=4, device="cuda", resources=Resources(cpu="8", memory="32Gi", gpus=4), storage=SHARED)
ELASTIC = TrainSpec(num_nodes=2, global_batch_size=48, elastic=Elastic(min_replicas=1, max_replicas=4), storage=Storage(pvc_claim="kloop-runs"))


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
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 3}
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
