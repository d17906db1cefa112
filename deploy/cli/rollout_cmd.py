"""``kloop rollout MODEL --candidate V``: canary a published version against the champion on
the local server (ticking the controller in this process until the rollout ends), or as a
Rollout resource that the in-cluster controller runs (``--target kserve``; ``--dry-run``
prints the KServe objects instead)."""

from __future__ import annotations

import argparse
import sys
import time

from deploy.cli import common
from deploy.local.server_process import SERVER_FILE
from deploy.rollout import Event, Rollout
from kloop.model_version import Version


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rollout",
                       help="canary a version against the champion, then promote or roll back",
                       description="Roll MODEL's candidate out step by step with live analysis "
                                   "(local server), or print the KServe objects (--target "
                                   "kserve).")
    p.add_argument("model")
    p.add_argument("--candidate", required=True, help="version number, 'latest' or an alias")
    common.add_policy_args(p)
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between ticks (default: %(default)s)")
    common.add_server_args(p)
    p.add_argument("--target", choices=("local", "kserve"), default="local")
    p.add_argument("--dry-run", action="store_true", help="with --target kserve: print the objects")
    p.add_argument("--mode", choices=("Standard", "Serverless"), default="Standard",
                   help="KServe deployment mode (default: %(default)s)")
    p.add_argument("--weight", type=int, default=10, choices=range(0, 101), metavar="0..100",
                   help="candidate percent to render (default: %(default)s)")
    common.add_kube_args(p)
    p.add_argument("--storage-uri-prefix", default="pvc://kloop-registry",
                   help="where the cluster reads the registry (s3://, gs://, pvc://; default: "
                        "%(default)s)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--autoscaler", choices=("hpa", "external"), default="hpa")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    h = common.home(args)
    reg = h.registry
    if (args.target == "kserve" and not args.dry_run and args.candidate.isdecimal()
            and not reg.versions(args.model)):
        # The cluster's registry is on its PVC, not here: the controller resolves the champion.
        return _in_cluster(args, int(args.candidate), None)
    candidate = reg.resolve(args.model, args.candidate)
    champion = reg.alias(args.model, "champion")
    if args.target == "kserve":
        if not args.dry_run:
            return _in_cluster(args, candidate, champion)
        return _print_kserve(args, candidate, champion)
    return _local(args, candidate, champion)


def _local(args: argparse.Namespace, candidate: Version, champion: Version | None) -> int:
    from deploy.controller import RealClock, run_until_done
    from deploy.local.rollout_store import SQLiteRolloutStore
    from deploy.local.server_backend import LocalBackend
    from deploy.rollout import Phase, new_rollout

    h = common.home(args)
    server = common.server(args, h)
    if server is None:
        print(f"kloop rollout: no running server found ({h.root / SERVER_FILE}); start one with "
              "`kloop serve` or pass --server HOST:PORT", file=sys.stderr)
        return 2
    store = SQLiteRolloutStore(h.db)
    clock = RealClock()
    r = store.active(args.model)
    if r is not None and r.candidate == candidate:
        print(f"resuming rollout {r.id} (phase {r.phase.value}, step {r.step})")
    elif r is not None:
        print(f"kloop rollout: {args.model} already has active rollout {r.id} of v{r.candidate}",
              file=sys.stderr)
        return 2
    else:
        rid = time.strftime(f"{args.model}-v{candidate}-%Y%m%d-%H%M%S")
        r = store.create(new_rollout(rid, args.model, candidate, champion, common.policy(args),
                                     clock.now()))
        print(f"rollout {r.id}: {args.model} v{candidate} vs champion "
              f"{'v' + str(champion) if champion else '(none)'}, steps {list(r.steps)}")

    def show(_: Rollout, ev: Event) -> None:
        print(f"{time.strftime('%H:%M:%S')} {ev.kind_name}: {ev.message}")

    final = run_until_done(store, LocalBackend(server.admin()), h.registry, r.id, clock,
                           args.interval, show)
    print(f"rollout {final.id}: {final.phase.value} {final.reason}")
    return 0 if final.phase is Phase.SUCCEEDED else 1


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


def _in_cluster(args: argparse.Namespace, candidate: Version, champion: Version | None) -> int:
    """Create a kloop Rollout resource; the in-cluster controller (`kloop controller`) runs it."""
    from deploy.cluster.cr_store import CRRolloutStore
    from deploy.rollout import new_rollout

    kube = common.kube(args)
    rid = f"{args.model}-v{candidate}-{time.strftime('%Y%m%d%H%M%S')}"
    r = new_rollout(rid, args.model, candidate, champion, common.policy(args), time.time())
    backend = {"mode": args.mode, "storageUriPrefix": args.storage_uri_prefix,
               "minReplicas": args.min_replicas, "maxReplicas": args.max_replicas,
               "autoscaler": args.autoscaler}
    CRRolloutStore(kube, args.namespace or kube.namespace).create(r, backend=backend)
    print(f"rollout.kloop.dev/{rid} created; follow it with `kloop get rollouts` and "
          f"`kloop describe rollout {rid}`")
    return 0
