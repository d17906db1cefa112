"""``kloop demo``: the whole loop, locally, on embedded defaults — the project's main job.

Everything runs through the control plane (``kloop up``, a child process): the demo creates
each pipeline run through its HTTP API and follows it there (its log streams here); the control
plane runs the pipeline and ticks the rollouts.

0. start the control plane on the demo's home (its UI and API on a free port, printed);
1. train v1 (DDP, 2 torchrun processes, a short run) → evaluate → publish → champion;
2. serve it over gRPC and HTTP (a real ``kloop serve`` child process) under live traffic from
   the built-in client (``deploy.local.traffic``);
3. train v2 (longer) → gate vs the champion → canary 10 → 50 → 100 % with live analysis → promote;
4. train a bad candidate (the task's config ``shuffle_labels=True``) → the evaluation gate rolls
   it back before any traffic;
5. retrain v2's spec and inject a serving fault into it → the live analysis rolls it back;
6. print a summary (versions, the task's primary metric held-out and live, decisions, requests
   served, errors), stop the traffic, the server and the control plane (SIGTERM), and check
   that no child process is left.

The demo trains the digits task (``trainer.tasks.digits``); the traffic and the summary are the
generic ones, judged by the task's primary metric (here accuracy).

Everything lives in its own state directory (``<KLOOP_HOME>/demo`` unless ``--dir``), which is
wiped at the start of each demo, so the demo never touches a user's registry.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from deploy.control.client import ControlClient
from deploy.control.process import ControlProcess
from deploy.local.home import Home
from deploy.local.runs import Run, RunStore
from deploy.local.server_process import ServerProcess
from deploy.local.traffic import LiveData, TrafficConfig, TrafficGenerator
from deploy.pipeline.report import metric_label, metric_text
from deploy.rollout import AnalysisPolicy, GatePolicy, RolloutPolicy, parse

MARKER = ".kloop-demo"
# Wide enough for the summary table when the output is a file or a CI log (rich assumes 80).
console = Console(width=None if Console().is_terminal else 160)


def _knob(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs; ``kloop demo`` makes a flag of each one with a ``help``."""

    dir: Path  # state directory, wiped first (must be empty or made by an earlier demo)
    rate: float = _knob(150.0, "live requests per second")
    v1_epochs: int = _knob(3, "epochs of the first, weaker version")
    epochs: int = _knob(8, "epochs of the later versions")
    step_seconds: float = _knob(5.0, "minimum seconds per canary step")
    min_requests: int = _knob(100, "candidate requests per canary step before judging")
    fault_rate: float = _knob(0.3, "error rate injected into the faulty candidate")


def _fresh(d: Path) -> None:
    if d.exists() and any(d.iterdir()):
        if not (d / MARKER).exists():
            raise ValueError(f"{d} is not empty and was not made by `kloop demo`; not wiping it")
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).write_text("made by kloop demo; wiped by the next one\n")


def main(args: DemoConfig) -> int:
    from trainer.spec import TrainSpec

    started = time.monotonic()
    root = args.dir.expanduser().resolve()
    _fresh(root)
    home = Home(root)
    policy = RolloutPolicy(
        steps=(10, 50, 100), step_timeout_s=max(120.0, 10 * args.step_seconds), failure_limit=2,
        error_limit=5, retire_after_s=2.0,
        analysis=AnalysisPolicy(
            min_requests=args.min_requests, min_duration_s=args.step_seconds, max_error_rate=0.01,
            max_p99_ratio=2.0, p99_slack_ms=25.0,  # 2 shared cores: noisy p99
        ),
        gate=GatePolicy(tolerance=0.01),
    )
    console.print(Rule("kloop demo: train → publish → serve → canary → promote / roll back"))
    console.print(f"state: {root}   policy: steps {list(policy.steps)}, "
                  f"≥{policy.analysis.min_requests} requests and "
                  f"≥{policy.analysis.min_duration_s:.0f}s per step, "
                  f"failure limit {policy.failure_limit}")
    base = TrainSpec(epochs=args.epochs)
    runs: list[Run] = []

    console.print(Rule("0. the control plane (kloop up): API, web UI, runs, rollouts"))
    control = ControlProcess(root)
    client = control.start()
    console.print(f"control plane pid {control.proc.pid if control.proc else '?'}: UI and API at "
                  f"{client.url} (API /api/v1, gRPC {control.grpc_target}); every run below is "
                  "created and followed through it")
    try:
        rc = _through(args, root, home, client, policy, base, runs, started)
    finally:
        code = control.stop()
    alive = control.proc is not None and control.proc.poll() is None
    console.print(f"control plane stopped with exit code {code} (SIGTERM)"
                  + ("; it is STILL running" if alive else ""))
    return 1 if alive or code != 0 else rc


