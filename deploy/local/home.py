"""Where kloop keeps its state on one machine (``$KLOOP_HOME``, default ``~/.kloop``)::

    <home>/registry/      versions and aliases (``kloop.artifact.Registry``)
    <home>/runs/<id>/     a pipeline or training run: checkpoints, logs, progress
    <home>/kloop.db       rollouts and pipeline runs (``deploy.local.sqlite``)
    <home>/server.json    while ``kloop serve`` runs: where it listens (``deploy.local.server_process``)
    <home>/server.lock    flock'ed by that server for its life (one per home), with its pid
    <home>/admin-token    its admin token (mode 0600)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from deploy.local.sqlite import DB_FILE
from kloop.artifact import Registry


@dataclasses.dataclass(frozen=True)
class Home:
    root: Path

    @property
    def registry(self) -> Registry:
        return Registry(self.root / "registry")

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def db(self) -> Path:
        return self.root / DB_FILE
