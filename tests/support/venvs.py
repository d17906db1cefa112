"""Virtual environments the tests build for themselves, cached under ``~/.cache/kloop/``.

A venv is (re)built when the spec it was built from changes (its sha256 is kept in a marker
file written last, so a half-built venv is never taken for a built one); a lock file beside it
keeps two test sessions on one machine (other checkouts share the cache) from building it at
once. Where a venv cannot be built (no package index, no wheel for this platform), the test
skips with pip's error, except under CI (``CI`` set, as CI services do): there it fails, so a
broken install never passes as a skip.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

CACHE = Path.home() / ".cache" / "kloop"
MARKER = "kloop-venv.json"
PIP = ("-m", "pip", "--disable-pip-version-check")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(message: str) -> NoReturn:
    """Skip, or fail under CI, because something a test needs cannot be installed here."""
    if in_ci():
        pytest.fail(f"{message}\n(CI is set: what cannot be installed fails instead of skipping)",
                    pytrace=False)
    pytest.skip(message)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_or_unavailable(cmd: Sequence[str | Path], what: str, timeout: float = 1800,
                       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    if done.returncode != 0:
        unavailable(f"cannot {what}: {' '.join(str(c) for c in cmd[:6])} ... exited "
                    f"{done.returncode}:\n{(done.stderr or done.stdout)[-1500:]}")
    return done


def spec_key(spec: dict[str, object]) -> str:
    full = {**spec, "python": list(sys.version_info[:2])}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()


def cached_venv(venv: Path, spec: dict[str, object], installs: Iterable[Sequence[str]],
                what: str) -> tuple[Path, bool]:
    """``venv``'s python, and whether it was built just now.

    Built from ``spec`` (anything JSON; with this Python's version it forms the key) by running
    ``python -m pip install ARGS`` for each entry of ``installs``, in order; ``installs`` is
    iterated only while building, after the venv exists (a generator may ask the new venv)."""
    python = venv / "bin" / "python"
    key = spec_key(spec)

    def built() -> bool:
        try:
            return bool(json.loads((venv / MARKER).read_text())["key"] == key and python.exists())
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    if built():
        return python, False
    with locked(venv.with_name(venv.name + ".lock")):
        if built():  # another session built it while this one waited
            return python, False
        run_or_unavailable([sys.executable, "-m", "venv", "--clear", venv], f"create {venv}")
        for args in installs:
            run_or_unavailable([python, *PIP, "install", "--quiet", *args], f"build {what} in {venv}")
        (venv / MARKER).write_text(json.dumps({"key": key, "spec": spec}, indent=1) + "\n")
    return python, True
