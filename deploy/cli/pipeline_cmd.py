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
    from deploy.control.client import ControlClient
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
    pr.add_argument("--follow", action="store_true",
                    help="with a control plane running (`kloop up`): stream the run's log and "
                         "progress until it ends (without: print its id and return at once)")
    pr.add_argument("--standalone", action="store_true",
                    help="run the pipeline in this process even when a control plane runs")
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

    p = sub.add_parser("runs", help="pipeline runs: list, show, compare, cancel, retry")
    p.add_argument("action", nargs="?", choices=("list", "show", "compare", "cancel", "retry"),
                   default="list")
    p.add_argument("ids", nargs="*", help="run ids (or their unique suffixes) for show/compare/"
                                          "cancel/retry")
    p.add_argument("--model")
    p.add_argument("--status", help="only runs with this status (running, succeeded, failed, "
                                    "interrupted, cancelled)")
    p.add_argument("--limit", type=int, default=20, help="runs per page (default: %(default)s)")
    p.add_argument("--page-token", default="", help="the next page (as the previous one printed)")
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
    if not args.standalone:
        from deploy.control.client import discover

        control = discover(h.root)
        if control is not None:
            return _through_control(args, control, spec, code)
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


def _through_control(args: argparse.Namespace, control: ControlClient, spec: TrainSpec,
                     code: Path | None) -> int:
    """Create the run in the control plane; follow it when asked (or while sending traffic)."""
    from deploy.control.client import ControlError
    from deploy.local.runs import RunStore
    from deploy.pipeline import report

    h = common.home(args)
    try:
        run = control.create_run(spec.to_dict(), policy=common.policy(args).to_dict(),
                                 label=args.label, inject_fault=args.inject_fault or 0.0,
                                 pythonpath=[str((code or Path.cwd()).expanduser().resolve())])
    except ControlError as e:
        print(f"kloop pipeline run: {e.message}", file=sys.stderr)
        return 2
    print(f"run {run['id']} created in the control plane ({control.url}); "
          f"`kloop runs show {run['id']}`, or its page {control.url}/runs/{run['id']}")
    if not (args.follow or args.traffic):
        return 0
    with contextlib.ExitStack() as stack:
        server = common.server(args, h)
        if args.traffic and server is not None:
            stack.enter_context(_traffic(spec, code, server, args.traffic))
        try:
            for kind, data in control.watch_run(run["id"]):
                if kind == "log":
                    print(data["line"], flush=True)
        except KeyboardInterrupt:
            print(f"\nstopped following; run {run['id']} goes on in the control plane",
                  file=sys.stderr)
            return 130
    final = RunStore(h.db).get(run["id"])
    report.print_run(final)
    return 0 if final.status == "succeeded" else 1


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
    from deploy.control.client import discover
    from deploy.local.runs import RunStore
    from deploy.pipeline import report

    h = common.home(args)
    store = RunStore(h.db)
    control = discover(h.root)
    if args.action in ("cancel", "retry"):
        if len(args.ids) != 1:
            raise ValueError(f"`kloop runs {args.action} RUN`: one run id")
        if control is None:
            if args.action == "retry":
                raise ValueError("no control plane runs on this home (`kloop up`); continue the "
                                 f"run here with `kloop pipeline resume {args.ids[0]}`")
            raise ValueError("no control plane runs on this home: a run started with `kloop "
                             "pipeline run --standalone` stops with Ctrl-C in its terminal")
        rid = store.get(args.ids[0]).id
        done = control.cancel_run(rid) if args.action == "cancel" else control.retry_run(rid)
        print(f"run {done['id']}: {args.action} requested (status {done['status']})")
        return 0
    if args.action == "show":
        for rid in args.ids:
            report.print_run(store.get(rid))
    elif args.action == "compare":
        report.print_comparison([store.get(r) for r in args.ids])
    else:
        from deploy.control.views import page_token, parse_page_token

        if control is not None:  # the service's paging; the records themselves are the home's
            page = control.list_runs(model=args.model, status=args.status, page_size=args.limit,
                                     page_token=args.page_token or None)
            listed = [store.get(r["id"]) for r in page["runs"]]
            token = page["next_page_token"]
        else:
            local = store.page(model=args.model, status=args.status, limit=args.limit,
                               after=parse_page_token(args.page_token))
            listed, token = local.runs, page_token(local.next)
        report.print_runs(listed)
        if token:
            print(f"more: kloop runs --page-token {token}"
                  + (f" --limit {args.limit}" if args.limit != 20 else ""))
    return 0
