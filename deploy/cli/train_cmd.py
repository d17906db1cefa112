"""``kloop train``: train a task under torchrun (DDP) locally, or as a PyTorchJob / TrainJob in a
cluster (``--target kubernetes``; ``--dry-run`` prints the manifest); ``kloop train cancel``.

The task (``--task NAME`` or ``--task module:Class``, its config from ``--config FILE`` and
``--set key=value``) is resolved and checked in this process before anything starts
(``trainer.task_check``): a task that cannot work is refused with one line, exit 2. The user's
module is found on the path of ``--code DIR`` when given, else of the current directory."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from deploy.cli import common

if TYPE_CHECKING:  # torch is slow to import: the trainer loads only when a command needs it
    from trainer.spec import TrainSpec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train with torchrun (DDP) or render a PyTorchJob/TrainJob",
                       description="Train locally under torchrun, or print the Kubernetes job the "
                                   "same spec renders to.")
    add_spec_args(p)
    p.add_argument("action", nargs="?", choices=("cancel",),
                   help="`kloop train cancel NAME`: delete a training job in the cluster")
    p.add_argument("name", nargs="?", help="job name (cancel; or the name to submit under)")
    p.add_argument("--target", choices=("local", "kubernetes"), default="local")
    p.add_argument("--dry-run", action="store_true",
                   help="with --target kubernetes: print the manifest")
    p.add_argument("--kind", choices=("pytorchjob", "trainjob"), default="pytorchjob",
                   help="Kubernetes job kind (default: %(default)s)")
    p.add_argument("--deadline", type=float, help="seconds the job may run before it is cancelled")
    common.add_kube_args(p)
    p.add_argument("--run-id", help="run id (default: train-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue RUN_ID from its last checkpoint")
    p.add_argument("--publish", action="store_true", help="publish the result to the registry")
    p.set_defaults(func=run)


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """The training spec's flags (``trainer.spec.TrainSpec``), its defaults shown."""
    from trainer.spec import CleanPodPolicy, Device, RestartPolicy, TrainSpec

    d = TrainSpec()
    t = p.add_argument_group("the task (trainer.task; `kloop tasks` lists the installed ones)")
    t.add_argument("--task", default=d.task,
                   help="registered task name or module:Class (default: %(default)s)")
    t.add_argument("--config", type=Path, metavar="FILE",
                   help="the task's config fields as a JSON (or YAML) object")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="one config field, typed by its default (repeatable; over --config)")
    t.add_argument("--code", type=Path, metavar="DIR",
                   help="directory with the task's code (and requirements.txt): put on the "
                        "workers' path locally, packed into the run's directory in a cluster")
    g = p.add_argument_group("training spec (trainer.spec.TrainSpec)")
    g.add_argument("--model-name", help="registry name (default: the task's registered name, "
                                        "or the spec's model name)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    g.add_argument("--batch-size", type=int, default=d.global_batch_size,
                   help="global batch over all processes (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    g.add_argument("--nproc", type=int, default=d.nproc_per_node,
                   help="processes per node (torchrun --nproc-per-node; default: %(default)s)")
    g.add_argument("--max-restarts", type=int, default=d.max_restarts,
                   help="worker-group restarts after a worker dies; training resumes from "
                        "the last checkpoint (default: %(default)s)")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS", dest="checkpoint_every",
                   help="also checkpoint every N optimizer steps (default: each epoch only)")
    g.add_argument("--device", choices=get_args(Device), default=d.device,
                   help="default: %(default)s (CUDA when present, else CPU)")
    k = p.add_argument_group("Kubernetes (--target kubernetes)")
    k.add_argument("--num-nodes", type=int, default=d.num_nodes,
                   help="replicas: 1 Master + N-1 Workers (default: %(default)s)")
    k.add_argument("--gpus", type=int, default=d.resources.gpus, help="nvidia.com/gpu per replica")
    k.add_argument("--cpu", default=d.resources.cpu, help="cpu per replica (default: %(default)s)")
    k.add_argument("--memory", default=d.resources.memory,
                   help="memory per replica (default: %(default)s)")
    k.add_argument("--image", default=d.image, help="trainer image (default: %(default)s)")
    k.add_argument("--restart-policy", default=d.restart_policy, choices=get_args(RestartPolicy),
                   help="default: %(default)s")
    k.add_argument("--clean-pod-policy", default=d.clean_pod_policy,
                   choices=get_args(CleanPodPolicy), help="default: %(default)s")
    k.add_argument("--backoff-limit", type=int, default=d.backoff_limit)
    k.add_argument("--ttl", type=int, default=d.ttl_seconds_after_finished, metavar="SECONDS",
                   help="delete the finished job after this long (runPolicy."
                        "ttlSecondsAfterFinished; default: %(default)s)")
    k.add_argument("--active-deadline", type=int, metavar="SECONDS",
                   help="the operator fails the job after it ran this long "
                        "(runPolicy.activeDeadlineSeconds)")
    k.add_argument("--elastic", metavar="MIN:MAX", help="elastic replicas (elasticPolicy, c10d)")
    k.add_argument("--pvc", help="PersistentVolumeClaim holding runs and the registry in the cluster")


