"""Render a ``TrainSpec`` as a Kubernetes training job: PyTorchJob (kubeflow.org/v1) or TrainJob
(trainer.kubeflow.org/v1alpha1). Pure functions from spec to dict; applying them is deploy's job.

Why every pod runs ``python -m torch.distributed.run -m trainer.main``: the operators describe
the job to torchrun through PET_* variables (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR,
PET_NPROC_PER_NODE; PET_RDZV_* when elastic), which torchrun reads as its own flags; torchrun
then gives each process RANK/WORLD_SIZE/LOCAL_RANK exactly as it does locally. So the pod runs
the same entry point as ``trainer.launch`` with no launcher-specific code.

The spec travels inline (``--spec-json``). ``--resume`` is always passed: with ``restartPolicy:
OnFailure`` a restarted pod continues from the last checkpoint on the shared volume instead of
starting over (a first start finds none and begins at epoch 1). ``spec.command``, when set,
replaces kloop's entry point (the user's command starts the training itself).

The task's code reaches the pods in the image (``spec.image``, built FROM kloop's trainer image)
or, with ``spec.code``, as a packed directory (``trainer.code``) in a ConfigMap
(``render_code_configmap``; binaryData ``code.tar.gz``) mounted read-only at ``CODE_MOUNT``.
The command is then wrapped by ``python -m trainer.code run --archive ... --sha256 <digest>
--run-dir <run dir> -- <command>``, which refuses any other archive, keeps it in the run's
directory on the shared volume, unpacks it there and puts it on PYTHONPATH before it execs
torchrun. The ConfigMap is created before the job and cannot name the job as its owner then;
``deploy.cluster.training_jobs`` sets that ownerReference once the job exists (so the garbage
collector removes it with the job, TTL included) and deletes it itself when the job ends or is
cancelled.

Elastic jobs follow the training operator's convention: Workers only, no Master; the rendezvous
host is ``<job>-worker-0`` and ``elasticPolicy`` carries min/max replicas and the c10d backend.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import yaml

from trainer.spec import TrainSpec

CONTAINER_NAME = "pytorch"  # the training operator finds the training container by this name
PORT_NAME = "pytorchjob-port"  # the operator's default port name; elastic rdzv uses it too
PORT = 23456
TRAINJOB_RUNTIME = "torch-distributed"  # kubeflow/trainer's default ClusterTrainingRuntime
_VOLUME = "kloop-storage"
CODE_VOLUME = "kloop-code"
CODE_MOUNT = "/var/run/kloop/code"  # the code ConfigMap, read-only; the archive is CODE_ARCHIVE
CODE_KEY = "code.tar.gz"  # binaryData key (trainer.code.ARCHIVE_KEY; not imported: no coupling)
CODE_ARCHIVE = f"{CODE_MOUNT}/{CODE_KEY}"
CODE_SHA256_ANNOTATION = "kloop.dev/code-sha256"  # a label value cannot hold 64 characters
# The torch-distributed ClusterTrainingRuntime's trainer: replicated job "node", container "node".
TRAINJOB_NODE = "node"
RUNTIME_PATCH_MANAGER = "kloop.dev/trainer"  # owner of kloop's runtimePatches entry


def labels(spec: TrainSpec, *, name: str, run_id: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kloop-trainer",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/part-of": "kloop",
        "app.kubernetes.io/managed-by": "kloop",
        "kloop.dev/run-id": run_id,
        "kloop.dev/model": spec.model_name,
    }


def run_dir(spec: TrainSpec, run_id: str) -> str:
    """The run directory inside the pod, on the storage volume shared by all replicas."""
    return f"{spec.storage.mount_path.rstrip('/')}/runs/{run_id}"


def code_configmap_name(name: str) -> str:
    """The code ConfigMap of job ``name`` (a job name is at most 50 characters; this fits)."""
    return f"{name}-code"


def entry_command(spec: TrainSpec, run_id: str, *, publish: bool = True) -> list[str]:
    """What trains: ``spec.command`` when given, else torchrun (configured by the operator's
    PET_* env) + kloop's entry point."""
    if spec.command is not None:
        return list(spec.command)
    cmd = [
        "python", "-m", "torch.distributed.run", "-m", "trainer.main",
        "--spec-json", json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":")),
        "--run-dir", run_dir(spec, run_id),
        "--resume",
    ]
    return [*cmd, "--publish", "--run-id", run_id] if publish else cmd


