"""Resolve a task reference and prove it can work, before any process starts.

``resolve(ref, config)`` imports the task, builds its config, and then does, in this process,
everything the training job would find wrong later: the metrics' declarations, the datasets,
the example input's datatypes, a forward and a loss on two training items, the metrics on the
served outputs, and ``torch.export`` of the served graph with a dynamic batch. The first
problem is raised as one ``TaskError`` that names it ("metric 'rmse' has no direction"); a
task that passes trains, exports and publishes with the signature found here.

The checked ``ResolvedTask`` is also what the training processes and the publisher use: the
config, the input and output names and the signature come from one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from kloop.artifact import TensorSpec
from trainer import served
from trainer.data import fingerprint, length, positional
from trainer.evaluate import metric_sums
from trainer.task import (
    DIRECTIONS,
    Datasets,
    Metric,
    Task,
    TaskError,
    config_dict,
    load_class,
    make_config,
    reference,
)


@dataclasses.dataclass(frozen=True)
class ResolvedTask:
    """A task class with its config, checked; build instances with ``instance``."""

    ref: str  # as given ("digits", "mypkg.task:Churn")
    target: str  # module:Class
    cls: type[Task[Any]]
    config: Any  # the task's config dataclass instance

    @property
    def config_dict(self) -> dict[str, Any]:
        return config_dict(self.config)

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return self.cls.metrics

    @property
    def primary_metric(self) -> str:
        return self.cls.primary_metric

    def instance(self) -> Task[Any]:
        task = self.cls(self.config)
        task.setup()
        return task

    def evaluation(self) -> dict[str, Any]:
        """How the metrics are judged, for the manifest (``Manifest.evaluation``)."""
        return {"primary": self.primary_metric, "metrics": {
            m.name: {"direction": m.direction, "threshold": m.threshold} for m in self.metrics}}

    def source_digest(self) -> str | None:
        """sha256 of the file that defines the task class (lineage), None if it has none."""
        try:
            path = inspect.getsourcefile(self.cls)
        except TypeError:
            return None
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def load(ref: str, config: Mapping[str, Any]) -> ResolvedTask:
    """The task class and config, without the checks that build models (in the workers,
    which run what ``resolve`` already checked)."""
    cls = load_class(ref)
    return ResolvedTask(ref=ref, target=reference(ref), cls=cls, config=make_config(cls, config))


def resolve(ref: str, config: Mapping[str, Any]) -> tuple[ResolvedTask, Signature]:
    """Load and check the task (see the module docstring). Raises ``TaskError``."""
    rt = load(ref, config)
    name = rt.cls.__name__
    _check_metrics(rt.cls)
    try:
        task = rt.instance()
        data = task.datasets()
    except TaskError:
        raise
    except Exception as e:
        raise TaskError(f"{name}: setup/datasets failed: {type(e).__name__}: {e}") from e
    _check_datasets(name, data)
    example = _example(name, task)
    torch.manual_seed(0)
    graph = build_graph(task, data.train, example, what=name)
    signature = signature_of(graph, example, name)
    _check_train_step(name, task, graph, data, signature)
    _check_held_out(name, rt, graph, data, signature)
    try:
        served.export(graph, example)
    except Exception as e:  # torch.export's errors are many and long; the first line says why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskError(f"{name}: the model does not export with torch.export "
                        f"(dynamic batch): {type(e).__name__}: {first}") from e
    return rt, signature


def build_graph(task: Task[Any], train: Dataset[Any], example: Mapping[str, torch.Tensor],
                *, what: str) -> served.ServedGraph:
    """The served graph of a fresh model; its output names from one eager call."""
    try:
        model = task.model()
        pre = task.preprocess(train)
    except Exception as e:
        raise TaskError(f"{what}: model()/preprocess() failed: {type(e).__name__}: {e}") from e
    graph = served.ServedGraph(model, pre, task.serve, output_names=())
    try:
        with torch.no_grad():
            out = task.serve(graph.eval().model_outputs(*served.with_batch_of_two(example)))
    except Exception as e:
        raise TaskError(f"{what}: the model does not run on the example input: "
                        f"{type(e).__name__}: {e}") from e
    if not isinstance(out, Mapping) or not out or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise TaskError(f"{what}: serve() must return a non-empty dict of tensors by output name")
    graph.output_names = tuple(str(k) for k in out)
    return graph


def signature_of(graph: served.ServedGraph, example: Mapping[str, torch.Tensor],
                 what: str) -> Signature:
    args = served.with_batch_of_two(example)
    with torch.no_grad():
        outs = graph.eval()(*args)
    rows = args[0].shape[0]
    inputs = tuple(served.tensor_spec(n, t, f"{what}: input {n!r}") for n, t in example.items())
    outputs = []
    for n, t in zip(graph.output_names, outs, strict=True):
        if t.dim() < 1 or t.shape[0] != rows:
            raise TaskError(f"{what}: output {n!r} has shape {tuple(t.shape)} for a batch of "
                            f"{rows}; outputs need the batch dimension first")
        outputs.append(served.tensor_spec(n, t, f"{what}: output {n!r}"))
    return Signature(inputs, tuple(outputs))


def _check_metrics(cls: type[Task[Any]]) -> None:
    name = cls.__name__
    if not cls.metrics:
        raise TaskError(f"{name}: declares no metrics (metrics = (Metric(name, direction, fn), ...))")
    seen: set[str] = set()
    for m in cls.metrics:
        if not isinstance(m, Metric):
            raise TaskError(f"{name}: metrics must be trainer.task.Metric, got {m!r}")
        if m.direction not in DIRECTIONS:
            raise TaskError(f"{name}: metric {m.name!r} has no direction: say whether higher or "
                            f"lower is better (got {m.direction!r})")
        if m.name in seen:
            raise TaskError(f"{name}: metric {m.name!r} is declared twice")
        if not callable(m.per_example):
            raise TaskError(f"{name}: metric {m.name!r}: per_example is not callable")
        if m.threshold is not None and not math.isfinite(m.threshold):
            raise TaskError(f"{name}: metric {m.name!r}: threshold must be a finite number")
        seen.add(m.name)
    if cls.primary_metric not in seen:
        raise TaskError(f"{name}: primary_metric {cls.primary_metric!r} is not among its metrics "
                        f"({', '.join(sorted(seen))})")


def _check_datasets(name: str, data: Any) -> None:
    if not isinstance(data, Datasets):
        raise TaskError(f"{name}: datasets() must return trainer.task.Datasets, got {type(data).__name__}")
    for what in ("train", "held_out"):
        ds = getattr(data, what)
        if not isinstance(ds, Dataset):
            raise TaskError(f"{name}: datasets().{what} is a {type(ds).__name__}, not a torch Dataset")
        length(ds, what)
    if not isinstance(data.definition, Mapping) or not data.definition:
        raise TaskError(f"{name}: datasets().definition must say how the held-out split is made "
                        "(a non-empty dict: source, seed, fraction, ...)")


def _check_held_out(name: str, rt: ResolvedTask, graph: served.ServedGraph, data: Datasets,
                    signature: Signature) -> None:
    """The held-out split as rank 0 will meet it: its fingerprint (the definition as JSON, every
    item's tensors), and two of its items through the graph and every metric."""
    try:
        fingerprint(data.definition, data.held_out)
    except TaskError as e:
        raise TaskError(f"{name}: held-out split: {e}") from e
    except Exception as e:
        raise TaskError(f"{name}: reading the held-out split failed: {type(e).__name__}: {e}") from e
    n = min(2, length(data.held_out, "held_out"))
    try:
        metric_sums(graph, data.held_out, range(n), signature.input_names,
                    signature.output_names, rt.metrics)
    except Exception as e:
        raise TaskError(f"{name}: two held-out items do not run through the model and its "
                        f"metrics: {type(e).__name__}: {e}") from e


def _example(name: str, task: Task[Any]) -> dict[str, torch.Tensor]:
    ex = task.example_input()
    if not isinstance(ex, Mapping) or not ex:
        raise TaskError(f"{name}: example_input() must return a non-empty dict of tensors by name")
    rows = set()
    for n, t in ex.items():
        if not isinstance(n, str) or not n:
            raise TaskError(f"{name}: example input names must be non-empty strings, got {n!r}")
        if not isinstance(t, torch.Tensor):
            raise TaskError(f"{name}: example input {n!r} is a {type(t).__name__}, not a tensor")
        served.tensor_spec(n, t, f"{name}: input {n!r}")  # datatype and batch dimension
        rows.add(int(t.shape[0]))
    if len(rows) != 1:
        raise TaskError(f"{name}: the example inputs disagree on the batch size ({sorted(rows)})")
    return dict(ex)


def _check_train_step(name: str, task: Task[Any], graph: served.ServedGraph, data: Datasets,
                      signature: Signature) -> None:
    """Two training items through the graph, the loss and every metric."""
    n = min(2, length(data.train, "train"))
    try:
        inputs, target = default_collate([data.train[i] for i in range(n)])
    except (TypeError, ValueError) as e:
        raise TaskError(f"{name}: training items must be (inputs, target) pairs: {e}") from e
    args = positional(inputs, signature.input_names)
    for spec, t in zip(signature.inputs, args, strict=True):
        if not isinstance(t, torch.Tensor) or served.datatype(t.dtype, spec.name) != spec.datatype \
                or tuple(t.shape[1:]) != spec.shape[1:]:
            got = f"{t.dtype} {tuple(t.shape[1:])}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TaskError(f"{name}: the dataset's input {spec.name!r} is {got} per batch, the "
                            f"example input says {spec.datatype} {spec.shape[1:]}")
    graph.train()
    try:
        loss = task.loss(graph.model_outputs(*args), target)
    except Exception as e:
        raise TaskError(f"{name}: loss() failed on two training items: {type(e).__name__}: {e}") from e
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
        raise TaskError(f"{name}: loss() must return a scalar tensor with a gradient")
    graph.eval()
    with torch.no_grad():
        out = dict(zip(signature.output_names, graph(*args), strict=True))
    for m in task.metrics:
        try:
            v = m.per_example(out, target)
        except Exception as e:
            raise TaskError(f"{name}: metric {m.name!r} failed on the served outputs "
                            f"({', '.join(out)}): {type(e).__name__}: {e}") from e
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,):
            got = str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TaskError(f"{name}: metric {m.name!r} must give one value per example "
                            f"(shape ({n},)), got {got}")
