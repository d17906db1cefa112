"""The process's place in the job, read from the launcher's environment, and the process group.

Why a separate module: the entry point runs under three launchers that describe the job through
environment variables: ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
the training operator's PyTorchJob pods (the same names, plus PET_* for torchrun itself) and a
bare ``python -m trainer.main`` (nothing: a world of one). Reading them in one place, into a
typed ``DistEnv``, keeps the training loop free of ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (  # re-exported by torch.distributed
    PrefixStore,
    Store,
    TCPStore,
)

from trainer.launch import AGENT_PID_ENV, die_with_parent
from trainer.spec import TrainSpec

_TIMEOUT = datetime.timedelta(minutes=10)  # a stuck peer fails the job instead of hanging it


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistEnv:
        """Read torchrun's variables; fall back to the operator's PET_* ones (one process per
        pod, run without torchrun) and finally to a world of one."""
        e = os.environ if env is None else env

        def pick(*names: str, default: str) -> str:
            for n in names:
                if e.get(n):
                    return e[n]
            return default

        if "WORLD_SIZE" not in e and (":" in e.get("PET_NNODES", "") or e.get("PET_NPROC_PER_NODE", "1") != "1"):
            # Without torchrun, PET_NNODES counts processes only with one process per node and
            # a fixed size; an elastic range ("1:4") or several processes need torchrun.
            raise ValueError(
                f"PET_NNODES={e.get('PET_NNODES')!r}, PET_NPROC_PER_NODE={e.get('PET_NPROC_PER_NODE')!r}: "
                "run the entry point under torchrun (python -m torch.distributed.run -m trainer.main)"
            )
        world = int(pick("WORLD_SIZE", "PET_NNODES", default="1"))
        rank = int(pick("RANK", "PET_NODE_RANK", default="0"))
        local_rank = int(pick("LOCAL_RANK", default="0"))
        addr = pick("MASTER_ADDR", "PET_MASTER_ADDR", default="127.0.0.1")
        port = int(pick("MASTER_PORT", "PET_MASTER_PORT", default="29500"))
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the world of {world} processes")
        return cls(rank=rank, world_size=world, local_rank=local_rank, master_addr=addr, master_port=port)


def die_with_agent(env: Mapping[str, str] | None = None) -> bool:
    """Under torchrun's agent (it sets TORCHELASTIC_RUN_ID for its workers), have this worker
    SIGTERMed when the agent dies, even by SIGKILL: an orphaned worker would otherwise train on
    alone, or wait for its peers until the collective timeout. Started by ``run_local``, the
    agent's pid is known (``AGENT_PID_ENV``), so an agent that died before this call counts
    too. False when not under an agent (a bare run: its parent is a shell, or a pod's init)."""
    e = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in e:
        return False
    agent = e.get(AGENT_PID_ENV)
    return die_with_parent(signal.SIGTERM, int(agent) if agent else None)


def select_device(spec: TrainSpec, env: DistEnv) -> torch.device:
    """CUDA (one GPU per local rank) when asked for or available under "auto", else CPU."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available in this process")
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_process_group(env: DistEnv, device: torch.device) -> None:
    """gloo on CPU, nccl on CUDA. A world of one gets an in-memory store (no port to bind), so
    the training loop has a single code path."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = device if device.type == "cuda" else None
    if env.world_size == 1:
        from torch._C._distributed_c10d import HashStore

        dist.init_process_group(backend=backend, store=HashStore(), rank=0, world_size=1,
                                timeout=_TIMEOUT, device_id=device_id)
        return
    dist.init_process_group(backend=backend, store=_store(env), rank=env.rank,
                            world_size=env.world_size, timeout=_TIMEOUT, device_id=device_id)


def _store(env: DistEnv, environ: Mapping[str, str] | None = None) -> Store:
    """The rendezvous store, with a key prefix per torchrun restart.

    Why not ``init_method="env://"``: under torchrun the workers share the agent's store,
    which outlives a restart of the worker group, and env:// adds no prefix per attempt
    (torch assumes a fresh store per retry). The restarted workers then read the addresses
    the dead group published and fail with "connection refused"; seen with torch 2.13 when a
    worker is SIGKILLed. Prefixing the keys with the restart count gives each attempt its own.
    Without torchrun's agent (a pod running the entry point bare) rank 0 hosts the store.
    """
    e = os.environ if environ is None else environ
    agent = e.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=not agent and env.is_main, timeout=_TIMEOUT)
    attempt = e.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    return PrefixStore(f"kloop/attempt_{attempt}", store)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all processes (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]