def command(spec: TrainSpec, run_id: str, *, publish: bool = True) -> list[str]:
    """The container command: ``entry_command``, wrapped by the code runner when ``spec.code``
    is set (verify the archive's digest, unpack it on the shared volume, then exec)."""
    entry = entry_command(spec, run_id, publish=publish)
    if spec.code is None:
        return entry
    return ["python", "-m", "trainer.code", "run", "--archive", CODE_ARCHIVE,
            "--sha256", spec.code.sha256, "--run-dir", run_dir(spec, run_id), "--", *entry]


def render_code_configmap(spec: TrainSpec, *, name: str, namespace: str, run_id: str,
                          archive: bytes) -> dict[str, Any]:
    """The ConfigMap carrying ``archive`` (``trainer.code.pack`` of ``spec.code.path``) to job
    ``name``'s pods: labelled like the job (run id included), the digest as an annotation,
    immutable (the kubelet need not watch it; nobody swaps the code under a running job).
    Raises ValueError when the spec has no code or ``archive`` is not the spec's digest."""
    if spec.code is None:
        raise ValueError("the spec has no code (spec.code is None): nothing to put in a ConfigMap")
    actual = hashlib.sha256(archive).hexdigest()
    if actual != spec.code.sha256:
        raise ValueError(f"the archive's sha256 {actual} is not spec.code.sha256 {spec.code.sha256}")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": code_configmap_name(name),
            "namespace": namespace,
            "labels": {**labels(spec, name=name, run_id=run_id), "app.kubernetes.io/component": "training-code"},
            "annotations": {CODE_SHA256_ANNOTATION: spec.code.sha256},
        },
        "immutable": True,
        "binaryData": {CODE_KEY: base64.b64encode(archive).decode("ascii")},
    }


def resources(spec: TrainSpec) -> dict[str, Any]:
    """Requests = limits (Guaranteed QoS: a training pod should not be the first evicted);
    ``nvidia.com/gpu`` only when GPUs are asked for (extended resources go in limits)."""
    r = spec.resources
    limits: dict[str, Any] = {"cpu": r.cpu, "memory": r.memory}
    if r.gpus > 0:
        limits["nvidia.com/gpu"] = r.gpus
    return {"requests": {"cpu": r.cpu, "memory": r.memory}, "limits": limits}


def _env(spec: TrainSpec) -> list[dict[str, str]]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if spec.resources.gpus == 0:
        env.append({"name": "OMP_NUM_THREADS", "value": "1"})
    return env


def _volume(spec: TrainSpec) -> dict[str, Any]:
    if spec.storage.pvc_claim:
        return {"name": _VOLUME, "persistentVolumeClaim": {"claimName": spec.storage.pvc_claim}}
    if spec.num_nodes > 1 or spec.elastic is not None:
        # Rank 0 writes the checkpoint every rank resumes from, and publishes the version:
        # with one emptyDir per pod, a restarted job's ranks would resume at different epochs.
        raise ValueError("a job with several pods needs a shared volume for checkpoints and the "
                         "registry: set storage.pvc_claim (kloop train --pvc CLAIM)")
    return {"name": _VOLUME, "emptyDir": {}}  # one pod: checkpoints survive container restarts


def _code_volume(name: str) -> dict[str, Any]:
    return {"name": CODE_VOLUME, "configMap": {"name": code_configmap_name(name), "defaultMode": 0o444}}


def _code_mount() -> dict[str, Any]:
    return {"name": CODE_VOLUME, "mountPath": CODE_MOUNT, "readOnly": True}


def _pod_template(spec: TrainSpec, *, name: str, run_id: str) -> dict[str, Any]:
    mounts = [{"name": _VOLUME, "mountPath": spec.storage.mount_path}]
    volumes = [_volume(spec)]
    if spec.code is not None:
        mounts.append(_code_mount())
        volumes.append(_code_volume(name))
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command(spec, run_id),
        "env": _env(spec),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "resources": resources(spec),
        "volumeMounts": mounts,
    }
    return {
        "metadata": {"labels": labels(spec, name=name, run_id=run_id)},
        "spec": {"containers": [container], "volumes": volumes},
    }