def spec_from_args(args: argparse.Namespace, base: TrainSpec | None = None) -> TrainSpec:
    """The spec the options describe. With ``base`` (a resumed run's spec), only options that
    differ from their defaults change it, so ``--resume RUN`` needs no flag repeated."""
    from trainer.spec import Code, Elastic, Resources, TrainSpec
    from trainer.task import model_name_for

    default = TrainSpec()
    given: dict[str, Any] = {
        "task": args.task, "epochs": args.epochs,
        "global_batch_size": args.batch_size, "seed": args.seed,
        "nproc_per_node": args.nproc, "num_nodes": args.num_nodes,
        "max_restarts": args.max_restarts, "device": args.device, "image": args.image,
        "restart_policy": args.restart_policy, "clean_pod_policy": args.clean_pod_policy,
        "backoff_limit": args.backoff_limit, "ttl_seconds_after_finished": args.ttl,
        "resources": Resources(cpu=args.cpu, memory=args.memory, gpus=args.gpus),
    }
    changes = {k: v for k, v in given.items() if v != getattr(default, k)}
    base = base or default
    task = changes.get("task", base.task)
    if args.model_name:
        changes["model_name"] = args.model_name
    elif "task" in changes:
        changes["model_name"] = model_name_for(task)
    config = _config(args, task, dict(base.config))
    if config != base.config:
        changes["config"] = config
    if args.checkpoint_every is not None:
        changes["checkpoint_every_steps"] = args.checkpoint_every
    if args.active_deadline is not None:
        changes["active_deadline_seconds"] = args.active_deadline
    if args.code is not None:
        from trainer import code

        directory = args.code.expanduser().resolve()
        if not directory.is_dir():
            raise ValueError(f"--code {args.code}: not a directory")
        changes["code"] = Code(path=str(directory), sha256=code.digest(directory))
    if args.elastic:
        lo, _, hi = args.elastic.partition(":")
        changes["elastic"] = Elastic(min_replicas=int(lo), max_replicas=int(hi or lo))
    if args.pvc:
        changes["storage"] = dataclasses.replace(base.storage, pvc_claim=args.pvc)
    return base.replace(**changes)


def _config(args: argparse.Namespace, task: str, config: dict[str, Any]) -> dict[str, Any]:
    """``base`` config, then ``--config FILE``, then ``--set``: typed against the task's."""
    from trainer.task import load_class, parse_set

    if args.config is None and not args.sets:
        return config
    if args.config is not None:
        import yaml

        loaded = yaml.safe_load(args.config.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config}: expected an object of config fields")
        config.update(loaded)
    if args.sets:
        with task_path(args.code):
            config.update(parse_set(args.sets, load_class(task)))
    return config


