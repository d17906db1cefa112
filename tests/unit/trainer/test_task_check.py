"""A task that cannot work is refused before any process starts, with one message naming the
problem; a task that can work resolves to its signature. Tasks are defined here, as a user
would write them, and referenced by ``module:Class`` (this module's path)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deploy.cli import main as kloop
from trainer.task import Datasets, Metric, Task, TaskError, installed, make_config, parse_set
from trainer.task_check import resolve

HERE = __name__


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 0.01
    hidden: int = 4
    name: str = "x"
    flag: bool = False
    sizes: tuple[int, ...] = (8, 4)


def _sq(served: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return (served["y"] - y) ** 2


class Good(Task[Config]):
    """Two named inputs, a regression: the shape of a real task, tiny."""

    Config = Config
    metrics = (Metric("rmse", "lower", _sq, finalize=math.sqrt),)
    primary_metric = "rmse"

    def datasets(self) -> Datasets:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(40, 3, generator=g), torch.randint(0, 5, (40, 2), generator=g)
        y = a.sum(1) + b.float().sum(1)
        ds = _Pairs(a, b, y)
        return Datasets(train=ds, held_out=ds, definition={"source": "generated", "seed": 0})

    def model(self) -> nn.Module:
        return _Model()

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((outputs - target) ** 2).mean()

    def serve(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": outputs}

    def example_input(self) -> dict[str, torch.Tensor]:
        return {"a": torch.zeros(2, 3), "b": torch.zeros(2, 2, dtype=torch.int64)}


class _Pairs(torch.utils.data.Dataset[Any]):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> None:
        self.a, self.b, self.y = a, b, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"a": self.a[i], "b": self.b[i]}, self.y[i]


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(torch.cat([a, b.float()], 1)).squeeze(1)
        return out


class NoLoss(Task[Config]):  # type: ignore[misc]  # abstract on purpose: what the check refuses
    Config = Config
    metrics = Good.metrics
    primary_metric = "rmse"
    datasets = Good.datasets
    model = Good.model
    example_input = Good.example_input


class Complex(Good):
    def example_input(self) -> dict[str, torch.Tensor]:
        return {"a": torch.zeros(2, 3, dtype=torch.complex64), "b": torch.zeros(2, 2, dtype=torch.int64)}


class _DataDependent(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.sum() > 0:  # control flow on a value: torch.export cannot trace it
            return a.sum(1)
        return b.float().sum(1)


class DoesNotExport(Good):
    def model(self) -> nn.Module:
        return _DataDependent()

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((outputs - target) ** 2).mean() + 0 * sum(p.sum() for p in [torch.zeros(1, requires_grad=True)])


class NoDirection(Good):
    metrics = (Metric("rmse", "smaller", _sq),)  # type: ignore[arg-type]  # what a typo looks like


class PrimaryMissing(Good):
    primary_metric = "accuracy"


class WrongShapes(Good):
    def example_input(self) -> dict[str, torch.Tensor]:
        return {"a": torch.zeros(2, 4), "b": torch.zeros(2, 2, dtype=torch.int64)}


class NotATask:
    pass


class _Named(torch.utils.data.Dataset[Any]):
    """Held-out items that carry a name: a str the fingerprint cannot hash."""

    def __init__(self, inner: _Pairs) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], torch.Tensor]:
        x, y = self.inner[i]
        return {**x, "id": f"row-{i}"}, y


class HeldOutWithStrings(Good):
    def datasets(self) -> Datasets:
        d = Good.datasets(self)
        assert isinstance(d.train, _Pairs)
        return Datasets(train=d.train, held_out=_Named(d.train), definition=d.definition)


class PathInDefinition(Good):
    def datasets(self) -> Datasets:
        d = Good.datasets(self)
        return Datasets(train=d.train, held_out=d.held_out, definition={"source": Path("/data")})


class HeldOutOtherWidth(Good):
    """Trains on 3 features of a, is held out on 4: only the held-out items show it."""

    def datasets(self) -> Datasets:
        d = Good.datasets(self)
        assert isinstance(d.train, _Pairs)
        wide = _Pairs(torch.zeros(40, 4), d.train.b, d.train.y)
        return Datasets(train=d.train, held_out=wide, definition=d.definition)


def test_a_good_task_resolves_to_its_signature() -> None:
    rt, sig = resolve(f"{HERE}:Good", {"lr": 1})  # an int is a fine float
    assert rt.config == Config(lr=1.0)
    assert [(t.name, t.datatype, t.shape) for t in sig.inputs] == [("a", "FP32", (-1, 3)), ("b", "INT64", (-1, 2))]
    assert [(t.name, t.datatype, t.shape) for t in sig.outputs] == [("y", "FP32", (-1,))]
    assert rt.evaluation() == {"primary": "rmse", "metrics": {"rmse": {"direction": "lower", "threshold": None}}}


@pytest.mark.parametrize(("ref", "config", "message"), [
    (f"{HERE}:NoLoss", {}, "NoLoss does not implement loss"),
    (f"{HERE}:Complex", {}, "input 'a' has dtype torch.complex64, which has no OIP v2 datatype"),
    (f"{HERE}:DoesNotExport", {}, "DoesNotExport: the model does not export with torch.export"),
    (f"{HERE}:NoDirection", {}, "metric 'rmse' has no direction: say whether higher or lower is better"),
    (f"{HERE}:PrimaryMissing", {}, "primary_metric 'accuracy' is not among its metrics (rmse)"),
    (f"{HERE}:WrongShapes", {}, "the model does not run on the example input"),
    (f"{HERE}:NotATask", {}, "is not a trainer.task.Task subclass"),
    (f"{HERE}:HeldOutWithStrings", {}, "held-out split: a dataset item holds a str"),
    (f"{HERE}:PathInDefinition", {}, "held-out split: the held-out split's definition must be plain JSON data"),
    (f"{HERE}:HeldOutOtherWidth", {}, "two held-out items do not run through the model and its metrics"),
    (f"{HERE}:Missing", {}, "has no 'Missing'"),
    ("no_such_module_xyz:Task", {}, "cannot import 'no_such_module_xyz'"),
    ("nonsense", {}, "not a registered task"),
    (f"{HERE}:Good", {"layers": 3}, "Good config has no field layers; fields: lr, hidden, name, flag, sizes"),
    (f"{HERE}:Good", {"hidden": "4"}, "config field 'hidden': expected int (like its default 4), got str '4'"),
    (f"{HERE}:Good", {"flag": 1}, "config field 'flag': expected bool"),
    (f"{HERE}:Good", {"hidden": True}, "config field 'hidden': expected int"),
    (f"{HERE}:Good", {"sizes": "8,4"}, "config field 'sizes': expected tuple"),
])
def test_a_task_that_cannot_work_is_refused_with_one_message(ref: str, config: dict[str, Any], message: str) -> None:
    with pytest.raises(TaskError) as e:
        resolve(ref, config)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_set_values_are_typed_by_the_fields_default() -> None:
    assert parse_set(["lr=0.5", "hidden=8", "name=y", "flag=true"], Good) == {
        "lr": 0.5, "hidden": 8, "name": "y", "flag": True}
    for bad, message in (("lr=inf", "not a finite number"), ("hidden=2.5", "invalid literal"),
                         ("flag=yes", "expected true or false"), ("lr", "expected key=value")):
        with pytest.raises(TaskError, match=message):
            parse_set([bad], Good)
    assert make_config(Good, parse_set(["hidden=8"], Good)) == Config(hidden=8)
    assert make_config(Good, parse_set(["sizes=[16, 8, 4]"], Good)) == Config(sizes=(16, 8, 4))


def test_the_built_in_tasks_are_registered_and_resolve() -> None:
    assert {"digits", "breast-cancer", "diabetes"} <= set(installed())
    _, sig = resolve("diabetes", {})
    assert sig.input_names == ("demographics", "serum") and sig.output_names == ("progression",)
    _, sig = resolve("breast-cancer", {})
    assert [(t.name, t.shape) for t in sig.inputs] == [("features", (-1, 30))]


def test_kloop_train_refuses_a_bad_task_before_any_process_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "user_task.py").write_text(
        "from tests.unit.trainer.test_task_check import NoDirection\n")
    home = tmp_path / "home"
    rc = kloop(["--home", str(home), "train", "--task", "user_task:NoDirection", "--code", str(code)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "kloop train: NoDirection: metric 'rmse' has no direction" in err
    assert not (home / "runs").exists()  # nothing was started, not even a run directory
    rc = kloop(["--home", str(home), "train", "--task", "digits", "--set", "lr=fast"])
    assert rc == 2 and "--set lr=fast: could not convert" in capsys.readouterr().err


def test_a_users_package_registers_its_task_by_entry_point(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """What ``pip install`` of a package declaring ``[project.entry-points."kloop.tasks"]``
    leaves on the path: a dist-info with entry_points.txt. ``kloop tasks`` lists the task and
    ``--task NAME`` resolves it."""
    pkg = tmp_path / "churnpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text("from tests.unit.trainer.test_task_check import Good as Churn\n")
    info = tmp_path / "churnpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: churnpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kloop.tasks]\nchurn = churnpkg.task:Churn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed()["churn"] == "churnpkg.task:Churn"
    rt, sig = resolve("churn", {})
    assert rt.target == "churnpkg.task:Churn" and sig.input_names == ("a", "b")
    assert kloop(["tasks"]) == 0
    assert "churn  (churnpkg.task:Churn)" in capsys.readouterr().out
