"""Where the shared peer harness lives, and its model definitions.

The harness (``../shared/bench/peers``: load generators, peer servers, the models) is used in
place, never copied. ``KLOOP_SHARED`` names the shared directory; the default is ``../shared``
next to the repository root.
"""

from __future__ import annotations

import importlib.util
import os
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_ENV = "KLOOP_SHARED"


class HarnessMissing(RuntimeError):
    """The shared peer harness is not where it should be."""


def shared_dir() -> Path:
    return Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared").resolve()


def peers_dir() -> Path:
    path = shared_dir() / "bench" / "peers"
    if not (path / "bench.py").is_file():
        raise HarnessMissing(
            f"the peer harness is not at {path} (set {SHARED_ENV} to the shared directory)")
    return path


def peer_models() -> types.ModuleType:
    """The harness's ``models.py`` (TinyMLP, ResNet18ish, ``build``, ``SHAPES``), imported by
    path so the same definitions and seeds build kloop's artifacts and the peers' files."""
    path = peers_dir() / "models.py"
    spec = importlib.util.spec_from_file_location("kloop_bench_peer_models", path)
    if spec is None or spec.loader is None:
        raise HarnessMissing(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
