"""``kloop status [MODEL]``: models, versions, aliases, what the local server has loaded and
at which weights, and the rollout history."""

from __future__ import annotations

import argparse

from deploy.cli import common


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="models, versions, aliases, weights, rollout history")
    p.add_argument("model", nargs="?")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deploy.local.rollout_store import SQLiteRolloutStore
    from deploy.local.server_process import discover
    from deploy.pipeline import report

    h = common.home(args)
    report.print_status(h.registry, discover(h.root), SQLiteRolloutStore(h.db), args.model)
    return 0
