"""``kloop controller`` (the in-cluster reconciler) and the read side of Rollout CRs
(``kloop get rollouts``, ``kloop describe rollout NAME``), with kubectl's habits:
``--kubeconfig``, ``--context``, ``-n/--namespace``.

``kloop controller`` is what the controller's container runs. SIGTERM (a pod being deleted)
releases the Lease and exits 0, so a successor takes over at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from deploy.cli import common
from deploy.cluster import kube as k
from deploy.cluster.cr_store import ROLLOUT, InvalidSpec, rollout_from_cr

log = logging.getLogger("kloop.controller")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("controller", help="run the in-cluster rollout controller",
                       description="Reconcile kloop Rollout resources with leader election.")
    add_controller_args(p)
    p.set_defaults(func=run_controller)

    p = sub.add_parser("get", help="list kloop resources in the cluster (kubectl get)")
    p.add_argument("resource", choices=("rollouts", "rollout", "klr"))
    common.add_kube_args(p)
    p.set_defaults(func=get)

    p = sub.add_parser("describe", help="show a kloop resource with its history and events")
    p.add_argument("resource", choices=("rollout", "rollouts", "klr"))
    p.add_argument("name")
    common.add_kube_args(p)
    p.set_defaults(func=describe)


def add_controller_args(parser: argparse.ArgumentParser) -> None:
    common.add_kube_args(parser, many_namespaces=True)
    parser.add_argument("--registry", type=Path, required=True,
                        help="the registry directory (the registry PVC's mount): manifests for "
                             "the evaluation gate, the champion alias")
    metrics = parser.add_mutually_exclusive_group()
    metrics.add_argument("--prometheus-url", default=None,
                         help="Prometheus base URL for live analysis through PromQL")
    metrics.add_argument("--metrics", choices=["scrape"], default=None,
                         help="scrape each version's /metrics directly instead of PromQL")
    parser.add_argument("--lease-name", default="kloop-controller",
                        help="coordination.k8s.io Lease that elects the acting replica")
    parser.add_argument("--lease-namespace", default=None,
                        help="namespace of the Lease (default: the controller's own namespace)")
    parser.add_argument("--identity", default=f"{socket.gethostname()}-{os.getpid()}",
                        help="this replica's name in the Lease (default: hostname-pid)")
    parser.add_argument("--lease-duration", type=float, default=15.0,
                        help="seconds a Lease lasts without renewal (default 15, as client-go)")
    parser.add_argument("--renew", type=float, default=5.0,
                        help="seconds between Lease renewals (default 5)")
    parser.add_argument("--renew-deadline", type=float, default=None,
                        help="seconds after its last renewal the leader stops acting (default "
                             "two thirds of --lease-duration, as client-go's 10 of 15): the rest "
                             "of the lease lets a tick in progress finish before a successor")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between resyncs of each active Rollout (default 10)")
    parser.add_argument("--health-port", type=int, default=0,
                        help="serve /healthz and /readyz on this port (0: off)")
    parser.add_argument("--log-level", default="INFO")


def run_controller(args: argparse.Namespace) -> int:
    from deploy.cluster.health import serve_health
    from deploy.cluster.leader import LeaderElector
    from deploy.cluster.reconciler import KServeBackends, Reconciler
    from deploy.controller import RealClock
    from kloop.artifact import Registry

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kube = common.kube(args)
    namespaces = tuple(args.namespaces) or (kube.namespace,)
    clock = RealClock()
    registry = Registry(args.registry)
    elector = LeaderElector(kube, args.lease_name, args.lease_namespace or kube.namespace,
                            args.identity, clock, lease_duration_s=args.lease_duration,
                            renew_s=args.renew, renew_deadline_s=args.renew_deadline,
                            elapsed=time.monotonic)
    backends = KServeBackends(kube, clock, prometheus_url=args.prometheus_url,
                              scrape=args.metrics == "scrape")
    rec = Reconciler(kube, namespaces, registry, backends, clock, elector=elector,
                     interval_s=args.interval)
    stopping = threading.Event()

    def on_term(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if args.health_port:
        serve_health(args.health_port, rec, clock, max(3 * args.interval, 30.0))
    log.info("kloop controller %s: namespaces %s, lease %s", args.identity,
             ",".join(namespaces), args.lease_name)
    try:
        rec.run(stopping.is_set)
    finally:
        elector.release()
    return 0


def get(args: argparse.Namespace) -> int:
    print(format_table(get_rollouts(common.kube(args), args.namespace)))
    return 0


def describe(args: argparse.Namespace) -> int:
    print(describe_rollout(common.kube(args), args.name, args.namespace))
    return 0


# ---- kloop get rollouts / kloop describe rollout -------------------------------------------

COLUMNS = ("NAME", "MODEL", "CANDIDATE", "CHAMPION", "PHASE", "STEP", "WEIGHTS", "AGE")


def get_rollouts(kube: k.Kube, namespace: str | None = None) -> list[tuple[str, ...]]:
    """Rows for ``kloop get rollouts`` (header first), as ``kubectl get klr`` prints them."""
    items = kube.list(ROLLOUT, namespace).get("items", [])
    rows: list[tuple[str, ...]] = [COLUMNS]
    for obj in sorted(items, key=lambda o: o["metadata"].get("creationTimestamp") or ""):
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        weights = status.get("weights") or {}
        steps = (spec.get("policy") or {}).get("steps")
        step = status.get("step")
        rows.append((
            obj["metadata"]["name"], spec.get("model", ""), str(spec.get("candidate", "")),
            str(status.get("champion") or spec.get("champion") or "<none>"),
            status.get("phase", "Pending"),
            "-" if step is None or step < 0 else f"{step + 1}" + (f"/{len(steps)}" if steps else ""),
            ",".join(f"v{v}={w}" for v, w in sorted(weights.items())) or "-",
            _age(obj["metadata"].get("creationTimestamp")),
        ))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def describe_rollout(kube: k.Kube, name: str, namespace: str | None = None) -> str:
    """``kubectl describe``-style text: spec, status, history, Events."""
    obj = kube.get(ROLLOUT, name, namespace)
    obj.setdefault("apiVersion", ROLLOUT.api_version)
    obj.setdefault("kind", ROLLOUT.kind)
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    lines = [f"Name:         {meta['name']}", f"Namespace:    {meta.get('namespace', '')}",
             f"Created:      {meta.get('creationTimestamp', '')}", "Spec:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in spec.items()]
    try:
        r = rollout_from_cr(obj)
        lines += ["Status:", f"  Phase:      {r.phase.value}",
                  f"  Champion:   {r.champion or '<none>'}",
                  f"  Step:       {r.step + 1 if r.step >= 0 else '-'} of {len(r.steps)} "
                  f"({', '.join(map(str, r.steps))} %)",
                  f"  Weights:    {json.dumps(dict(r.weights))}"]
        if r.reason:
            lines.append(f"  Reason:     {r.reason}")
        if r.gate:
            lines.append(f"  Gate:       {r.gate.verdict.value}: {'; '.join(r.gate.reasons)}")
        lines.append("History:")
        for e in r.history:
            when = time.strftime("%H:%M:%S", time.gmtime(e.at))
            count = f" (x{e.count})" if e.count > 1 else ""
            verdict = f" [{e.verdict.value}]" if e.verdict else ""
            lines.append(f"  {when}  {e.kind_name:<12}{verdict} {e.message}{count}")
    except InvalidSpec as e:
        lines += ["Status:", f"  invalid spec: {e}", f"  Phase: {status.get('phase', '')}"]
    lines.append("Events:")
    events = kube.events_for(obj)
    if not events:
        lines.append("  <none>")
    for ev in events:
        lines.append(f"  {ev.get('type', ''):<8}{ev.get('reason', ''):<14}"
                     f"{ev.get('lastTimestamp', '')}  {ev.get('message', '')}")
    return "\n".join(lines)


def _age(ts: str | None) -> str:
    if not ts:
        return "-"
    import datetime as dt

    s = max(0, int(time.time() - dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"
