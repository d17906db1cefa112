"""``kloop tasks``: the tasks kloop can train by name (the ``kloop.tasks`` entry points), with
their metrics (the gate's primary one first) and config fields; ``kloop tasks REF`` checks one
task (a name or ``module:Class``) as ``kloop train`` would, and prints its signature."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tasks", help="list the installed tasks, or check one",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("task", nargs="?", help="check this task (a name or module:Class) and print "
                                           "its signature")
    p.add_argument("--code", type=Path, metavar="DIR",
                   help="directory the task's module is in (default: the current directory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from deploy.cli.train_cmd import task_path
    from trainer.task import TaskError, installed, load_class

    if args.task:
        console = Console()
        from trainer.task_check import resolve

        try:
            with task_path(args.code):
                rt, sig = resolve(args.task, {})
        except TaskError as e:
            print(f"kloop tasks: {e}", file=sys.stderr)
            return 2
        t = Table(title=f"{args.task} ({rt.target})")
        for c in ("", "name", "datatype", "shape"):
            t.add_column(c)
        for side, specs in (("input", sig.inputs), ("output", sig.outputs)):
            for s in specs:
                t.add_row(side, s.name, s.datatype, str(list(s.shape)))
        console.print(t)
        console.print(f"metrics: {_metrics(rt.cls)}")
        console.print(f"config: {_config(rt.cls)}")
        return 0
    tasks = installed()
    if not tasks:
        print("no tasks installed (packages declare them as kloop.tasks entry points)")
    for name, target in sorted(tasks.items()):  # one block per task, like `pip show`
        print(f"{name}  ({target})")
        try:
            cls = load_class(name)
        except TaskError as e:
            print(f"  cannot load: {e}\n")
            continue
        if cls.description:
            print(f"  {cls.description}")
        print(f"  metrics: {_metrics(cls)}\n  config:  {_config(cls)}\n")
    print("train one: kloop train --task NAME [--set key=value]; your own: --task module:Class")
    return 0


def _metrics(cls: type) -> str:
    metrics = sorted(cls.metrics, key=lambda m: m.name != cls.primary_metric)  # type: ignore[attr-defined]
    return ", ".join(f"{m.name} ({m.direction} is better{', the gate' * (m.name == cls.primary_metric)})"  # type: ignore[attr-defined]
                     for m in metrics)


def _config(cls: type) -> str:
    cfg = cls.Config  # type: ignore[attr-defined]
    if not (dataclasses.is_dataclass(cfg) and isinstance(cfg, type)):
        return "-"
    d = cfg()
    return ", ".join(f"{f.name}={getattr(d, f.name)!r}" for f in dataclasses.fields(cfg)) or "-"
