"""The distributed training loop of any task: DDP over a world-size-independent data order.

Why results do not depend on the number of processes: every process draws the SAME seeded
permutation of the training set each epoch (``DistributedSampler`` seeds with ``seed + epoch``
and does not depend on the world size). With ``drop_last`` and a per-process batch of
``global_batch_size // world_size``, process r's k-th batch holds the permutation's positions
``k*B + r, k*B + r + W, ...``: the union over processes is exactly positions ``k*B .. k*B+B-1``,
the k-th batch of a single process. Each process takes the mean loss of its equal share and DDP
averages the gradients, so every optimizer step sees the gradient of the same global batch
(for a model whose computation does not depend on the shard: no batch norm or dropout).

Why resume (and a restart by torchrun after a worker died) reproduces an uninterrupted run:
the data order is a function of (seed, epoch) only, and the checkpoint holds the model, the
optimizer's state, the RNG state and how far into the epoch it was taken. A restarted worker
group (torchrun's ``TORCHELASTIC_RESTART_COUNT`` > 0) always resumes from the checkpoint.

Evaluation is all-reduced: each process measures its shard of the held-out split and the sums
are added up, every epoch (the live curve) and at the end on the exported program, which must
reproduce the eager model's metrics: what is published is what is served.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kloop import modelfile
from kloop.fsutil import atomic_write_bytes
from trainer import checkpoint, served
from trainer.data import fingerprint, length, positional, shard, to_device
from trainer.distributed import (
    DistEnv,
    all_reduce_sum,
    destroy_process_group,
    init_process_group,
    select_device,
)
from trainer.evaluate import finalize, metric_sums
from trainer.progress import ProgressLog
from trainer.rundir import CHECKPOINT_FILE, EXPORT_DIR, METRICS_FILE, MODEL_FILE, RESULT_FILE
from trainer.spec import TrainSpec
from trainer.task import Task
from trainer.task_check import ResolvedTask, build_graph, load, signature_of

# The exported program and the eager model differ only by float summation order.
_EXPORT_TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """The exported program does not reproduce the eager model's held-out metrics."""


def make_loader(train: Dataset[Any], spec: TrainSpec, env: DistEnv) -> DataLoader[Any]:
    """This process's share of every global batch (see the module docstring)."""
    if spec.global_batch_size % env.world_size:
        raise ValueError(
            f"global_batch_size {spec.global_batch_size} is not divisible by the world size {env.world_size}"
        )
    per_process = spec.global_batch_size // env.world_size
    if length(train, "train") < spec.global_batch_size:
        raise ValueError(f"the training split has {length(train, 'train')} items, fewer than one "
                         f"global batch of {spec.global_batch_size}")
    sampler: DistributedSampler[Any] = DistributedSampler(
        train, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=spec.seed, drop_last=True
    )
    return DataLoader(train, batch_size=per_process, sampler=sampler, drop_last=True)


