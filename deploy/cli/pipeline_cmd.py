"""``kloop pipeline run`` (train → evaluate → publish → gate → canary → decide, with a run
record), ``kloop pipeline resume RUN`` (continue an interrupted or failed run) and ``kloop runs``
(the run history: list, show, compare; reading it marks runs whose process died).

``kloop pipeline run`` takes ``kloop train``'s task and spec flags (``--task``, ``--set``,
``--config``, ``--code``, ...) and checks the task in this process before anything starts
(``train_cmd.check_task``): a task that cannot work is refused with one line, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.cli import common, train_cmd

if TYPE_CHECKING:
    from deploy.local.server_process import ServerHandle
    from deploy.local.traffic import TrafficGenerator
    from trainer.spec import TrainSpec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pipeline",
                       help="train → evaluate → publish → gate → canary → promote/roll back")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    pr = psub.add_parser("run", help="run the pipeline once",
                         description="Run train → evaluate → publish → gate → canary → decide "
                                     "for a task (as `kloop train` takes it), with a run record "
                                     "(see `kloop runs`).")
    train_cmd.add_spec_args(pr)
    common.add_policy_args(pr)
    pr.add_argument("--interval", type=float, default=1.0, help="seconds between rollout ticks")
    common.add_server_args(pr)
    pr.add_argument("--inject-fault", type=float, metavar="ERROR_RATE",
                    help="fail this fraction of the candidate's requests while canaried "
                         "(chaos test)")
    pr.add_argument("--label", default="", help="a note kept with the run")
    pr.add_argument("--traffic", type=float, default=0.0, metavar="REQ_PER_S",
                    help="while the run lasts, send the server live traffic from the task's "
                         "held-out inputs (half gRPC, half HTTP), judged by its metric: for a "
                         "canary where no clients call the model yet (default: none)")
    pr.set_defaults(func=run_pipeline)
    rs = psub.add_parser("resume", help="continue an interrupted or failed run",
                         description="Continue RUN from its last finished step, under the same "
                                     "id: train resumes from its last checkpoint, evaluate "
                                     "reruns, a published version is kept, the run's rollout is "
                                     "ticked on (or its outcome recorded, if it ended). The "
                                     "spec and policy are the run's own.")
    rs.add_argument("run_id", metavar="RUN", help="run id (or its unique suffix)")
    rs.add_argument("--interval", type=float, default=1.0, help="seconds between rollout ticks")
    common.add_server_args(rs)
    rs.set_defaults(func=resume_pipeline)

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
    from trainer.task import TaskError

    h = common.home(args)
    fault = Fault(error_rate=args.inject_fault) if args.inject_fault else None
    try:
        spec = train_cmd.spec_from_args(args)
        code = Path(spec.code.path) if spec.code is not None else args.code
        train_cmd.check_task(spec, code)
    except TaskError as e:
        print(f"kloop pipeline run: {e}", file=sys.stderr)
        return 2
    if not (args.traffic >= 0 and math.isfinite(args.traffic)):
        raise ValueError(f"--traffic {args.traffic}: a rate in requests per second, >= 0")
    server = common.server(args, h)
    if args.traffic and server is None:
        raise ValueError("--traffic needs a running server (`kloop serve`, or --server)")
    pipe = Pipeline(h, server=server, policy=common.policy(args),
                    tick_interval_s=args.interval, log=print,
                    pythonpath=[str((code or Path.cwd()).expanduser().resolve())])
    with contextlib.ExitStack() as stack:
        traffic = None
        if args.traffic and server is not None:
            traffic = stack.enter_context(_traffic(spec, code, server, args.traffic))
        run = pipe.run(spec, fault=fault, label=args.label)
    report.print_run(run)
    if traffic is not None:
        print(f"live traffic: {_live(traffic) or 'none answered'}")
    return 0 if run.status == "succeeded" else 1


def _live(traffic: TrafficGenerator) -> str:
    parts = []
    for v, st in sorted(traffic.by_version().items()):
        if v == "?":  # answered by no version: sent before the model was served
            parts.append(f"{st.requests} before the model was served (refused)")
        else:
            live = f", live {st.value:.4g}" if st.value is not None else ""
            parts.append(f"v{v}: {st.requests} requests, {st.errors} errors{live}")
    return "; ".join(parts)


def _traffic(spec: TrainSpec, code: Path | None, server: ServerHandle,
             rate: float) -> TrafficGenerator:
    from deploy.local.traffic import LiveData, TrafficConfig, TrafficGenerator

    with train_cmd.task_path(code):
        data = LiveData.for_task(spec.task, spec.config)
    return TrafficGenerator(TrafficConfig(model=spec.model_name, http_url=server.http_url,
                                          grpc_target=server.grpc_target, rate_per_s=rate), data)


def resume_pipeline(args: argparse.Namespace) -> int:
    from deploy.local.runs import RunNotResumable, RunStore
    from deploy.pipeline import report
    from deploy.pipeline.runner import Pipeline
    from deploy.rollout import RolloutPolicy

    h = common.home(args)
    try:
        saved = RunStore(h.db).get(args.run_id)
    except KeyError as e:
        print(f"kloop pipeline resume: {e.args[0]}", file=sys.stderr)
        return 2
    pipe = Pipeline(h, server=common.server(args, h),
                    policy=RolloutPolicy.from_dict(saved.params["policy"]),
                    tick_interval_s=args.interval, log=print)
    try:
        run = pipe.resume(saved.id)
    except RunNotResumable as e:
        print(f"kloop pipeline resume: {e}", file=sys.stderr)
        return 2
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
