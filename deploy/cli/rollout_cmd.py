"""``kloop rollout MODEL --candidate V``: canary a published version against the champion on
the local server (ticking the controller in this process until the rollout ends), or as a
Rollout resource that the in-cluster controller runs (``--target kserve``; ``--dry-run``
prints the KServe objects instead).

``kloop rollout abort MODEL`` ends the model's active local rollout: the champion's weights
restored, the candidate unloaded, the phase Aborted (from another terminal, while ``kloop
rollout`` runs: that one sees the abort at its next tick and exits). ``kloop rollout status
[MODEL]`` shows the active (or latest) rollouts. Running the same ``kloop rollout MODEL
--candidate V`` again resumes an active rollout where it was; policy flags that differ from the
stored policy are refused, never silently ignored.

The champion is the registry's ``champion`` alias; without one, the version the server serves
today (``deploy.rollout.champion_for``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from deploy.cli import common
from deploy.local.home import Home
from deploy.local.server_backend import LocalBackend
from deploy.local.server_process import SERVER_FILE, ServerHandle
from deploy.ports import Clock, RolloutStore
from deploy.rollout import KNOBS, Event, MetricThreshold, Phase, Rollout, RolloutPolicy
from kloop.model_version import Version

if TYPE_CHECKING:
    from deploy.control.client import ControlClient

KNOB_FLAGS = {k.name: k.flag for k in KNOBS}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rollout",
                       help="canary a version against the champion, then promote or roll back",
                       description="Roll MODEL's candidate out step by step with live analysis "
                                   "(local server), or print the KServe objects (--target "
                                   "kserve).")
    p.add_argument("model", metavar="MODEL | ACTION MODEL | status [MODEL]",
                   help="the model to roll out; or an action on its active rollout: `promote "
                        "MODEL` (skip the remaining steps), `abort MODEL` (the champion "
                        "restored), `pause MODEL`, `resume MODEL`; `undo MODEL --to-revision N` "
                        "(back to version N in one call); or `status [MODEL]`")
    p.add_argument("target_model", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--candidate", help="version number, 'latest' or an alias (required to start "
                                       "or resume a rollout)")
    common.add_policy_args(p)
    p.add_argument("--to-revision", type=int, metavar="N",
                   help="with `undo`: the version to go back to (default: the champion before "
                        "the current one)")
    p.add_argument("--reason", default="", help="with an action: why (kept in the history)")
    p.add_argument("--interval", type=_positive, default=2.0,
                   help="seconds between ticks (default: %(default)s)")
    common.add_server_args(p)
    p.add_argument("--target", choices=("local", "kserve"), default="local")
    p.add_argument("--dry-run", action="store_true", help="with --target kserve: print the objects")
    p.add_argument("--mode", choices=("Standard", "Serverless"), default="Standard",
                   help="KServe deployment mode (default: %(default)s)")
    p.add_argument("--weight", type=_percent, default=10, metavar="0..100",
                   help="candidate percent to render (default: %(default)s)")
    common.add_kube_args(p)
    p.add_argument("--storage-uri-prefix", default="pvc://kloop-registry",
                   help="where the cluster reads the registry (s3://, gs://, pvc://; default: "
                        "%(default)s)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--autoscaler", choices=("hpa", "external"), default="hpa")
    p.set_defaults(func=run)


def _positive(text: str) -> float:
    value = common.finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def _percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole percent") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percent in 0..100, got {value}")
    return value


_ACTIONS = ("abort", "status", "promote", "pause", "resume", "undo")


def run(args: argparse.Namespace) -> int:
    if args.model in _ACTIONS and args.candidate is None:
        if args.model == "status":
            return status(args)
        if args.target_model is None:
            raise ValueError(f"which model? `kloop rollout {args.model} MODEL`")
        control = _control(args)
        if control is not None:
            return _through_control(args, control)
        if args.model == "abort":
            return abort(args)
        if args.model == "undo":
            return _undo_here(args)
        return _user_op_here(args)
    if args.target_model is not None:
        raise ValueError(f"unexpected argument {args.target_model!r}: `kloop rollout MODEL "
                         "--candidate V`, `kloop rollout abort MODEL` or `kloop rollout status "
                         "[MODEL]`")
    if args.candidate is None:
        raise ValueError("--candidate is required to start or resume a rollout")
    policy = common.policy(args)  # validated before anything is created or resumed
    h = common.home(args)
    reg = h.registry
    if (args.target == "kserve" and not args.dry_run and args.candidate.isdecimal()
            and not reg.versions(args.model)):
        # The cluster's registry is on its PVC, not here: the controller resolves the champion.
        return _in_cluster(args, int(args.candidate), None, policy)
    candidate = reg.resolve(args.model, args.candidate)
    champion = reg.alias(args.model, "champion")
    if args.target == "kserve":
        if not args.dry_run:
            return _in_cluster(args, candidate, champion, policy)
        return _print_kserve(args, candidate, champion)
    control = _control(args)
    if control is not None:
        return _start_through_control(args, control, candidate)
    return _local(args, candidate, policy)


def _start_through_control(args: argparse.Namespace, control: ControlClient,
                           candidate: Version) -> int:
    """The control plane ticks it; this process follows it (Ctrl-C stops following only)."""
    from deploy.control.client import ControlError

    active = control.active_rollout(args.model)
    if active is not None and active["candidate"] == candidate:
        print(f"following rollout {active['id']} (phase {active['phase']}), ticked by the "
              "control plane")
        r = active
    else:
        try:
            r = control.create_rollout(args.model, str(candidate), common.given_policy(args))
        except ControlError as e:
            print(f"kloop rollout: {e.message}", file=sys.stderr)
            return 2
        print(f"rollout {r['id']}: {args.model} v{candidate} vs champion "
              f"{'v' + str(r['champion']) if r['champion'] else '(none: first version)'}, "
              f"steps {r['steps']}; ticked by the control plane")
    seen = len(r.get("history", ()))
    try:
        for kind, data in control.watch_rollout(r["id"]):
            if kind == "rollout":
                for ev in data["history"][seen:]:
                    print(f"{time.strftime('%H:%M:%S', time.localtime(ev['at']))} "
                          f"{ev['kind']}: {ev['message']}", flush=True)
                seen = len(data["history"])
                r = data
    except KeyboardInterrupt:
        print(f"\nstopped following; the control plane keeps ticking rollout {r['id']}",
              file=sys.stderr)
        return 130
    final = control.get_rollout(r["id"])
    print(f"rollout {final['id']}: {final['phase']} {final['reason']}")
    return 0 if final["phase"] == Phase.SUCCEEDED.value else 1


def _local(args: argparse.Namespace, candidate: Version, policy: RolloutPolicy) -> int:
    from deploy.controller import RealClock
    from deploy.local.rollout_store import SQLiteRolloutStore
    from deploy.local.server_backend import LocalBackend
    from deploy.rollout import champion_for, new_rollout

    h = common.home(args)
    server = _server(args, h)
    if server is None:
        return 2
    store = SQLiteRolloutStore(h.db)
    clock = RealClock()
    r = store.active(args.model)
    if r is not None and r.candidate == candidate:
        changed = _changed_policy(args, r.policy)
        if changed:
            raise ValueError(
                f"rollout {r.id} is active with another policy ({'; '.join(changed)}): resume "
                f"it without those flags, or end it with `kloop rollout abort {args.model}` "
                "and start again")
        print(f"resuming rollout {r.id} (phase {r.phase.value}, step {r.step})")
    elif r is not None:
        print(f"kloop rollout: {args.model} already has active rollout {r.id} of v{r.candidate}; "
              f"follow it with `kloop rollout status {args.model}` or end it with `kloop rollout "
              f"abort {args.model}`", file=sys.stderr)
        return 2
    else:
        alias = h.registry.alias(args.model, "champion")
        served = LocalBackend(server.admin()).read(args.model)
        if served.error is not None and alias is None:
            raise ValueError(f"{args.model} has no champion alias and the server could not tell "
                             f"what it serves ({served.error})")
        champion = champion_for(args.model, candidate, alias, served.weights)
        if alias is None and champion is not None:
            # Adopted: recorded as the alias, so a server that restarts serves it again (not
            # the newest version, which may be this very candidate).
            h.registry.set_alias(args.model, "champion", champion)
        rid = time.strftime(f"{args.model}-v{candidate}-%Y%m%d-%H%M%S")
        r = store.create(new_rollout(rid, args.model, candidate, champion, policy, clock.now()))
        adopted = (" (no alias: the version serving now, now the champion alias)"
                   if champion is not None and alias is None else "")
        print(f"rollout {r.id}: {args.model} v{candidate} vs champion "
              f"{'v' + str(champion) if champion else '(none: first version)'}{adopted}, "
              f"steps {list(r.steps)}")
    return _follow(args, store, LocalBackend(server.admin()), r.id, clock)


def _follow(args: argparse.Namespace, store: RolloutStore, backend: LocalBackend,
            rollout_id: str, clock: Clock) -> int:
    """Tick until the rollout ends; Ctrl-C leaves it as it is and says how to go on."""
    from deploy.controller import run_until_done

    h = common.home(args)

    def show(_: Rollout, ev: Event) -> None:
        print(f"{time.strftime('%H:%M:%S')} {ev.kind_name}: {ev.message}", flush=True)

    try:
        final = run_until_done(store, backend, h.registry, rollout_id, clock, args.interval, show)
    except KeyboardInterrupt:
        r = store.get(rollout_id)
        split = ", ".join(f"v{v} {w}%" for v, w in sorted(r.weights.items())) or "-"
        print(f"\ninterrupted: rollout {r.id} stays {r.phase.value} at {split}. Resume it with "
              f"`kloop rollout {r.model} --candidate {r.candidate}`, or end it (the champion's "
              f"weights restored) with `kloop rollout abort {r.model}`", file=sys.stderr)
        return 130
    print(f"rollout {final.id}: {final.phase.value} {final.reason}")
    return 0 if final.phase is Phase.SUCCEEDED else 1


def _server(args: argparse.Namespace, h: Home) -> ServerHandle | None:
    server = common.server(args, h)
    if server is None:
        print(f"kloop rollout: no running server found ({h.root / SERVER_FILE}); start one with "
              "`kloop serve` or pass --server HOST:PORT", file=sys.stderr)
    return server


def _changed_policy(args: argparse.Namespace, stored: RolloutPolicy) -> list[str]:
    """The policy flags given on this command line whose value differs from the stored one."""
    given = common.given_policy(args)
    have = stored.to_dict()
    return [f"{KNOB_FLAGS[k]} {_show(v)} (stored: {_show(have[k])})"
            for k, v in given.items() if _show(v) != _show(have[k])]


def _show(v: object) -> str:
    """A persisted setting as its flag spells it (a gate condition as METRIC:key=value)."""
    if isinstance(v, list | tuple):
        sep = " " if any(isinstance(x, dict) for x in v) else ","
        return sep.join(str(MetricThreshold.from_dict(x)) if isinstance(x, dict) else str(x)
                        for x in v)
    return str(v)


def abort(args: argparse.Namespace) -> int:
    """``kloop rollout abort MODEL``: record the abort, then restore the champion."""
    from deploy.controller import RealClock
    from deploy.local.rollout_store import SQLiteRolloutStore
    from deploy.local.server_backend import LocalBackend
    from deploy.ports import Conflict
    from deploy.rollout import request_abort

    model = args.target_model
    if model is None:
        raise ValueError("which model? `kloop rollout abort MODEL`")
    h = common.home(args)
    store = SQLiteRolloutStore(h.db)
    clock = RealClock()
    for _ in range(10):  # a controller ticking the same rollout may save in between
        r = store.active(model)
        if r is None:
            raise LookupError(f"{model} has no active rollout (see `kloop rollout status "
                              f"{model}`)")
        try:
            r = store.save(request_abort(r, "aborted by the user (kloop rollout abort)",
                                         clock.now()), expected_generation=r.generation)
            break
        except Conflict:
            continue
    else:
        raise RuntimeError(f"could not record the abort of {model}'s rollout: it kept changing")
    print(f"rollout {r.id}: abort recorded; restoring the champion")
    server = _server(args, h)
    if server is None:
        return 2
    return _follow(args, store, LocalBackend(server.admin()), r.id, clock)


def _control(args: argparse.Namespace) -> ControlClient | None:
    from deploy.control.client import discover

    return discover(common.home(args).root)


def _through_control(args: argparse.Namespace, control: ControlClient) -> int:
    """The action through the running control plane (it ticks the rollout)."""
    model, op = args.target_model, args.model
    if op == "undo":
        to = args.to_revision or _previous_champion(args, model)
        r = control.undo(model, to, common.given_policy(args))
        how = ("a former champion: no gate, no steps" if r["undo"] else
               "never champion before: gate and steps as a candidate")
        print(f"rollout {r['id']}: {model} back to v{to} ({how}); follow it in the UI or with "
              f"`kloop rollout status {model}`")
        return 0
    active = control.active_rollout(model)
    if active is None:
        raise LookupError(f"{model} has no active rollout (see `kloop rollout status {model}`)")
    r = control.rollout_op(active["id"], op, reason=args.reason or
                           f"{op} requested with kloop rollout {op}")
    print(f"rollout {r['id']}: {op} recorded (phase {r['phase']}"
          f"{', paused' if r['paused'] else ''}); the control plane applies it at its next tick")
    return 0


def _previous_champion(args: argparse.Namespace, model: str) -> int:
    """The version that was champion before the current one: the champion the last
    succeeded rollout replaced."""
    from deploy.local.rollout_store import SQLiteRolloutStore

    h = common.home(args)
    current = h.registry.alias(model, "champion")
    for r in reversed(SQLiteRolloutStore(h.db).list(model=model)):
        if r.phase is Phase.SUCCEEDED and r.candidate == current and r.champion is not None:
            return int(r.champion)
    raise LookupError(f"no earlier champion of {model} is recorded; name the version with "
                      "--to-revision N")


def _user_op_here(args: argparse.Namespace) -> int:
    """promote | pause | resume without a control plane: recorded in the store, where the
    process ticking the rollout (`kloop rollout MODEL --candidate V`) finds it at its next tick."""
    from deploy.controller import RealClock, user_request
    from deploy.local.rollout_store import SQLiteRolloutStore
    from deploy.rollout import request_pause, request_promote, request_resume

    ops = {"promote": request_promote, "pause": request_pause, "resume": request_resume}
    op = ops[args.model]
    model = args.target_model
    store = SQLiteRolloutStore(common.home(args).db)
    clock = RealClock()
    r = store.active(model)
    if r is None:
        raise LookupError(f"{model} has no active rollout (see `kloop rollout status {model}`)")
    why = args.reason or f"{args.model} requested with kloop rollout {args.model}"
    r = user_request(store, r.id, lambda ro: op(ro, why, clock.now()), clock)
    print(f"rollout {r.id}: {args.model} recorded (phase {r.phase.value}"
          f"{', paused' if r.paused else ''}); the process ticking it applies it at its next "
          f"tick (resume it with `kloop rollout {model} --candidate {r.candidate}` if none does)")
    return 0


def _undo_here(args: argparse.Namespace) -> int:
    """``undo`` without a control plane: create the rollout and tick it here."""
    from deploy.controller import RealClock, former_champions
    from deploy.local.rollout_store import SQLiteRolloutStore
    from deploy.rollout import new_rollout, new_undo_rollout

    model = args.target_model
    h = common.home(args)
    server = _server(args, h)
    if server is None:
        return 2
    to = args.to_revision or _previous_champion(args, model)
    if to not in h.registry.versions(model):
        raise LookupError(f"{model} has no version {to}")
    store = SQLiteRolloutStore(h.db)
    clock = RealClock()
    champion = h.registry.alias(model, "champion")
    rid = time.strftime(f"{model}-undo-v{to}-%Y%m%d-%H%M%S")
    if to in former_champions(store, model):
        r = store.create(new_undo_rollout(rid, model, to, champion, common.policy(args), clock.now()))
        print(f"rollout {r.id}: {model} back to v{to}, a former champion: no gate, no steps")
    else:
        r = store.create(new_rollout(rid, model, to, champion, common.policy(args), clock.now()))
        print(f"rollout {r.id}: v{to} was never champion: gate and steps as a candidate")
    return _follow(args, store, LocalBackend(server.admin()), r.id, clock)


def status(args: argparse.Namespace) -> int:
    """``kloop rollout status [MODEL]``: each model's active rollout, else its latest."""
    from deploy.local.rollout_store import SQLiteRolloutStore
    from deploy.pipeline import report

    h = common.home(args)
    store = SQLiteRolloutStore(h.db)
    models = [args.target_model] if args.target_model else h.registry.models()
    shown = 0
    for model in models:
        history = store.list(model=model)
        if history:
            _print_rollout(report.console, store.active(model) or history[-1])
            shown += 1
    if not shown:
        print("no rollouts" + (f" of {args.target_model}" if args.target_model else ""))
    return 0


