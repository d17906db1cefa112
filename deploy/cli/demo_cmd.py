"""``kloop demo``: the whole loop, locally, on embedded defaults (``deploy.control.demo``)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from deploy.cli import common
from deploy.control.demo import DemoConfig

_FLAGS = [f for f in dataclasses.fields(DemoConfig) if "help" in f.metadata]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="the whole loop, locally, on embedded defaults (the main job)",
                       description="Train v1 → serve it under live traffic → canary a better v2 "
                                   "and promote it → reject a bad candidate at the gate → roll "
                                   "back a faulty one by live analysis → summary. Leaves no "
                                   "process running.")
    p.add_argument("--dir", type=Path, help="demo state directory, wiped first "
                   "(default: $KLOOP_HOME/demo, i.e. ~/.kloop/demo)")
    for f in _FLAGS:
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deploy.control import demo

    directory = args.dir if args.dir is not None else common.home(args).root / "demo"
    return demo.main(DemoConfig(dir=directory, **{f.name: getattr(args, f.name) for f in _FLAGS}))
