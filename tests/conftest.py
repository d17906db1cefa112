"""The suite's tiers, and what every tier shares.

A test's tier is the first folder under tests/ it lives in, and that folder is its marker:

- ``unit``: one process, no network, no child processes (files under tmp_path are fine);
- ``component``: real servers on 127.0.0.1, in-process or as child processes, a real
  Prometheus; seconds each;
- ``slow``: torchrun, the whole loop, several server processes at once (``--workers``, the
  OpenMP re-exec), venvs built from an index, the benchmark's smoke run;
- ``cluster``: a real kube-apiserver + etcd from ../shared/k8s.

``scripts/test -m "unit or component"`` is the quick tier. A test file outside the four folders
is a collection error, so no test goes unmarked. The fixtures the tiers share are plugins under
tests/support (registered below); ``processes`` is the one way a test starts a child process
and the one teardown for it (a module- or session-scoped fixture holds a ``Processes`` of its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import Processes

TIERS = ("unit", "component", "slow", "cluster")
TESTS = Path(__file__).resolve().parent

pytest_plugins = ["tests.support.serving", "tests.support.clients"]


def tier_of(path: Path) -> str | None:
    try:
        first = path.resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return first if first in TIERS else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            raise pytest.UsageError(
                f"{item.nodeid}: a test lives under tests/<tier>/ (one of {', '.join(TIERS)})")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Child processes of one test, stopped (SIGTERM to the group, grace, SIGKILL) at its end."""
    procs = Processes()
    try:
        yield procs
    finally:
        procs.close()
