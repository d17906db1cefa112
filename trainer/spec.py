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
class TrainSpec:
    """One training run. Defaults train the digits CNN with 2 CPU processes in well under a minute."""

    model_name: str = "digits"  # registry name the result is published under
    arch: str = "digits_cnn"  # architecture registry key (trainer.models.ARCHITECTURES)
    epochs: int = 8  # full passes over the training split; ~97 % test accuracy by then
    global_batch_size: int = 64  # samples per optimizer step over ALL processes; fixes the math
    lr: float = 0.05  # SGD learning rate (momentum 0.9); tuned for batch 64
    momentum: float = 0.9  # SGD momentum
    seed: int = 0  # model init and data order; same seed + global batch = same result at any world size
    nproc_per_node: int = 2  # processes per node (torchrun --nproc-per-node); 1 per GPU on CUDA
    num_nodes: int = 1  # replicas in a cluster: 1 Master + (num_nodes - 1) Workers
    shuffle_labels: bool = False  # permute training labels: a deliberately bad candidate for demos
    device: Device = "auto"  # "auto" = CUDA when present, else CPU
    log_every_steps: int = 10  # progress "step" events every N optimizer steps (rank 0)
    resources: Resources = dataclasses.field(default_factory=Resources)
    image: str = "ghcr.io/kloop/kloop-trainer:0.1.0"  # container image with kloop installed
    restart_policy: RestartPolicy = "OnFailure"  # restarted pods resume from the last checkpoint
    clean_pod_policy: CleanPodPolicy = "None"  # keep finished pods for their logs by default
    backoff_limit: int = 3  # pod restarts before the job is marked failed
    elastic: Elastic | None = None  # None = fixed size (Master + Workers)
    storage: Storage = dataclasses.field(default_factory=Storage)

    def __post_init__(self) -> None:
        try:
            check_name(self.model_name)  # the registry's rule, stated once
        except ValueError as e:
            raise SpecError(f"model_name: {e}") from None
        _require(bool(self.arch), "arch must name an architecture")
        _require(_is_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        _require(_is_int(self.global_batch_size) and self.global_batch_size >= 1, f"global_batch_size must be >= 1, got {self.global_batch_size!r}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _require(_is_int(self.nproc_per_node) and self.nproc_per_node >= 1, f"nproc_per_node must be >= 1, got {self.nproc_per_node!r}")
        _require(_is_int(self.num_nodes) and self.num_nodes >= 1, f"num_nodes must be >= 1, got {self.num_nodes!r}")
        _require(self.log_every_steps >= 1, f"log_every_steps must be >= 1, got {self.log_every_steps}")
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
        if "elastic" in d:
            e = d.pop("elastic")
            nested["elastic"] = None if e is None else _build(Elastic, e, "elastic")
        return _build(cls, {**d, **nested}, "TrainSpec")


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
