"""``kloop``: one command line for the whole loop.

The only module (with ``serving.cli``, which it wires in as ``kloop serve``) that reads argv and
the environment (``KLOOP_HOME``, ``KLOOP_ADMIN_TOKEN``); everything below receives typed config.
State lives under ``$KLOOP_HOME`` (default ``~/.kloop``): ``registry/``, ``runs/``, ``kloop.db``,
and, while ``kloop serve`` runs, ``server.json`` + ``admin-token``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from deploy import report
from deploy.kube import KubeError
from deploy.localserver import SERVER_FILE, TOKEN_FILE, ServerHandle, discover, ensure_token
from deploy.pipeline import Fault, Home, Pipeline
from deploy.rollout import RolloutPolicy
from kloop.artifact import ArtifactError
from serving.cli import TOKEN_ENV

HOME_ENV = "KLOOP_HOME"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOME_REGISTRY = "$KLOOP_HOME/registry"


def _home(args: argparse.Namespace) -> Home:
    root = args.home or os.environ.get(HOME_ENV) or "~/.kloop"
    return Home(Path(root).expanduser().resolve())


# ---- train ------------------------------------------------------------------------------


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from trainer.spec import TrainSpec

    d = TrainSpec()
    g = p.add_argument_group("training spec (trainer.spec.TrainSpec)")
    g.add_argument("--model-name", default=d.model_name, help="registry name (default: %(default)s)")
    g.add_argument("--arch", default=d.arch, help="architecture (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    g.add_argument("--batch-size", type=int, default=d.global_batch_size,
                   help="global batch over all processes (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="default: %(default)s")
    g.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    g.add_argument("--nproc", type=int, default=d.nproc_per_node,
                   help="processes per node (torchrun --nproc-per-node; default: %(default)s)")
    g.add_argument("--shuffle-labels", action="store_true",
                   help="train on permuted labels: a deliberately bad candidate")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    k = p.add_argument_group("Kubernetes (--target kubernetes)")
    k.add_argument("--num-nodes", type=int, default=d.num_nodes,
                   help="replicas: 1 Master + N-1 Workers (default: %(default)s)")
    k.add_argument("--gpus", type=int, default=d.resources.gpus, help="nvidia.com/gpu per replica")
    k.add_argument("--cpu", default=d.resources.cpu, help="cpu per replica (default: %(default)s)")
    k.add_argument("--memory", default=d.resources.memory, help="memory per replica (default: %(default)s)")
    k.add_argument("--image", default=d.image, help="trainer image (default: %(default)s)")
    k.add_argument("--restart-policy", default=d.restart_policy)
    k.add_argument("--clean-pod-policy", default=d.clean_pod_policy, choices=("None", "Running", "All"))
    k.add_argument("--backoff-limit", type=int, default=d.backoff_limit)
    k.add_argument("--elastic", metavar="MIN:MAX", help="elastic replicas (elasticPolicy, c10d)")
    k.add_argument("--pvc", help="PersistentVolumeClaim holding runs and the registry in the cluster")


def _spec(args: argparse.Namespace, base=None):  # -> TrainSpec (lazy import: torch is slow)
    """The spec the options describe. With ``base`` (a resumed run's spec), only options that
    differ from their defaults change it, so ``--resume RUN`` needs no flag repeated."""
    import dataclasses

    from trainer.spec import Elastic, Resources, TrainSpec

    default = TrainSpec()
    given = {
        "model_name": args.model_name, "arch": args.arch, "epochs": args.epochs,
        "global_batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "nproc_per_node": args.nproc, "num_nodes": args.num_nodes,
        "shuffle_labels": args.shuffle_labels, "device": args.device, "image": args.image,
        "restart_policy": args.restart_policy, "clean_pod_policy": args.clean_pod_policy,
        "backoff_limit": args.backoff_limit,
        "resources": Resources(cpu=args.cpu, memory=args.memory, gpus=args.gpus),
    }
    changes = {k: v for k, v in given.items() if v != getattr(default, k)}
    base = base or default
    if args.elastic:
        lo, _, hi = args.elastic.partition(":")
        changes["elastic"] = Elastic(min_replicas=int(lo), max_replicas=int(hi or lo))
    if args.pvc:
        changes["storage"] = dataclasses.replace(base.storage, pvc_claim=args.pvc)
    return base.replace(**changes)


def _kube(args: argparse.Namespace):
    from deploy.kube import Kube, KubeConfig

    return Kube.connect(KubeConfig(kubeconfig=args.kubeconfig, context=args.context,
                                   namespace=args.namespace))


def cmd_train(args: argparse.Namespace) -> int:
    if args.action == "cancel":
        from deploy import k8s_training

        if not args.name:
            raise ValueError("kloop train cancel NAME: name the job")
        gone = k8s_training.cancel(_kube(args), args.name, kind=args.kind)
        print(f"{args.kind} {args.name}: {'deleted' if gone else 'no such job'}")
        return 0 if gone else 1
    home = _home(args)
    base = None
    if args.resume:
        if not _RUN_ID.match(args.resume):
            raise ValueError(f"--resume {args.resume!r}: not a run id")
        saved = home.runs_dir / args.resume / "train" / "spec.json"
        if not saved.is_file():
            print(f"kloop train: no run {args.resume!r} to resume in {home.runs_dir}", file=sys.stderr)
            return 2
        from trainer.spec import TrainSpec

        base = TrainSpec.from_dict(json.loads(saved.read_text()))
    spec = _spec(args, base)
    run_id = args.resume or args.run_id or time.strftime("train-%Y%m%d-%H%M%S")
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-'")
    if args.target == "kubernetes":
        from trainer import k8s

        name = args.name or re.sub(r"[^a-z0-9-]", "-", f"{spec.model_name}-{run_id}".lower())[:50].strip("-")
        if args.dry_run:
            render = k8s.render_trainjob if args.kind == "trainjob" else k8s.render_pytorchjob
            ns = args.namespace or "default"
            print(k8s.to_yaml(render(spec, name=name, namespace=ns, run_id=run_id)), end="")
            return 0
        from deploy import k8s_training
        from deploy.kube import KubeError

        try:
            m = k8s_training.run_on_kubernetes(_kube(args), spec, name=name, run_id=run_id,
                                               kind=args.kind, deadline_s=args.deadline)
        except (k8s_training.TrainingError, KubeError) as e:
            print(f"kloop train: {e}", file=sys.stderr)
            return 1
        if m is not None:
            print(f"published {m.name} v{m.version}")
        return 0
    from trainer.launch import TrainingFailed, run_local
    from trainer.publish import publish

    run_dir = home.runs_dir / run_id / "train"
    try:
        result = run_local(spec, run_dir, resume=bool(args.resume), progress=True)
    except TrainingFailed as e:
        print(f"kloop train: {e}", file=sys.stderr)
        return 1
    print(f"trained in {result.duration_s:.1f}s: held-out accuracy {result.metrics['accuracy']:.4f}, "
          f"loss {result.metrics['loss']:.4f} (run dir {run_dir})")
    if args.publish:
        m = publish(home.registry, spec, run_dir, run_id)
        print(f"published {m.name} v{m.version} to {home.registry.root}")
    return 0


# ---- rollout ----------------------------------------------------------------------------


def _add_kube_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (kubectl's habits)")
    g.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    g.add_argument("--context", help="kubeconfig context")
    g.add_argument("-n", "--namespace", help="namespace (default: the context's)")


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    d = RolloutPolicy()
    g = p.add_argument_group("rollout policy (deploy.rollout.RolloutPolicy)")
    g.add_argument("--steps", default=",".join(map(str, d.steps)),
                   help="candidate traffic percent per step (default: %(default)s)")
    g.add_argument("--min-requests", type=int, default=d.min_requests,
                   help="candidate requests per step before judging (default: %(default)s)")
    g.add_argument("--min-duration", type=float, default=d.min_duration_s,
                   help="seconds per step before judging (default: %(default)s)")
    g.add_argument("--step-timeout", type=float, default=d.step_timeout_s,
                   help="seconds a step may stay inconclusive before aborting (default: %(default)s)")
    g.add_argument("--max-error-rate", type=float, default=d.max_error_rate,
                   help="candidate 5xx rate always accepted (default: %(default)s)")
    g.add_argument("--max-p99-ratio", type=float, default=d.max_p99_ratio,
                   help="candidate p99 / champion p99 limit (default: %(default)s)")
    g.add_argument("--failure-limit", type=int, default=d.failure_limit,
                   help="failed analyses that roll back (default: %(default)s)")
    g.add_argument("--max-accuracy-drop", type=float, default=d.max_accuracy_drop,
                   help="gate: accuracy the candidate may lose vs the champion (default: %(default)s)")
    g.add_argument("--min-accuracy", type=float, default=d.min_accuracy,
                   help="gate: absolute minimum accuracy (default: none)")
    g.add_argument("--retire-after", type=float, default=d.retire_after_s,
                   help="seconds the old champion stays loaded after promotion (default: %(default)s)")


def _policy(args: argparse.Namespace) -> RolloutPolicy:
    return RolloutPolicy(
        steps=tuple(int(s) for s in args.steps.split(",")), min_requests=args.min_requests,
        min_duration_s=args.min_duration, step_timeout_s=args.step_timeout,
        max_error_rate=args.max_error_rate, max_p99_ratio=args.max_p99_ratio,
        failure_limit=args.failure_limit, max_accuracy_drop=args.max_accuracy_drop,
        min_accuracy=args.min_accuracy, retire_after_s=args.retire_after,
    )


def _server(args: argparse.Namespace, home: Home) -> ServerHandle | None:
    if getattr(args, "server", None):
        token = os.environ.get(TOKEN_ENV) or _read_token(home)
        if not token:
            raise ValueError(f"--server needs the server's admin token: set {TOKEN_ENV} "
                             f"or put it in {home.root / TOKEN_FILE}")
        host_port = args.server.removeprefix("http://").rstrip("/")
        grpc = args.grpc_target or host_port
        return ServerHandle(http_url=f"http://{host_port}", grpc_target=grpc, token=token)
    return discover(home.root)


def _read_token(home: Home) -> str | None:
    try:
        return (home.root / TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def cmd_rollout(args: argparse.Namespace) -> int:
    from deploy.backends.local import LocalBackend
    from deploy.controller import RealClock, run_until_done
    from deploy.rollout import Phase, new_rollout
    from deploy.store import RolloutStore

    home = _home(args)
    reg = home.registry
    if args.target == "kserve" and not args.dry_run and args.candidate.isdecimal() and not reg.versions(args.model):
        # The cluster's registry is on its PVC, not here: the controller resolves the champion.
        return _rollout_in_cluster(args, int(args.candidate), None)
    candidate = reg.resolve(args.model, args.candidate)
    champion = reg.alias(args.model, "champion")
    if args.target == "kserve":
        from deploy.kserve import render_kserve, to_yaml

        if not args.dry_run:
            return _rollout_in_cluster(args, candidate, champion)
        if champion is None:  # the first version takes all traffic; nothing to split with
            weights = {str(candidate): 100}
        else:
            weights = {str(candidate): args.weight, str(champion): 100 - args.weight}
        objs = render_kserve(
            args.model, reg.manifest(args.model, champion) if champion else None,
            reg.manifest(args.model, candidate), weights, mode=args.mode,
            namespace=args.namespace or "default",
            storage_uri_prefix=args.storage_uri_prefix, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, autoscaler=args.autoscaler,
        )
        print(to_yaml(objs), end="")
        return 0
    server = _server(args, home)
    if server is None:
        print(f"kloop rollout: no running server found ({home.root / SERVER_FILE}); start one with "
              "`kloop serve` or pass --server HOST:PORT", file=sys.stderr)
        return 2
    store = RolloutStore(home.db)
    policy = _policy(args)
    clock = RealClock()
    r = store.active(args.model)
    if r is not None and r.candidate == str(candidate):
        print(f"resuming rollout {r.id} (phase {r.phase.value}, step {r.step})")
    elif r is not None:
        print(f"kloop rollout: {args.model} already has active rollout {r.id} of v{r.candidate}",
              file=sys.stderr)
        return 2
    else:
        rid = time.strftime(f"{args.model}-v{candidate}-%Y%m%d-%H%M%S")
        r = store.create(new_rollout(rid, args.model, str(candidate),
                                     None if champion is None else str(champion), policy, clock.now()))
        print(f"rollout {r.id}: {args.model} v{candidate} vs champion "
              f"{'v' + str(champion) if champion else '(none)'}, steps {list(r.steps)}")
    backend = LocalBackend(server.admin(), reg)
    final = run_until_done(store, backend, reg, r.id, clock, args.interval,
                           lambda ro, ev: print(f"{time.strftime('%H:%M:%S')} {ev.kind}: {ev.message}"))
    print(f"rollout {final.id}: {final.phase.value} {final.reason}")
    return 0 if final.phase is Phase.SUCCEEDED else 1


# ---- pipeline, runs, status -------------------------------------------------------------


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    home = _home(args)
    fault = Fault(error_rate=args.inject_fault) if args.inject_fault else None
    pipe = Pipeline(home, server=_server(args, home), policy=_policy(args),
                    tick_interval_s=args.interval, log=print)
    run = pipe.run(_spec(args), fault=fault, label=args.label)
    report.print_run(run)
    return 0 if run.status == "succeeded" else 1


def cmd_runs(args: argparse.Namespace) -> int:
    from deploy.runs import RunStore

    store = RunStore(_home(args).db)
    if args.action == "show":
        for rid in args.ids:
            report.print_run(store.get(rid))
    elif args.action == "compare":
        report.print_comparison([store.get(r) for r in args.ids])
    else:
        report.print_runs(store.list(model=args.model, limit=args.limit))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deploy.store import RolloutStore

    home = _home(args)
    server = discover(home.root)
    report.print_status(home.registry, server, RolloutStore(home.db), args.model)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving import cli as serving_cli

    home = _home(args)
    if args.ports_file is None:
        args.ports_file = home.root / SERVER_FILE
        if args.admin_token is None and not os.environ.get(TOKEN_ENV):
            args.admin_token = ensure_token(home.root)
    return serving_cli.run(args)


def _rollout_in_cluster(args: argparse.Namespace, candidate: int, champion: int | None) -> int:
    """Create a kloop Rollout resource; the in-cluster controller (`kloop controller`) runs it."""
    from deploy.crstore import CRRolloutStore
    from deploy.rollout import new_rollout

    kube = _kube(args)
    rid = f"{args.model}-v{candidate}-{time.strftime('%Y%m%d%H%M%S')}"
    r = new_rollout(rid, args.model, str(candidate), None if champion is None else str(champion),
                    _policy(args), time.time())
    backend = {"mode": args.mode, "storageUriPrefix": args.storage_uri_prefix,
               "minReplicas": args.min_replicas, "maxReplicas": args.max_replicas,
               "autoscaler": args.autoscaler}
    CRRolloutStore(kube, args.namespace or kube.namespace).create(r, backend=backend)
    print(f"rollout.kloop.dev/{rid} created; follow it with `kloop get rollouts` and "
          f"`kloop describe rollout {rid}`")
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    from deploy import controller_cli

    return controller_cli.run(args)


def cmd_get(args: argparse.Namespace) -> int:
    from deploy import controller_cli

    print(controller_cli.format_table(controller_cli.get_rollouts(_kube(args), args.namespace)))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from deploy import controller_cli

    print(controller_cli.describe_rollout(_kube(args), args.name, args.namespace))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from deploy import demo

    if args.dir is None:
        args.dir = _home(args).root / "demo"
    return demo.main(args)


# ---- the parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from serving.cli import add_serve_arguments

    root = argparse.ArgumentParser(
        prog="kloop",
        description="Close the loop between training and serving PyTorch models: "
                    "train (DDP) → evaluate → publish → serve (OIP v2) → canary → promote / roll back.",
    )
    root.add_argument("--home", help=f"state directory (default: ${HOME_ENV} or ~/.kloop)")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train with torchrun (DDP) or render a PyTorchJob/TrainJob",
                       description="Train locally under torchrun, or print the Kubernetes job the "
                                   "same spec renders to.")
    _add_train_args(p)
    p.add_argument("action", nargs="?", choices=("cancel",),
                   help="`kloop train cancel NAME`: delete a training job in the cluster")
    p.add_argument("name", nargs="?", help="job name (cancel; or the name to submit under)")
    p.add_argument("--target", choices=("local", "kubernetes"), default="local")
    p.add_argument("--dry-run", action="store_true", help="with --target kubernetes: print the manifest")
    p.add_argument("--kind", choices=("pytorchjob", "trainjob"), default="pytorchjob",
                   help="Kubernetes job kind (default: %(default)s)")
    p.add_argument("--deadline", type=float, help="seconds the job may run before it is cancelled")
    _add_kube_args(p)
    p.add_argument("--run-id", help="run id (default: train-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue RUN_ID from its last checkpoint")
    p.add_argument("--publish", action="store_true", help="publish the result to the registry")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="serve the registry over OIP v2 (gRPC + HTTP)",
                       description="Serve the registry's models over the Open Inference Protocol v2.")
    add_serve_arguments(p, default_registry=_HOME_REGISTRY)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("rollout", help="canary a version against the champion, then promote or roll back",
                       description="Roll MODEL's candidate out step by step with live analysis "
                                   "(local server), or print the KServe objects (--target kserve).")
    p.add_argument("model")
    p.add_argument("--candidate", required=True, help="version number, 'latest' or an alias")
    _add_policy_args(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between ticks (default: %(default)s)")
    p.add_argument("--server", help="HTTP HOST:PORT of the server (default: the one `kloop serve` recorded)")
    p.add_argument("--grpc-target", help="gRPC HOST:PORT (with --server)")
    p.add_argument("--target", choices=("local", "kserve"), default="local")
    p.add_argument("--dry-run", action="store_true", help="with --target kserve: print the objects")
    p.add_argument("--mode", choices=("Standard", "Serverless"), default="Standard",
                   help="KServe deployment mode (default: %(default)s)")
    p.add_argument("--weight", type=int, default=10, choices=range(0, 101), metavar="0..100",
                   help="candidate percent to render (default: %(default)s)")
    _add_kube_args(p)
    p.add_argument("--storage-uri-prefix", default="pvc://kloop-registry",
                   help="where the cluster reads the registry (s3://, gs://, pvc://; default: %(default)s)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--autoscaler", choices=("hpa", "external"), default="hpa")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("pipeline", help="train → evaluate → publish → gate → canary → promote/roll back")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    pr = psub.add_parser("run", help="run the pipeline once",
                         description="Run train → evaluate → publish → gate → canary → decide, with a "
                                     "run record (see `kloop runs`).")
    _add_train_args(pr)
    _add_policy_args(pr)
    pr.add_argument("--interval", type=float, default=1.0, help="seconds between rollout ticks")
    pr.add_argument("--server", help="HTTP HOST:PORT of the server (default: the one `kloop serve` recorded)")
    pr.add_argument("--grpc-target", help="gRPC HOST:PORT (with --server)")
    pr.add_argument("--inject-fault", type=float, metavar="ERROR_RATE",
                    help="fail this fraction of the candidate's requests while canaried (chaos test)")
    pr.add_argument("--label", default="", help="a note kept with the run")
    pr.set_defaults(func=cmd_pipeline_run)

    p = sub.add_parser("runs", help="pipeline run history: list, show, compare")
    p.add_argument("action", nargs="?", choices=("list", "show", "compare"), default="list")
    p.add_argument("ids", nargs="*", help="run ids (or their unique suffixes) for show/compare")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("status", help="models, versions, aliases, weights, rollout history")
    p.add_argument("model", nargs="?")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("controller", help="run the in-cluster rollout controller",
                       description="Reconcile kloop Rollout resources with leader election.")
    from deploy import controller_cli

    controller_cli.add_arguments(p)
    p.set_defaults(func=cmd_controller)

    p = sub.add_parser("get", help="list kloop resources in the cluster (kubectl get)")
    p.add_argument("resource", choices=("rollouts", "rollout", "klr"))
    _add_kube_args(p)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("describe", help="show a kloop resource with its history and events")
    p.add_argument("resource", choices=("rollout", "rollouts", "klr"))
    p.add_argument("name")
    _add_kube_args(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("demo", help="the whole loop, locally, on embedded defaults (the main job)",
                       description="Train v1 → serve it under live traffic → canary a better v2 and "
                                   "promote it → reject a bad candidate at the gate → roll back a "
                                   "faulty one by live analysis → summary. Leaves no process running.")
    from deploy.demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    return root


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and args.registry == _HOME_REGISTRY:
        args.registry = str(_home(args).registry.root)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, LookupError, ArtifactError) as e:
        print(f"kloop {args.command}: {e}", file=sys.stderr)
        return 2
    except KubeError as e:
        print(f"kloop {args.command}: the cluster said: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
