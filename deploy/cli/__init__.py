"""``kloop``: one command line for the whole loop, one module per command group.

The only package (with ``serving.cli``, which ``kloop serve`` wires in) that reads argv and the
environment (``KLOOP_HOME``, ``KLOOP_ADMIN_TOKEN``); everything below it receives typed config.
State lives under ``$KLOOP_HOME`` (default ``~/.kloop``; ``deploy.local.home``).

=================  ================================================================
``train_cmd``      ``kloop train`` (torchrun, or a PyTorchJob / TrainJob), ``train cancel``
``tasks_cmd``      ``kloop tasks`` (the installed tasks; check one)
``serve_cmd``      ``kloop serve`` (the model server on the home's registry)
``rollout_cmd``    ``kloop rollout`` (local canary, or a Rollout resource for KServe)
``pipeline_cmd``   ``kloop pipeline run``, ``kloop runs``
``up_cmd``         ``kloop up`` (the control plane: API, web UI, runs, rollouts)
``status_cmd``     ``kloop status``
``cluster_cmd``    ``kloop controller``, ``kloop get``, ``kloop describe``
``demo_cmd``       ``kloop demo`` (the main job)
``common``         the home, kubectl's flags, the rollout policy's flags, the local server
=================  ================================================================
"""

from __future__ import annotations

import argparse
import sys

from deploy.cli import (
    cluster_cmd,
    common,
    demo_cmd,
    pipeline_cmd,
    rollout_cmd,
    serve_cmd,
    status_cmd,
    tasks_cmd,
    train_cmd,
    up_cmd,
)
from deploy.cluster.kube import KubeError
from deploy.control.client import ControlError
from kloop.artifact import ArtifactError

_COMMANDS = (tasks_cmd, train_cmd, serve_cmd, rollout_cmd, pipeline_cmd, up_cmd, status_cmd, cluster_cmd,
             demo_cmd)


def build_parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="kloop",
        description="Close the loop between training and serving PyTorch models: train (DDP) "
                    "→ evaluate → publish → serve (OIP v2) → canary → promote / roll back.",
    )
    root.add_argument("--home", help=f"state directory (default: ${common.HOME_ENV} or ~/.kloop)")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.register(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except ControlError as e:
        print(f"kloop {args.command}: the control plane said: {e.message}", file=sys.stderr)
        return 2 if 400 <= e.status < 500 else 1
