"""``TrainSpec``: the one description of a training run, local or in a cluster.

Why a frozen, validated dataclass: the same spec is rendered to a local ``torchrun`` command, a
``PyTorchJob`` and a ``TrainJob``, and travels into pods as JSON. A bad combination (a global
batch that does not split across processes, GPUs asked of a CPU-only run) must fail here, on the
user's machine, at construction, before any process group, pod or image pull exists
(torchtitan's "validate config before parallelism" habit).

This module imports neither torch nor any other component, so the CLI and the cluster renderers
can build and check specs cheaply.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args

from kloop.artifact import check_name

Device = Literal["auto", "cpu", "cuda"]
RestartPolicy = Literal["OnFailure", "Always", "Never", "ExitCode"]
CleanPodPolicy = Literal["None", "Running", "All"]

# Kubernetes resource quantities: "2", "500m", "1.5", "2Gi", "512Mi", "1G".
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


class SpecError(ValueError):
    """A spec is invalid; the message says which field and why."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one replica (one node / pod) requests; used by the cluster renderers only."""

    cpu: str = "2"  # Kubernetes CPU quantity per replica; 2 = one core per default process
    memory: str = "2Gi"  # Kubernetes memory quantity per replica; digits + torch fit in ~1 GiB
    gpus: int = 0  # nvidia.com/gpu per replica; 0 = CPU training (gloo)

    def __post_init__(self) -> None:
        _require(bool(_QUANTITY_RE.match(self.cpu)), f"resources.cpu {self.cpu!r} is not a Kubernetes quantity (e.g. '2', '500m')")
        _require(bool(_QUANTITY_RE.match(self.memory)), f"resources.memory {self.memory!r} is not a Kubernetes quantity (e.g. '2Gi')")
        _require(isinstance(self.gpus, int) and self.gpus >= 0, f"resources.gpus must be an integer >= 0, got {self.gpus!r}")


@dataclasses.dataclass(frozen=True)
class Elastic:
    """Elastic training (torchrun rendezvous over c10d): the job runs with any replica count in
    [min_replicas, max_replicas] and survives losing nodes down to the minimum."""

    min_replicas: int = 1  # nodes below which the job waits instead of training
    max_replicas: int = 2  # nodes the job can grow to
    max_restarts: int = 3  # worker-group restarts torchrun allows before failing the pod
    # The operator's HPA grows the job between min and max at this CPU utilization (percent);
    # None: no HPA, the replica count changes only when nodes come and go.
    cpu_target_percent: int | None = 80

    def __post_init__(self) -> None:
        _require(self.min_replicas >= 1, f"elastic.min_replicas must be >= 1, got {self.min_replicas}")
        _require(
            self.max_replicas >= self.min_replicas,
            f"elastic.max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})",
        )
        _require(self.max_restarts >= 0, f"elastic.max_restarts must be >= 0, got {self.max_restarts}")
        _require(self.cpu_target_percent is None or 1 <= self.cpu_target_percent <= 100,
                 f"elastic.cpu_target_percent must be in 1..100, got {self.cpu_target_percent}")