def _print_kserve(args: argparse.Namespace, candidate: Version, champion: Version | None) -> int:
    from deploy.cluster.kserve_manifests import render_kserve, to_yaml

    reg = common.home(args).registry
    if champion is None:  # the first version takes all traffic; nothing to split with
        weights = {candidate: 100}
    else:
        weights = {candidate: args.weight, champion: 100 - args.weight}
    objs = render_kserve(
        args.model, reg.manifest(args.model, champion) if champion else None,
        reg.manifest(args.model, candidate), weights, mode=args.mode,
        namespace=args.namespace or "default",
        storage_uri_prefix=args.storage_uri_prefix, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, autoscaler=args.autoscaler,
    )
    print(to_yaml(objs), end="")
    return 0


def _print_rollout(console: Console, r: Rollout) -> None:
    split = ", ".join(f"v{v} {w}%" for v, w in sorted(r.weights.items())) or "-"
    steps = ", ".join(f"{w}%" for w in r.steps)
    t = Table(title=f"rollout {r.id} — {r.phase.value}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", overflow="fold")
    t.add_row("model", r.model)
    t.add_row("candidate", f"v{r.candidate}")
    t.add_row("champion", f"v{r.champion}" if r.champion is not None else "(none: first version)")
    t.add_row("step", f"{r.step + 1}/{len(r.steps)} ({steps})" if r.step >= 0 else f"- ({steps})")
    t.add_row("weights", split)
    t.add_row("failed analyses", f"{r.failed}/{r.policy.failure_limit}")
    t.add_row("errors in a row", str(r.errors))
    t.add_row("reason", r.reason or "-")
    t.add_row("updated", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.updated)))
    console.print(t)
    events = Table(title="last events")
    for c in ("at", "event", "message"):
        events.add_column(c, overflow="fold")
    for ev in r.history[-8:]:
        count = f" ×{ev.count}" if ev.count > 1 else ""
        events.add_row(time.strftime("%H:%M:%S", time.localtime(ev.at)), ev.kind_name + count,
                       ev.message)
    console.print(events)
    if not r.phase.terminal:
        console.print(f"end it with `kloop rollout abort {r.model}`; resume it with `kloop "
                      f"rollout {r.model} --candidate {r.candidate}`")


def _in_cluster(args: argparse.Namespace, candidate: Version, champion: Version | None,
                policy: RolloutPolicy) -> int:
    """Create a kloop Rollout resource; the in-cluster controller (`kloop controller`) runs it."""
    from deploy.cluster.cr_store import CRRolloutStore
    from deploy.rollout import new_rollout

    kube = common.kube(args)
    rid = f"{args.model}-v{candidate}-{time.strftime('%Y%m%d%H%M%S')}"
    r = new_rollout(rid, args.model, candidate, champion, policy, time.time())
    backend = {"mode": args.mode, "storageUriPrefix": args.storage_uri_prefix,
               "minReplicas": args.min_replicas, "maxReplicas": args.max_replicas,
               "autoscaler": args.autoscaler}
    CRRolloutStore(kube, args.namespace or kube.namespace).create(r, backend=backend)
    print(f"rollout.kloop.dev/{rid} created; follow it with `kloop get rollouts` and "
          f"`kloop describe rollout {rid}`")
    return 0