def _through(args: DemoConfig, root: Path, home: Home, client: ControlClient,
             policy: RolloutPolicy, base: Any, runs: list[Run], started: float) -> int:
    store = RunStore(home.db)

    def run(spec: Any, label: str, fault: float = 0.0) -> Run:
        created = client.create_run(spec.to_dict(), policy=policy.to_dict(), label=label,
                                    inject_fault=fault)
        _log(f"run {created['id']} created through the control plane ({client.url}/runs/"
             f"{created['id']})")
        for kind, data in client.watch_run(created["id"]):
            if kind == "log":
                _log(str(data["line"]))
        return store.get(created["id"])

    console.print(Rule("1. train v1 (2 processes, DDP) → evaluate → publish → champion"))
    runs.append(run(dataclasses.replace(base, epochs=args.v1_epochs), "v1: short run"))
    if runs[-1].status != "succeeded":
        return _fail(runs, "training v1 failed")

    console.print(Rule("2. serve v1 over gRPC + HTTP with live traffic"))
    live_data = LiveData.for_task(base.task, base.config)
    server = ServerProcess(home.registry.root, root)
    handle = server.start()
    console.print(f"server pid {handle.pid}: HTTP {handle.http_url}, gRPC {handle.grpc_target}")
    traffic = TrafficGenerator(
        TrafficConfig(model=base.model_name, http_url=handle.http_url, grpc_target=handle.grpc_target,
                      rate_per_s=args.rate),
        live_data,
    ).start()
    try:
        _wait_for_traffic(traffic, 100)
        console.print(f"live traffic: {args.rate:.0f} req/s of {len(live_data.items)} held-out "
                      f"{base.task} items, half gRPC, half HTTP, judged by live "
                      f"{live_data.metric.name}")
        console.print(Rule("3. train v2 (longer) → gate → canary 10→50→100% → promote"))
        runs.append(run(base, "v2: full run"))
        console.print(Rule("4. a bad candidate (shuffled labels) → the evaluation gate rolls it back"))
        bad = dataclasses.replace(base, config={**base.config, "shuffle_labels": True})
        runs.append(run(bad, "bad: shuffled labels"))
        console.print(Rule(f"5. v2's spec again with a serving fault ({args.fault_rate:.0%} errors) "
                           "→ live analysis rolls it back"))
        runs.append(run(base, "faulty: injected errors", fault=args.fault_rate))
        time.sleep(1.0)  # one more second of traffic on the final champion before the summary
        metrics_text = handle.admin().metrics_text()
    finally:
        traffic.stop()
        code = server.stop()
    leftover = server.proc is not None and server.proc.poll() is None
    console.print(Rule("summary"))
    _summary(home, runs, metrics_text, traffic, base.model_name)
    console.print(f"server stopped with exit code {code} (SIGTERM, graceful); "
                  f"{'a server process is STILL running' if leftover else 'no kloop process left running'}. "
                  f"Total {time.monotonic() - started:.0f}s.")
    console.print(f"explore: kloop --home {root} up (then the UI at http://127.0.0.1:8700) | "
                  f"kloop --home {root} status | kloop --home {root} runs | "
                  f"kloop --home {root} runs compare {runs[1].id} {runs[-1].id}")
    expected = ["champion (first version)", "promoted", "rolled back by the gate",
                "rolled back by live analysis"]
    got = [r.outcome for r in runs]
    if traffic.error is not None:
        console.print(f"[bold red]the traffic generator died:[/] {traffic.error!r}")
    if got != expected or leftover or traffic.error is not None:
        console.print(f"[bold red]the demo did not go as designed:[/] expected {expected}, got {got}")
        return 1
    return 0


def _log(line: str) -> None:
    console.print(line, markup=False, highlight=False)


def _wait_for_traffic(traffic: TrafficGenerator, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(s.requests for s in traffic.by_version().values()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"live traffic did not reach {n} requests in {timeout:.0f}s: "
                               f"{traffic.failures()}")
        time.sleep(0.1)


def _fail(runs: list[Run], why: str) -> int:
    console.print(f"[bold red]{why}[/]: {runs[-1].outcome} (see {runs[-1].run_dir}/pipeline.log)")
    return 1


def _summary(home: Home, runs: list[Run], metrics_text: str, traffic: TrafficGenerator, model: str) -> None:
    served = {v: s for (m, v), s in parse(metrics_text, time.time()).items() if m == model}
    live = traffic.by_version()
    aliases = {v: a for a, v in home.registry.aliases(model).items()}
    primary = runs[-1].primary_metric if runs else traffic.metric.name
    direction = runs[-1].direction(primary) if runs else traffic.metric.direction
    t = Table(title=f"model {model}: versions and decisions")
    for c in ("version", "run", "trained", metric_label(primary, direction, "held-out"), "gate",
              "decision", "requests served", "5xx errors",
              metric_label(traffic.metric.name, traffic.metric.direction, "live"), "now"):
        t.add_column(c, overflow="fold")
    for r in runs:
        v = str(r.version) if r.version is not None else "-"
        spec = r.params["spec"]
        changed = ", ".join(f"{k}={val}" for k, val in (spec.get("config") or {}).items())
        trained = f"{spec['epochs']} ep{f', {changed}' if changed else ''}"
        if r.params.get("fault"):
            trained += f", fault {r.params['fault']['error_rate']:.0%}"
        s = served.get(r.version) if r.version is not None else None
        la = live.get(v)  # the client counts by the answer's model_version (text)
        gate = r.step("gate")
        t.add_row(v, r.id[-6:], trained, metric_text(r.metrics.get(primary)),
                  gate.status, r.outcome, str(int(s.requests)) if s else "0",
                  str(int(s.server_errors)) if s else "0",
                  metric_text(la.value) if la is not None and la.value is not None else "-",
                  aliases.get(r.version or -1, ""))
    console.print(t)
    total = sum(s.requests for s in live.values())
    errors = sum(s.errors for s in live.values())
    console.print(f"client side: {total} requests sent, {errors} errors "
                  f"({', '.join(f'{k} ×{n}' for k, n in traffic.failures().items()) or 'none'})")
