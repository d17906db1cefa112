"""Held-out evaluation of a served graph: the task's metrics as sums, reducible over processes.

``metric_sums`` accepts anything that maps the positional inputs to the served outputs: the
eager ``ServedGraph`` during training, and the exported program's ``.module()`` afterwards,
so the metrics that get published are measured on the artifact that gets served. Each metric
is a mean of per-example values, so a process returns (sum per metric, count) over its shard
and the sums of all processes, all-reduced, give exactly the metrics of the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from trainer.data import positional, to_device
from trainer.task import Metric

EVAL_BATCH = 512  # items per forward pass; bounds memory, not results


@torch.no_grad()
def metric_sums(module: nn.Module, dataset: Dataset[Any], indices: Sequence[int],
                input_names: Sequence[str], output_names: Sequence[str],
                metrics: Sequence[Metric], device: torch.device | None = None) -> list[float]:
    """[sum of metric 1, ..., sum of metric k, count] over ``dataset[indices]``."""
    if not isinstance(module, torch.fx.GraphModule):
        module.eval()
    sums = [0.0] * (len(metrics) + 1)
    if not indices:
        return sums
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=EVAL_BATCH, shuffle=False)
    for inputs, target in loader:
        if device is not None:
            inputs, target = to_device(inputs, device), to_device(target, device)
        outs = module(*positional(inputs, input_names))
        outs = outs if isinstance(outs, tuple | list) else (outs,)
        served = dict(zip(output_names, outs, strict=True))
        for i, m in enumerate(metrics):
            sums[i] += float(m.per_example(served, target).double().sum())
        sums[-1] += float(len(outs[0]))
    return sums


def finalize(metrics: Sequence[Metric], sums: Sequence[float]) -> dict[str, float]:
    """The metrics' values from (all-reduced) ``metric_sums``."""
    count = sums[-1]
    return {m.name: m.value(sums[i], count) for i, m in enumerate(metrics)}
