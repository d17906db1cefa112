"""``kloop serve``: the model server (``serving.cli``) on the home's registry, recording its
ports in ``<home>/server.json`` and its admin token in ``<home>/admin-token`` so the other
commands find it."""

from __future__ import annotations

import argparse
import os

from deploy.cli import common
from deploy.local.server_process import SERVER_FILE, ensure_token
from serving.cli import TOKEN_ENV


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from serving.cli import add_serve_arguments

    p = sub.add_parser("serve", help="serve the registry over OIP v2 (gRPC + HTTP)",
                       description="Serve the registry's models over the Open Inference "
                                   "Protocol v2.")
    add_serve_arguments(p, default_registry=common.HOME_REGISTRY)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from serving import cli as serving_cli

    h = common.home(args)
    if args.registry == common.HOME_REGISTRY:
        args.registry = str(h.registry.root)
    if args.ports_file is None:
        args.ports_file = h.root / SERVER_FILE
        if args.admin_token is None and not os.environ.get(TOKEN_ENV):
            args.admin_token = ensure_token(h.root)
    return serving_cli.run(args)
