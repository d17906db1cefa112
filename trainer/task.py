"""The task: the one contract between a user's model and data and kloop.

A task is a class the user writes; kloop does everything else (process groups, devices, DDP,
the sampler, checkpoints and resume, progress, all-reduced evaluation, ``torch.export``, the
signature, the artifact and its lineage). User code never calls ``torch.distributed``::

    @dataclasses.dataclass
    class Config:                      # the hyperparameters: ``kloop train --set lr=0.01``
        lr: float = 0.01

    class Churn(Task[Config]):
        Config = Config
        metrics = (Metric("accuracy", "higher", correct), Metric("rmse", "lower", sq, math.sqrt))
        primary_metric = "accuracy"    # what the rollout's gate judges by default

        def datasets(self) -> Datasets: ...           # train and held-out torch Datasets
        def model(self) -> nn.Module: ...             # called with the preprocessed inputs
        def loss(self, outputs, target) -> Tensor: ...
        def example_input(self) -> dict[str, Tensor]: ...  # names, dtypes, shapes (batch first)
        # optional: setup, preprocess, serve, optimizer

Why this shape (Lightning's module/data split, torchtitan's registry of specs, MLflow's metric
thresholds):

* **Data**: ``datasets()`` returns plain ``torch.utils.data.Dataset``s whose items are
  ``(inputs, target)``; ``inputs`` is one tensor (a model with one input) or a dict of tensors
  keyed by the example input's names. kloop adds the ``DistributedSampler``. Per-process state
  (opening files, building tables) belongs in ``setup()``, which every process calls.
* **The served graph** is ``serve(model(*preprocess(*inputs)))``, exported as one program:
  clients send raw inputs and get what ``serve`` returns, so what training applied to the data
  the server applies too. ``preprocess`` is fitted on the training split (a standardizer's mean
  and std as buffers) and is never trained; ``serve`` turns the model's outputs into named
  tensors (logits -> logits and label).
* **Metrics are measured on the served outputs**, per example: ``Metric.per_example(served,
  target)`` gives one value per example; kloop sums them over every process (all-reduce) and
  divides by the count, then ``finalize`` (``math.sqrt`` turns a mean squared error into RMSE).
  A metric declares its ``direction``; the gate compares candidates with it.
* **The signature** comes from ``example_input()``: its keys are the input names, in order;
  dtypes give the OIP datatypes; the first dimension is the (dynamic) batch. The outputs'
  names are ``serve``'s keys, their datatypes and shapes what the exported program returns.

``resolve`` turns a reference into a checked task before any process starts, and refuses a
task that cannot work with one ``TaskError`` naming the problem (``trainer.task_check``).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.metadata
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args

import torch
from torch import nn
from torch.utils.data import Dataset

Direction = Literal["higher", "lower"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)
ENTRY_POINT_GROUP = "kloop.tasks"

# torch dtypes a task's tensors may have, as OIP v2 datatypes (BYTES has no torch dtype).
OIP_DATATYPES: Mapping[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "UINT8", torch.int8: "INT8", torch.int16: "INT16",
    torch.int32: "INT32", torch.int64: "INT64", torch.float16: "FP16", torch.float32: "FP32",
    torch.float64: "FP64", torch.bfloat16: "BF16", torch.uint16: "UINT16",
    torch.uint32: "UINT32", torch.uint64: "UINT64",
}

ConfigT = TypeVar("ConfigT")
Served = dict[str, torch.Tensor]


class TaskError(ValueError):
    """A task cannot be trained; the message names the task and the problem."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """One held-out metric: the mean of a per-example value, then ``finalize``.

    name: the key in the artifact's metrics.
    direction: "higher" or "lower": which is better (the gate reads it from the artifact).
    per_example: (served outputs by name, target) -> a tensor of one value per example.
    finalize: applied to the mean (``math.sqrt`` for RMSE); None: the mean itself.
    threshold: the task's own floor ("higher") or ceiling ("lower") a version must reach to be
      promoted; the gate applies it unless the rollout's policy sets one.
    """

    name: str
    direction: Direction
    per_example: Callable[[Served, Any], torch.Tensor]
    finalize: Callable[[float], float] | None = None
    threshold: float | None = None

    def value(self, total: float, count: float) -> float:
        mean = total / count if count else math.nan
        return float(self.finalize(mean)) if self.finalize is not None else mean


@dataclasses.dataclass(frozen=True)
class Datasets:
    """The train and held-out splits, and what defines the held-out one.

    definition: plain JSON data that says how the held-out split was made (source, seed,
      fraction, ...): hashed with the held-out bytes into the fingerprint the gate compares.
    """

    train: Dataset[Any]
    held_out: Dataset[Any]
    definition: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """The config of a task without hyperparameters."""


class Task(abc.ABC, Generic[ConfigT]):
    """Subclass it; see the module docstring. ``self.config`` is the validated config."""

    Config: ClassVar[type[Any]] = NoConfig
    metrics: ClassVar[tuple[Metric, ...]] = ()
    primary_metric: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line for ``kloop tasks``

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def setup(self) -> None:
        """Per-process state; every process calls it once, before ``datasets``."""

    @abc.abstractmethod
    def datasets(self) -> Datasets:
        """Train and held-out datasets of ``(inputs, target)`` items."""

    @abc.abstractmethod
    def model(self) -> nn.Module:
        """A fresh model (kloop seeds the RNG first), called with the preprocessed inputs as
        positional tensors in the example input's order."""

    @abc.abstractmethod
    def loss(self, outputs: Any, target: Any) -> torch.Tensor:
        """The scalar training loss of a batch: ``outputs`` is what ``model`` returned."""

    @abc.abstractmethod
    def example_input(self) -> Mapping[str, torch.Tensor]:
        """A batch (two rows or more) of raw inputs by name: the served signature."""

    def preprocess(self, train: Dataset[Any]) -> nn.Module | None:
        """A module applied to the raw inputs, exported with the model (fitted on ``train``:
        buffers, not trained). It takes and returns the inputs positionally. None: none."""
        return None

    def serve(self, outputs: Any) -> Mapping[str, torch.Tensor]:
        """The served outputs by name, from the model's outputs. Default: one ``output``."""
        if isinstance(outputs, torch.Tensor):
            return {"output": outputs}
        if isinstance(outputs, Mapping):
            return dict(outputs)
        raise TypeError(f"{type(self).__name__}.serve: the model returns {type(outputs).__name__}; "
                        "override serve() to name its outputs")

    def optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer. Default: Adam at the config's ``lr`` (1e-3 without one)."""
        return torch.optim.Adam(parameters, lr=float(getattr(self.config, "lr", 1e-3)))