def render_pytorchjob(spec: TrainSpec, *, name: str, namespace: str, run_id: str) -> dict[str, Any]:
    """A ``kubeflow.org/v1`` PyTorchJob: Master (1) + Worker (num_nodes - 1, omitted when 0), or
    Workers only with an ``elasticPolicy`` when ``spec.elastic`` is set. ``runPolicy`` carries
    ``ttlSecondsAfterFinished`` and ``activeDeadlineSeconds`` when the spec sets them."""
    template = _pod_template(spec, name=name, run_id=run_id)

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": spec.restart_policy, "template": template}

    run_policy: dict[str, Any] = {"cleanPodPolicy": spec.clean_pod_policy, "backoffLimit": spec.backoff_limit}
    if spec.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = spec.active_deadline_seconds
    job_spec: dict[str, Any] = {"nprocPerNode": str(spec.nproc_per_node), "runPolicy": run_policy}
    if spec.elastic is None:
        replicas = {"Master": replica(1)}
        if spec.num_nodes > 1:
            replicas["Worker"] = replica(spec.num_nodes - 1)
    else:
        replicas = {"Worker": replica(spec.num_nodes)}
        job_spec["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "minReplicas": spec.elastic.min_replicas,
            "maxReplicas": spec.elastic.max_replicas,
            "maxRestarts": spec.elastic.max_restarts,
            "nProcPerNode": spec.nproc_per_node,
        }
        if spec.elastic.cpu_target_percent is not None:
            # The training operator creates an HPA on the job's scale subresource from these.
            job_spec["elasticPolicy"]["metrics"] = [{"type": "Resource", "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": spec.elastic.cpu_target_percent},
            }}]
    job_spec["pytorchReplicaSpecs"] = replicas
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(spec, name=name, run_id=run_id)},
        "spec": job_spec,
    }


def render_trainjob(spec: TrainSpec, *, name: str, namespace: str, run_id: str) -> dict[str, Any]:
    """A ``trainer.kubeflow.org/v1alpha1`` TrainJob on the ``torch-distributed`` runtime.

    The runtime owns the pod template and the shared volume; a TrainJob sets the trainer's
    image, command, env, node count and resources, and ``runtimePatches`` may add volumes and
    mounts to the runtime's containers (used for the code ConfigMap: replicated job and
    container ``node``, as in the ``torch-distributed`` runtime). Without a volume from the
    runtime the run directory is pod-local, so publishing needs a runtime that mounts
    ``spec.storage.mount_path``. Elastic training is not expressible here and is rejected.

    ``activeDeadlineSeconds`` is rendered from the spec; the TrainJob v1alpha1 schema
    (Trainer v2.3.0) has no ``ttlSecondsAfterFinished``, so ``spec.ttl_seconds_after_finished``
    does not apply to a TrainJob (a runtime's JobSet may set its own).
    """
    if spec.elastic is not None:
        raise ValueError("TrainJob (v1alpha1) has no elastic policy; render a PyTorchJob instead")
    job_spec: dict[str, Any] = {
        "runtimeRef": {
            "name": TRAINJOB_RUNTIME,
            "apiGroup": "trainer.kubeflow.org",
            "kind": "ClusterTrainingRuntime",
        },
        "trainer": {
            "image": spec.image,
            "command": command(spec, run_id),
            "env": _env(spec),
            "numNodes": spec.num_nodes,
            "numProcPerNode": spec.nproc_per_node,
            "resourcesPerNode": resources(spec),
        },
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.code is not None:
        pod = {"volumes": [_code_volume(name)], "containers": [{"name": TRAINJOB_NODE, "volumeMounts": [_code_mount()]}]}
        job_spec["runtimePatches"] = [{
            "manager": RUNTIME_PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": TRAINJOB_NODE, "template": {"spec": {"template": {"spec": pod}}}},
            ]}}},
        }]
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(spec, name=name, run_id=run_id)},
        "spec": job_spec,
    }


def to_yaml(obj: dict[str, Any] | list[dict[str, Any]]) -> str:
    """YAML for ``kubectl apply -f -``: one document, or several separated by ``---``."""
    docs = obj if isinstance(obj, list) else [obj]
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=1 << 16)