@dataclasses.dataclass(frozen=True)
class Storage:
    """Where pods keep run directories and publish versions: a volume shared by all replicas."""

    pvc_claim: str | None = None  # PersistentVolumeClaim mounted at mount_path; None = emptyDir
    mount_path: str = "/var/lib/kloop"  # run dirs go to <mount_path>/runs/<run id>
    registry_uri: str = "file:///var/lib/kloop/registry"  # where the pod publishes (file:// on the volume)

    def __post_init__(self) -> None:
        _require(self.mount_path.startswith("/"), f"storage.mount_path must be absolute, got {self.mount_path!r}")
        _require(bool(self.registry_uri), "storage.registry_uri must not be empty")


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Code:
    """The task's code when it is not in the image: a directory packed (with its
    ``requirements.txt``, if any) into a tar.gz whose sha256 is recorded. Locally the directory
    is put on the workers' path; in a cluster the archive reaches the run's directory on the
    shared volume and is unpacked (and its requirements installed) before torchrun starts."""

    path: str  # the directory on the submitting machine (absolute)
    sha256: str  # of the packed archive (``trainer.code.pack``): what the pods run is this

    def __post_init__(self) -> None:
        _require(self.path.startswith("/"), f"code.path must be absolute, got {self.path!r}")
        _require(bool(re.fullmatch(r"[0-9a-f]{64}", self.sha256)), f"code.sha256 {self.sha256!r} is not a sha256 hex digest")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """One training run. Defaults train the digits CNN with 2 CPU processes in well under a minute.

    What is trained is the ``task`` (``trainer.task``): a registered name (``kloop tasks``) or
    ``module:Class``; ``config`` sets fields of the task's config dataclass (checked against it
    by ``trainer.task.resolve`` before any process starts). Everything else here is kloop's:
    how many processes, how long, where, with what restarts and checkpoints.
    """

    model_name: str = "digits"  # registry name the result is published under
    task: str = "digits"  # registered task name or "module:Class" (trainer.task)
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # task config overrides
    epochs: int = 8  # full passes over the training split; ~97 % test accuracy by then
    global_batch_size: int = 64  # samples per optimizer step over ALL processes; fixes the math
    seed: int = 0  # model init and data order; same seed + global batch = same result at any world size
    nproc_per_node: int = 2  # processes per node (torchrun --nproc-per-node); 1 per GPU on CUDA
    num_nodes: int = 1  # replicas in a cluster: 1 Master + (num_nodes - 1) Workers
    device: Device = "auto"  # "auto" = CUDA when present, else CPU
    log_every_steps: int = 10  # progress "step" events every N optimizer steps (rank 0)
    # Restarts of the worker group (torchrun --max-restarts) after a worker dies: training
    # continues from the last checkpoint. 3 survives a few crashes without looping forever.
    max_restarts: int = 3
    # A checkpoint after every epoch and, when set, every N optimizer steps: what a restart
    # loses is at most that much work. None: per epoch only (an epoch takes seconds here).
    checkpoint_every_steps: int | None = None
    code: Code | None = None  # the task's code as a packed directory (None: in the image / path)
    # The container's command in a cluster, when the user brings their own (it must start the
    # training itself); None: torchrun + kloop's entry point (``trainer.job_manifests.command``).
    command: tuple[str, ...] | None = None
    resources: Resources = dataclasses.field(default_factory=Resources)
    image: str = "ghcr.io/kloop/kloop-trainer:0.1.0"  # container image with kloop installed
    restart_policy: RestartPolicy = "OnFailure"  # restarted pods resume from the last checkpoint
    clean_pod_policy: CleanPodPolicy = "None"  # keep finished pods for their logs by default
    backoff_limit: int = 3  # pod restarts before the job is marked failed
    # The job (and its pods) is deleted this long after it finished; a day keeps the logs for
    # a look and stops finished jobs piling up. None: never (the operator's default).
    ttl_seconds_after_finished: int | None = 86_400
    active_deadline_seconds: int | None = None  # the job is failed after running this long
    elastic: Elastic | None = None  # None = fixed size (Master + Workers)
    storage: Storage = dataclasses.field(default_factory=Storage)

    def __post_init__(self) -> None:
        try:
            check_name(self.model_name)  # the registry's rule, stated once
        except ValueError as e:
            raise SpecError(f"model_name: {e}") from None
        _require(isinstance(self.task, str) and bool(self.task), "task must name a task (a registered name or module:Class)")
        _require(isinstance(self.config, Mapping), f"config must be a mapping of task config fields, got {type(self.config).__name__}")
        object.__setattr__(self, "config", dict(self.config))
        if self.command is not None:
            _require(not isinstance(self.command, str) and all(isinstance(a, str) for a in self.command) and len(self.command) > 0,
                     f"command must be a non-empty list of strings, got {self.command!r}")
            object.__setattr__(self, "command", tuple(self.command))
        _require(_is_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        _require(_is_int(self.global_batch_size) and self.global_batch_size >= 1, f"global_batch_size must be >= 1, got {self.global_batch_size!r}")
        _require(_is_int(self.nproc_per_node) and self.nproc_per_node >= 1, f"nproc_per_node must be >= 1, got {self.nproc_per_node!r}")
        _require(_is_int(self.num_nodes) and self.num_nodes >= 1, f"num_nodes must be >= 1, got {self.num_nodes!r}")
        _require(self.log_every_steps >= 1, f"log_every_steps must be >= 1, got {self.log_every_steps}")
        _require(_is_int(self.max_restarts) and self.max_restarts >= 0, f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        _require(self.checkpoint_every_steps is None or (_is_int(self.checkpoint_every_steps) and self.checkpoint_every_steps >= 1),
                 f"checkpoint_every_steps must be an integer >= 1 or None, got {self.checkpoint_every_steps!r}")
        for name in ("ttl_seconds_after_finished", "active_deadline_seconds"):
            v = getattr(self, name)
            _require(v is None or (_is_int(v) and v >= (0 if name.startswith("ttl") else 1)),
                     f"{name} must be a whole number of seconds (or None), got {v!r}")
        _require(self.device in get_args(Device), f"device must be one of {get_args(Device)}, got {self.device!r}")
        _require(self.restart_policy in get_args(RestartPolicy), f"restart_policy must be one of {get_args(RestartPolicy)}, got {self.restart_policy!r}")
        _require(self.clean_pod_policy in get_args(CleanPodPolicy), f"clean_pod_policy must be one of {get_args(CleanPodPolicy)}, got {self.clean_pod_policy!r}")
        _require(self.backoff_limit >= 0, f"backoff_limit must be >= 0, got {self.backoff_limit}")
        _require(bool(self.image), "image must not be empty")
        if self.elastic is not None:
            _require(
                self.elastic.min_replicas <= self.num_nodes <= self.elastic.max_replicas,
                f"num_nodes {self.num_nodes} must lie in elastic [{self.elastic.min_replicas}, {self.elastic.max_replicas}]",
            )
        for n in self._world_sizes():
            _require(
                self.global_batch_size % n == 0,
                f"global_batch_size {self.global_batch_size} is not divisible by the world size {n} "
                f"(nodes x nproc_per_node); every process takes an equal share of each batch",
            )
        if self.resources.gpus > 0:
            _require(self.device != "cpu", f"resources.gpus={self.resources.gpus} but device='cpu': the GPUs would sit idle")
            _require(
                self.nproc_per_node <= self.resources.gpus,
                f"nproc_per_node {self.nproc_per_node} exceeds resources.gpus {self.resources.gpus}: one process per GPU",
            )

    @property
    def world_size(self) -> int:
        """Processes in the fixed-size job (num_nodes x nproc_per_node)."""
        return self.num_nodes * self.nproc_per_node

    def _world_sizes(self) -> list[int]:
        if self.elastic is None:
            return [self.world_size]
        return [n * self.nproc_per_node for n in range(self.elastic.min_replicas, self.elastic.max_replicas + 1)]

    def replace(self, **changes: Any) -> TrainSpec:
        """A copy with ``changes`` applied (and validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainSpec:
        """The inverse of ``to_dict``; unknown keys are an error (a typo must not vanish)."""
        d = dict(d)
        nested: dict[str, Any] = {}
        if "resources" in d:
            nested["resources"] = _build(Resources, d.pop("resources"), "resources")
        if "storage" in d:
            nested["storage"] = _build(Storage, d.pop("storage"), "storage")
        d = _legacy(d)
        if "code" in d:
            c = d.pop("code")
            nested["code"] = None if c is None else _build(Code, c, "code")
        if "elastic" in d:
            e = d.pop("elastic")
            nested["elastic"] = None if e is None else _build(Elastic, e, "elastic")
        return _build(cls, {**d, **nested}, "TrainSpec")


_LEGACY_CONFIG = ("lr", "momentum", "shuffle_labels")


def _legacy(d: dict[str, Any]) -> dict[str, Any]:
    """Specs saved before tasks (``arch`` and the digits CNN's hyperparameters at the top
    level) read as the digits task with those values in its config, so old records load
    (``kloop runs``, a pipeline's params). Their checkpoints predate the task identity and do not
    resume: ``CheckpointMismatch`` says so."""
    if "arch" not in d:
        return d
    arch = d.pop("arch")
    _require(arch == "digits_cnn", f"arch {arch!r}: specs name a task now (task=...)")
    config = dict(d.get("config", {}))
    for k in _LEGACY_CONFIG:
        if k in d:
            config[k] = d.pop(k)
    return {**d, "task": d.get("task", "digits"), "config": config}


def _build(cls: type[T], d: Any, where: str) -> T:
    if not isinstance(d, Mapping):
        raise SpecError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if unknown:
        raise SpecError(f"{where}: unknown fields {unknown}; known: {sorted(known)}")
    return cls(**d)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