# ---- resolving a reference ---------------------------------------------------------------------


def installed() -> dict[str, str]:
    """Registered tasks: short name -> ``module:Class`` (the ``kloop.tasks`` entry points)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def reference(ref: str) -> str:
    """``module:Class`` for ``ref`` (a registered name, or already ``module:Class``)."""
    if ":" in ref:
        return ref
    known = installed()
    if ref not in known:
        raise TaskError(f"task {ref!r}: not a registered task ({', '.join(sorted(known)) or 'none'}) "
                        "and not module:Class")
    return known[ref]


def model_name_for(task: str) -> str:
    """The registry name a task's versions get by default: a registered task's name, or the
    class name of ``module:Class`` in kebab case (``mypkg.task:ChurnModel`` -> churn-model)."""
    name = task.rpartition(":")[2].rpartition(".")[2] if ":" in task else task
    return re.sub(r"[^a-z0-9._-]+", "-", re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()).strip("-._") or "model"


def load_class(ref: str) -> type[Task[Any]]:
    """Import the task class ``ref`` names (a registered name or ``module:Class``)."""
    target = reference(ref)
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise TaskError(f"task {ref!r}: expected module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"task {ref!r}: cannot import {module_name!r}: {e}") from e
    except Exception as e:
        raise TaskError(f"task {ref!r}: importing {module_name!r} failed: "
                        f"{type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise TaskError(f"task {ref!r}: module {module_name!r} has no {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise TaskError(f"task {ref!r}: {target} is not a trainer.task.Task subclass")
    missing = sorted(getattr(obj, "__abstractmethods__", ()))
    if missing:
        raise TaskError(f"task {ref!r}: {obj.__name__} does not implement {', '.join(missing)}")
    return obj


def make_config(task_cls: type[Task[Any]], values: Mapping[str, Any]) -> Any:
    """The task's config dataclass with ``values`` set: unknown fields, and values of the wrong
    type, are refused (an int is accepted for a float field, nothing else is coerced)."""
    cfg_cls = task_cls.Config
    if not dataclasses.is_dataclass(cfg_cls):
        raise TaskError(f"{task_cls.__name__}.Config must be a dataclass, got {cfg_cls!r}")
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TaskError(f"{task_cls.__name__} config has no field {', '.join(unknown)}; "
                        f"fields: {', '.join(fields) or 'none'}")
    defaults = cfg_cls()
    checked: dict[str, Any] = {}
    for name, value in values.items():
        checked[name] = check_value(task_cls.__name__, name, getattr(defaults, name), value)
    try:
        return dataclasses.replace(defaults, **checked)
    except (TypeError, ValueError) as e:  # the config's own __post_init__ checks
        raise TaskError(f"{task_cls.__name__} config: {e}") from e


def check_value(task: str, name: str, default: Any, value: Any) -> Any:
    """``value`` for a config field whose default is ``default``, of the same JSON kind."""
    want = type(default)
    if default is None or isinstance(value, want) and not (isinstance(value, bool) and want is not bool):
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # JSON has one number type: 1 is a fine learning rate
    if want is tuple and isinstance(value, list):
        return tuple(value)  # JSON has no tuples

    raise TaskError(f"{task} config field {name!r}: expected {want.__name__} (like its default "
                    f"{default!r}), got {type(value).__name__} {value!r}")


def parse_set(items: Iterable[str], task_cls: type[Task[Any]]) -> dict[str, Any]:
    """``--set key=value`` pairs as typed config values, by the field's default's type:
    int/float/str parse as such, bool takes true/false, anything else JSON."""
    import json

    defaults = task_cls.Config() if dataclasses.is_dataclass(task_cls.Config) else None
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise TaskError(f"--set {item!r}: expected key=value")
        if defaults is None or not hasattr(defaults, key):
            out[key] = raw  # make_config names the unknown field
            continue
        default = getattr(defaults, key)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                out[key] = raw.lower() == "true"
            elif isinstance(default, int):
                out[key] = int(raw)
            elif isinstance(default, float):
                v = float(raw)
                if not math.isfinite(v):
                    raise ValueError("not a finite number")
                out[key] = v
            elif isinstance(default, str):
                out[key] = raw
            else:
                out[key] = json.loads(raw)
        except ValueError as e:
            raise TaskError(f"--set {key}={raw}: {e}") from None
    return out


def config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return {}
