"""The distributed training loop: DDP over a world-size-independent data order.

Why results do not depend on the number of processes: every process draws the SAME seeded
permutation of the training set each epoch (``DistributedSampler`` seeds with ``seed + epoch``
and does not depend on the world size). With ``drop_last`` and a per-process batch of
``global_batch_size // world_size``, process r's k-th batch holds the permutation's positions
``k*B + r, k*B + r + W, ...``: the union over processes is exactly positions ``k*B .. k*B+B-1``,
the k-th batch of a single process. Each process takes the mean loss of its equal share and DDP
averages the gradients, so every optimizer step sees the gradient of the same global batch. The
model has no dropout or batch norm (see ``trainer.models``), so nothing else depends on the shard.

Why resume reproduces an uninterrupted run: the data order is a function of (seed, epoch) only,
and the checkpoint holds the model, the optimizer's momentum and the RNG state after an epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from kloop.fsutil import atomic_write_bytes
from trainer import checkpoint
from trainer.data import DigitsSplit, load_split
from trainer.distributed import (
    DistEnv,
    all_reduce_sum,
    destroy_process_group,
    init_process_group,
    select_device,
)
from trainer.evaluate import evaluate
from trainer.export import export_model, load_exported
from trainer.models import build_model
from trainer.progress import ProgressLog
from trainer.rundir import CHECKPOINT_FILE, METRICS_FILE, RESULT_FILE
from trainer.spec import TrainSpec

_EXPORT_LOSS_TOLERANCE = 1e-4  # exported vs eager held-out loss: same graph, same weights


class ExportMismatch(RuntimeError):
    """The exported program does not reproduce the eager model's held-out metrics."""


def make_loader(split: DigitsSplit, spec: TrainSpec,
                env: DistEnv) -> DataLoader[tuple[torch.Tensor, ...]]:
    """This process's share of every global batch (see the module docstring)."""
    if spec.global_batch_size % env.world_size:
        raise ValueError(
            f"global_batch_size {spec.global_batch_size} is not divisible by the world size {env.world_size}"
        )
    dataset = TensorDataset(torch.from_numpy(split.train_images), torch.from_numpy(split.train_labels))
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=spec.seed, drop_last=True
    )
    return DataLoader(
        dataset, batch_size=spec.global_batch_size // env.world_size, sampler=sampler, drop_last=True
    )


def train(spec: TrainSpec, run_dir: Path, *, resume: bool, env: DistEnv) -> dict[str, Any] | None:
    """Train, checkpoint each epoch, then (rank 0) evaluate and export. Returns the result on
    rank 0, None elsewhere."""
    device = select_device(spec, env)
    init_process_group(env, device)
    try:
        result = _train(spec, run_dir, resume=resume, env=env, device=device)
        dist.barrier()  # the job ends together: no rank exits while rank 0 still exports
        return result
    finally:
        destroy_process_group()


def _train(
    spec: TrainSpec, run_dir: Path, *, resume: bool, env: DistEnv, device: torch.device
) -> dict[str, Any] | None:
    started = time.time()
    log = ProgressLog(run_dir, enabled=env.is_main)
    torch.manual_seed(spec.seed)
    model = build_model(spec.arch).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    split = load_split(shuffle_labels=spec.shuffle_labels, label_seed=spec.seed)
    loader = make_loader(split, spec, env)
    ckpt_path = run_dir / CHECKPOINT_FILE

    start_epoch = 1
    ckpt = checkpoint.load(ckpt_path, spec) if resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        torch.set_rng_state(ckpt.rng)
        start_epoch = ckpt.epoch + 1
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    log.emit(
        "start", epochs=spec.epochs, start_epoch=start_epoch, world_size=env.world_size,
        device=str(device), resumed=ckpt is not None, data_fingerprint=split.fingerprint,
    )

    last: dict[str, float] = {}
    for epoch in range(start_epoch, spec.epochs + 1):
        last = _train_epoch(ddp, optimizer, loader, spec, epoch, device, log)
        if env.is_main:
            checkpoint.save(ckpt_path, checkpoint.Checkpoint(
                epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                rng=torch.get_rng_state(), identity=checkpoint.identity(spec),
            ))
        dist.barrier()  # no rank runs ahead of the checkpoint it would resume from
    # Drop DDP's reducer (and its communication hooks) before the process group goes away.
    del ddp
    if not env.is_main:
        return None
    return _finish(model.cpu(), split, spec, run_dir, env, log, started, last)


def _train_epoch(
    ddp: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    spec: TrainSpec,
    epoch: int,
    device: torch.device,
    log: ProgressLog,
) -> dict[str, float]:
    ddp.train()
    assert isinstance(loader.sampler, DistributedSampler)
    loader.sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0.0, 0.0
    steps = len(loader)
    for step, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = ddp(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward untyped
        optimizer.step()
        loss_sum += float(loss.detach()) * y.shape[0]
        correct += float((logits.detach().argmax(1) == y).sum())
        seen += y.shape[0]
        if step % spec.log_every_steps == 0 and step < steps:
            # rank 0's shard only: a collective per log line would slow every process down
            log.emit("step", epoch=epoch, step=step, steps=steps, loss=loss_sum / seen)
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
    elapsed = time.perf_counter() - t0
    stats = {"loss": loss_sum / seen, "accuracy": correct / seen}
    log.emit(
        "epoch", epoch=epoch, epochs=spec.epochs, steps=steps, samples_per_s=seen / elapsed, **stats
    )
    return stats


def _finish(
    model: nn.Module,
    split: DigitsSplit,
    spec: TrainSpec,
    run_dir: Path,
    env: DistEnv,
    log: ProgressLog,
    started: float,
    last: dict[str, float],
) -> dict[str, Any]:
    """Evaluate, export, and prove the export computes what was measured."""
    eager = evaluate(model, split)
    model_path = export_model(model, run_dir)
    metrics = evaluate(load_exported(model_path), split)
    if metrics["accuracy"] != eager["accuracy"] or abs(metrics["loss"] - eager["loss"]) > _EXPORT_LOSS_TOLERANCE:
        raise ExportMismatch(f"exported model measures {metrics}, eager model {eager}")
    seconds = time.time() - started
    result = {
        "metrics": metrics,
        "model_path": str(model_path.relative_to(run_dir)),
        "train": last,
        "epochs": spec.epochs,
        "world_size": env.world_size,
        "seconds": seconds,
        "data_fingerprint": split.fingerprint,
        "torch_version": torch.__version__,
        "spec": spec.to_dict(),
    }
    _write_json(run_dir / METRICS_FILE, metrics)
    _write_json(run_dir / RESULT_FILE, result)
    log.emit("done", metrics=metrics, model_path=result["model_path"], seconds=seconds, train=last)
    return result


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
