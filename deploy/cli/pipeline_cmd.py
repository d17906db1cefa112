"""``kloop pipeline run`` (train → evaluate → publish → gate → canary → decide, with a run
record) and ``kloop runs`` (the run history: list, show, compare)."""

from __future__ import annotations

import argparse

from deploy.cli import common, train_cmd


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pipeline",
                       help="train → evaluate → publish → gate → canary → promote/roll back")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    pr = psub.add_parser("run", help="run the pipeline once",
                         description="Run train → evaluate → publish → gate → canary → decide, "
                                     "with a run record (see `kloop runs`).")
    train_cmd.add_spec_args(pr)
    common.add_policy_args(pr)
    pr.add_argument("--interval", type=float, default=1.0, help="seconds between rollout ticks")
    common.add_server_args(pr)
    pr.add_argument("--inject-fault", type=float, metavar="ERROR_RATE",
                    help="fail this fraction of the candidate's requests while canaried "
                         "(chaos test)")
    pr.add_argument("--label", default="", help="a note kept with the run")
    pr.set_defaults(func=run_pipeline)

    p = sub.add_parser("runs", help="pipeline run history: list, show, compare")
    p.add_argument("action", nargs="?", choices=("list", "show", "compare"), default="list")
    p.add_argument("ids", nargs="*", help="run ids (or their unique suffixes) for show/compare")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=runs)


def run_pipeline(args: argparse.Namespace) -> int:
    from deploy.pipeline import report
    from deploy.pipeline.runner import Pipeline
    from kloop.faults import Fault

    h = common.home(args)
    fault = Fault(error_rate=args.inject_fault) if args.inject_fault else None
    pipe = Pipeline(h, server=common.server(args, h), policy=common.policy(args),
                    tick_interval_s=args.interval, log=print)
    run = pipe.run(train_cmd.spec_from_args(args), fault=fault, label=args.label)
    report.print_run(run)
    return 0 if run.status == "succeeded" else 1


def runs(args: argparse.Namespace) -> int:
    from deploy.local.runs import RunStore
    from deploy.pipeline import report

    store = RunStore(common.home(args).db)
    if args.action == "show":
        for rid in args.ids:
            report.print_run(store.get(rid))
    elif args.action == "compare":
        report.print_comparison([store.get(r) for r in args.ids])
    else:
        report.print_runs(store.list(model=args.model, limit=args.limit))
    return 0
