"""The served graph of a task, its OIP v2 signature, and its ``torch.export``.

Why one module for all three: the graph that is exported, the graph that is evaluated and the
signature that is published must be the same thing. ``ServedGraph`` is ``serve(model(
*preprocess(*inputs)))`` with the inputs positional in the example input's order and the
outputs a tuple in ``serve``'s key order: what the server calls (``serving.core.runtime``
passes the request's tensors positionally in the manifest's order and reads the outputs the
same way).

The batch dimension is dynamic (1 or more, no upper bound: the signature's ``-1``), so the
server's dynamic batcher can send any batch through one program; the export is traced at the
example's batch of two or more rows (at one row torch would specialise the size to 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kloop.artifact import TensorSpec
from kloop.fsutil import atomic_path
from trainer.task import OIP_DATATYPES, TaskError


class _Identity(nn.Module):
    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return inputs


class ServedGraph(nn.Module):
    """``inputs -> preprocess -> model -> serve`` as one module (see the module docstring)."""

    def __init__(self, model: nn.Module, preprocess: nn.Module | None,
                 serve: Callable[[Any], Mapping[str, torch.Tensor]],
                 output_names: Sequence[str]) -> None:
        super().__init__()
        self.preprocess = preprocess if preprocess is not None else _Identity()
        self.preprocess.requires_grad_(False)  # fitted on the data, never trained
        self.model = model
        self._serve = serve
        self.output_names = tuple(output_names)

    def model_outputs(self, *inputs: torch.Tensor) -> Any:
        """What the model returns (for the loss) on raw inputs."""
        pre = self.preprocess(*inputs)
        return self.model(*(pre if isinstance(pre, tuple | list) else (pre,)))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        served = self._serve(self.model_outputs(*inputs))
        return tuple(served[n] for n in self.output_names)


def datatype(dtype: torch.dtype, what: str) -> str:
    """The OIP v2 datatype of ``dtype``, or a ``TaskError`` naming ``what``."""
    try:
        return OIP_DATATYPES[dtype]
    except KeyError:
        raise TaskError(f"{what} has dtype {dtype}, which has no OIP v2 datatype "
                        f"(use one of {', '.join(str(d) for d in OIP_DATATYPES)})") from None


def tensor_spec(name: str, t: torch.Tensor, what: str) -> TensorSpec:
    """``name``'s signature entry: its datatype and its shape with the batch dimension -1."""
    if t.dim() < 1:
        raise TaskError(f"{what} is a scalar; tensors need a batch dimension first")
    return TensorSpec(name, datatype(t.dtype, what), (-1, *(int(d) for d in t.shape[1:])))


def with_batch_of_two(example: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The example inputs with at least two rows (repeated from the first when there is one)."""
    out = []
    for t in example.values():
        out.append(t if t.shape[0] >= 2 else t[:1].expand(2, *t.shape[1:]).contiguous())
    return tuple(out)


def export(graph: ServedGraph, example: Mapping[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """``graph`` exported with a dynamic batch dimension shared by every input."""
    graph = graph.eval().cpu()
    args = with_batch_of_two(example)
    batch = torch.export.Dim("batch", min=1)
    dynamic = (tuple({0: batch} for _ in args),)
    with torch.no_grad():
        return torch.export.export(graph, args, dynamic_shapes=dynamic)


def save(program: torch.export.ExportedProgram, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt2") as tmp:
        torch.export.save(program, tmp)
    return path