def train(spec: TrainSpec, run_dir: Path, *, resume: bool, env: DistEnv) -> dict[str, Any] | None:
    """Train, checkpoint, then export and evaluate. Returns the result on rank 0, None
    elsewhere. A worker group torchrun restarted resumes whatever ``resume`` says."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    device = select_device(spec, env)
    init_process_group(env, device)
    try:
        result = _Run(spec, run_dir, env, device).train(resume=resume or restarted)
        dist.barrier()  # the job ends together: no rank exits while rank 0 still writes
        return result
    finally:
        destroy_process_group()


class _Run:
    """One process's part of a training run."""

    def __init__(self, spec: TrainSpec, run_dir: Path, env: DistEnv, device: torch.device) -> None:
        self.spec, self.run_dir, self.env, self.device = spec, run_dir, env, device
        self.log = ProgressLog(run_dir, enabled=env.is_main)
        self.rt: ResolvedTask = load(spec.task, spec.config)
        self.task: Task[Any] = self.rt.instance()
        self.data = self.task.datasets()
        self.example = dict(self.task.example_input())
        torch.manual_seed(spec.seed)  # the same initial weights in every process and run
        self.graph = build_graph(self.task, self.data.train, self.example, what=self.rt.cls.__name__)
        self.signature = signature_of(self.graph, self.example, self.rt.cls.__name__)
        self.names = self.signature.input_names
        self.graph.to(device)
        self.optimizer = self.task.optimizer(self.graph.model.parameters())
        self.identity = checkpoint.identity(spec, self.rt.target, self.rt.config_dict)
        self.held_out_shard = shard(length(self.data.held_out, "held_out"), env.rank, env.world_size)

    def train(self, *, resume: bool) -> dict[str, Any] | None:
        spec, env = self.spec, self.env
        started = time.time()
        loader = make_loader(self.data.train, spec, env)
        ckpt_path = self.run_dir / CHECKPOINT_FILE
        ckpt = checkpoint.load(ckpt_path, self.identity) if resume else None
        start_epoch, skip = 1, 0
        if ckpt is not None:
            self.graph.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(ckpt.optimizer)
            torch.set_rng_state(ckpt.rng)
            start_epoch, skip = ckpt.epoch + 1, ckpt.step
        fp = fingerprint(self.data.definition, self.data.held_out) if env.is_main else ""
        ddp = DistributedDataParallel(self.graph.model,
                                      device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.log.emit(
            "start", task=self.rt.target, epochs=spec.epochs, start_epoch=start_epoch,
            start_step=skip, world_size=env.world_size, device=str(self.device),
            resumed=ckpt is not None, restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            data_fingerprint=fp, primary_metric=self.rt.primary_metric,
        )
        last: dict[str, Any] = {}
        for epoch in range(start_epoch, spec.epochs + 1):
            last = self._epoch(ddp, loader, epoch, skip if epoch == start_epoch else 0)
            self._checkpoint(ckpt_path, epoch, 0)
            dist.barrier()  # no rank runs ahead of the checkpoint it would resume from
        del ddp  # drop DDP's reducer (and its hooks) before the process group goes away
        return self._finish(started, last, fp)

    def _epoch(self, ddp: nn.Module, loader: DataLoader[Any], epoch: int, skip: int) -> dict[str, Any]:
        spec = self.spec
        ddp.train()
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0.0
        steps = len(loader)
        for step, (inputs, target) in enumerate(loader, start=1):
            if step <= skip:
                continue  # done before the restart: the checkpoint holds its effect
            args = positional(to_device(inputs, self.device), self.names)
            target = to_device(target, self.device)
            pre = self.graph.preprocess(*args)
            outputs = ddp(*(pre if isinstance(pre, tuple | list) else (pre,)))
            loss = self.task.loss(outputs, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward untyped
            self.optimizer.step()
            rows = float(args[0].shape[0])
            loss_sum += float(loss.detach()) * rows
            seen += rows
            if step % spec.log_every_steps == 0 and step < steps:
                # rank 0's shard only: a collective per log line would slow every process down
                self.log.emit("step", epoch=epoch, step=step, steps=steps, loss=loss_sum / seen)
            every = spec.checkpoint_every_steps
            if every is not None and step % every == 0 and step < steps:
                self._checkpoint(self.run_dir / CHECKPOINT_FILE, epoch - 1, step)
        loss_sum, seen = all_reduce_sum([loss_sum, seen], self.device)
        elapsed = time.perf_counter() - t0
        held_out = self._evaluate(self.graph, self.device)
        stats: dict[str, Any] = {"loss": loss_sum / seen if seen else float("nan"), "held_out": held_out}
        self.log.emit("epoch", epoch=epoch, epochs=spec.epochs, steps=steps,
                      samples_per_s=seen / elapsed if elapsed > 0 else 0.0, **stats)
        return stats

    def _checkpoint(self, path: Path, epoch: int, step: int) -> None:
        if self.env.is_main:
            checkpoint.save(path, checkpoint.Checkpoint(
                epoch=epoch, model=self.graph.model.state_dict(), optimizer=self.optimizer.state_dict(),
                rng=torch.get_rng_state(), identity=self.identity, step=step,
            ))
            if step:
                self.log.emit("checkpoint", epoch=epoch + 1, step=step)

    def _evaluate(self, module: nn.Module, device: torch.device | None) -> dict[str, float]:
        """The task's metrics on the whole held-out split, every process measuring its shard."""
        sums = metric_sums(module, self.data.held_out, self.held_out_shard, self.names,
                           self.signature.output_names, self.rt.metrics, device)
        total = all_reduce_sum(sums, self.device)
        self.graph.train()
        self.graph.preprocess.eval()  # outside DDP and never trained: always in eval mode
        return finalize(self.rt.metrics, total)

    def _finish(self, started: float, last: dict[str, Any], fp: str) -> dict[str, Any] | None:
        """Export (rank 0), then every process measures the exported program on its shard:
        it must reproduce the eager model's metrics."""
        eager = self._evaluate(self.graph, self.device)
        model_path = self.run_dir / EXPORT_DIR / MODEL_FILE
        if self.env.is_main:
            cpu_graph = self.graph.cpu()
            served.save(served.export(cpu_graph, self.example), model_path)
            self.graph.to(self.device)
        dist.barrier()  # the program is on disk for every process
        program = modelfile.load_exported(model_path)
        exported = finalize(self.rt.metrics, all_reduce_sum(
            metric_sums(program, self.data.held_out, self.held_out_shard, self.names,
                        self.signature.output_names, self.rt.metrics), self.device))
        off = {k: (exported[k], eager[k]) for k in eager
               if not abs(exported[k] - eager[k]) <= _EXPORT_TOLERANCE * max(1.0, abs(eager[k]))}
        if off:
            raise ExportMismatch(f"the exported program measures (exported, eager) {off}")
        if not self.env.is_main:
            return None
        metrics = {**exported, "num_examples": length(self.data.held_out, "held_out"),
                   "data_fingerprint": fp}
        seconds = time.time() - started
        result = {
            "metrics": metrics,
            "model_path": str(model_path.relative_to(self.run_dir)),
            "train": {"loss": last.get("loss")} if last else {},
            "epochs": self.spec.epochs,
            "world_size": self.env.world_size,
            "seconds": seconds,
            "data_fingerprint": fp,
            "torch_version": torch.__version__,
            "spec": self.spec.to_dict(),
            "task": {"ref": self.rt.ref, "target": self.rt.target, "config": self.rt.config_dict,
                     "source_sha256": self.rt.source_digest()},
            "evaluation": self.rt.evaluation(),
            "signature": {"inputs": [t.to_dict() for t in self.signature.inputs],
                          "outputs": [t.to_dict() for t in self.signature.outputs]},
        }
        _write_json(self.run_dir / METRICS_FILE, metrics)
        _write_json(self.run_dir / RESULT_FILE, result)
        self.log.emit("done", metrics=metrics, model_path=result["model_path"], seconds=seconds,
                      train=result["train"], primary_metric=self.rt.primary_metric)
        return result


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
