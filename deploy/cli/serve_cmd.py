"""``kloop serve``: the model server (``serving.cli``) on the home's registry, recording its
ports in ``<home>/server.json`` and its admin token in ``<home>/admin-token`` so the other
commands find it.

One server per home: while it writes the home's ``server.json`` it holds the home's lock
(``deploy.local.server_process.HomeLock``); a second ``kloop serve`` on the same home exits 2
without touching the first's record. The lock is taken after ``serving.openmp``'s re-exec (the
exec would close its descriptor, opened close-on-exec) and lasts as long as the process.

The home's token reaches the server through ``KLOOP_ADMIN_TOKEN`` in this process's environment,
not through ``--admin-token``: the workers of ``--workers N`` re-run this command line and inherit
the environment, and a token on a command line is what ``ps`` shows everyone.
"""

from __future__ import annotations

import argparse
import os
import sys

from deploy.cli import common
from deploy.local.server_process import SERVER_FILE, HomeBusy, HomeLock, ensure_token
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
    from serving import openmp

    h = common.home(args)
    if args.registry == common.HOME_REGISTRY:
        args.registry = str(h.registry.root)
    if args.ports_file is None:
        args.ports_file = h.root / SERVER_FILE
        if args.admin_token is None and not os.environ.get(TOKEN_ENV):
            os.environ[TOKEN_ENV] = ensure_token(h.root)  # inherited by workers (module doc)
    if args.ports_file.resolve() != h.root / SERVER_FILE:  # a worker, or a file of the user's
        return serving_cli.run(args)
    openmp.restart_with_spin_count()  # before the lock, which an exec would drop
    try:
        lock = HomeLock.acquire(h.root)
    except HomeBusy as e:
        print(f"kloop serve: {e}", file=sys.stderr)
        return 2
    with lock:
        return serving_cli.run(args)