@contextlib.contextmanager
def task_path(code: Path | None) -> Iterator[None]:
    """The user's module importable here: ``--code DIR``, else the current directory."""
    where = str((code or Path.cwd()).expanduser().resolve())
    sys.path.insert(0, where)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(where)


def check_task(spec: TrainSpec, code: Path | None) -> None:
    """Resolve and check the task (``trainer.task_check``) and say what will be trained."""
    from trainer.task_check import resolve

    with task_path(code):
        rt, sig = resolve(spec.task, spec.config)
    io = (", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in sig.inputs) + " -> "
          + ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in sig.outputs))
    # stderr: stdout may be a manifest for kubectl (--dry-run)
    print(f"task {rt.target}: {io}; gate metric {rt.primary_metric} "
          f"({next(m.direction for m in rt.metrics if m.name == rt.primary_metric)} is better)",
          file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.action == "cancel":
        from deploy.cluster import training_jobs

        if not args.name:
            raise ValueError("kloop train cancel NAME: name the job")
        gone = training_jobs.cancel(common.kube(args), args.name, kind=args.kind)
        print(f"{args.kind} {args.name}: {'deleted' if gone else 'no such job'}")
        return 0 if gone else 1
    h = common.home(args)
    base = None
    if args.resume:
        if not common.RUN_ID.match(args.resume):
            raise ValueError(f"--resume {args.resume!r}: not a run id")
        saved = h.runs_dir / args.resume / "train" / "spec.json"
        if not saved.is_file():
            print(f"kloop train: no run {args.resume!r} to resume in {h.runs_dir}",
                  file=sys.stderr)
            return 2
        from trainer.spec import TrainSpec

        base = TrainSpec.from_dict(json.loads(saved.read_text()))
    spec = spec_from_args(args, base)
    code = Path(spec.code.path) if spec.code is not None else args.code
    from trainer.task import TaskError

    try:
        check_task(spec, code)
    except TaskError as e:
        print(f"kloop train: {e}", file=sys.stderr)
        return 2
    run_id = args.resume or args.run_id or time.strftime("train-%Y%m%d-%H%M%S")
    if not common.RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-'")
    if args.target == "kubernetes":
        return _on_kubernetes(args, spec, run_id)
    from trainer.launch import TrainingFailed, run_local
    from trainer.publish import publish

    run_dir = h.runs_dir / run_id / "train"
    try:
        result = run_local(spec, run_dir, resume=bool(args.resume), progress=True,
                           pythonpath=[str(code.resolve() if code else Path.cwd())])
    except TrainingFailed as e:
        print(f"kloop train: {e}", file=sys.stderr)
        return 1
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                      if isinstance(v, int | float) and k != "num_examples")
    print(f"trained in {result.duration_s:.1f}s: held-out {shown} (run dir {run_dir})")
    if args.publish:
        m = publish(h.registry, spec, run_dir, run_id)
        print(f"published {m.name} v{m.version} to {h.registry.root}")
    return 0


def _on_kubernetes(args: argparse.Namespace, spec: TrainSpec, run_id: str) -> int:
    from trainer import job_manifests

    name = args.name or re.sub(r"[^a-z0-9-]", "-",
                               f"{spec.model_name}-{run_id}".lower())[:50].strip("-")
    from deploy.cluster import training_jobs

    if args.dry_run:  # the code ConfigMap (with --code) and the job, as submit creates them
        objects = training_jobs.render_objects(spec, name=name, run_id=run_id, kind=args.kind,
                                               namespace=args.namespace or "default")
        print(job_manifests.to_yaml(objects), end="")
        return 0
    from deploy.cluster.kube import KubeError

    try:
        m = training_jobs.run_on_kubernetes(common.kube(args), spec, name=name, run_id=run_id,
                                            kind=args.kind, deadline_s=args.deadline)
    except (training_jobs.TrainingError, KubeError) as e:
        print(f"kloop train: {e}", file=sys.stderr)
        return 1
    if m is not None:
        print(f"published {m.name} v{m.version}")
    return 0
