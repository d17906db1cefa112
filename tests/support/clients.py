"""Standard OIP v2 clients against a real ``python -m serving`` process, in two set-ups.

*Separate venvs* (test_triton.py, test_kserve.py): the server runs in kloop's dev venv, on the
newest protobuf and grpcio (7.x and 1.8x today), and the clients in a venv of their own
(``$KLOOP_CLIENTS_VENV``, default ``~/.cache/kloop/clients-venv``, made here on first use with
the pins below), where tritonclient 2.73 and kserve 0.21 hold protobuf < 7: a cross-version wire
test. Each client family runs as a subprocess of that venv's python, because kserve and
tritonclient.grpc cannot share a process (each registers ``inference.*`` in protobuf's default
pool, see ../shared/ARCHITECTURE.md).

*One venv* (test_coinstall.py): kloop installed from this checkout together with kserve and
tritonclient[all] by ONE pip resolver call (what a KServe user gets), the server and the clients
all running in that venv (``~/.cache/kloop/coinstall-venv``, rebuilt when pyproject's
dependencies or the pins change).

Where a venv cannot be built (no package index), the tests skip with pip's error, or fail when
``CI`` is set (tests/support/venvs.py). The servers host one copy model per datatype
(tests/support/dtype_models.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.server_process import SERVER_FILE, ServerHandle, ServerProcess, ensure_token
from serving.cli import TOKEN_ENV
from tests.support.dtype_models import publish_all
from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.support.venvs import CACHE, PIP, cached_venv, run_or_unavailable, unavailable

SCRIPTS = Path(__file__).resolve().parent / "scripts"  # run inside the client venvs
# psutil: the shared benchmark harness (bench.py) runs in this venv for the benchmark's smoke test.
CLIENT_REQUIREMENTS = ("tritonclient[grpc,http]==2.73.0", "kserve==0.21.0", "numpy", "psutil")


def _venv_dir() -> Path:
    default = Path.home() / ".cache" / "kloop" / "clients-venv"
    return Path(os.environ.get("KLOOP_CLIENTS_VENV", default))


def _works(python: Path) -> bool:
    if not python.exists():
        return False
    # each family imported in its own process, as the tests run them
    return all(subprocess.run([str(python), "-c", stmt], check=False, capture_output=True,
                              timeout=120).returncode == 0
               for stmt in ("import tritonclient.grpc, tritonclient.http, numpy",
                            "import kserve, httpx, numpy, psutil"))


@pytest.fixture(scope="session")
def clients_python() -> Path:
    """The clients venv's python, created on first use; skips with pip's error if it cannot
    be installed here (fails under CI)."""
    venv = _venv_dir()
    python = venv / "bin" / "python"
    if _works(python):
        return python
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *CLIENT_REQUIREMENTS]]
    for cmd in steps:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            unavailable(f"cannot install the OIP clients ({' '.join(CLIENT_REQUIREMENTS)}) into "
                        f"{venv}: {(done.stderr or done.stdout)[-800:]}")
    if not _works(python):
        unavailable(f"the OIP clients installed into {venv} do not import")
    return python


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("client-registry")
    publish_all(root, tmp_path_factory.mktemp("client-export"))
    home = tmp_path_factory.mktemp("client-home")
    with ServerProcess(root, home) as handle:
        yield handle


def run_script(python: Path, script: str, *args: str, isolated: bool = False,
               timeout: float = 300) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run a client script: (its check results, its other JSON lines); fail with every failed
    check's traceback. ``isolated``: ``python -I`` (no PYTHONPATH, no cwd on sys.path)."""
    cmd = [str(python), *(["-I"] if isolated else []), str(SCRIPTS / script), *args]
    done = subprocess.run(cmd, check=False, cwd=SCRIPTS, text=True, capture_output=True, timeout=timeout)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    results = [r for r in lines if "check" in r]
    failed = [r for r in results if not r["ok"]]
    report = "\n".join(f"--- {r['check']}\n{r['error']}" for r in failed)
    assert done.returncode == 0 and results, (
        f"{script} {args[0]}: exit {done.returncode}, {len(failed)} of {len(results)} checks "
        f"failed\n{report}\nstderr:\n{done.stderr[-3000:]}"
    )
    return results, [r for r in lines if "check" not in r]


def run_client(python: Path, script: str, *args: str) -> list[dict[str, Any]]:
    """Run a client script; fail with every failed check's traceback."""
    return run_script(python, script, *args)[0]


# -- one venv: kloop beside kserve and tritonclient ---------------------------------------------

# kloop goes in with its neighbours in ONE resolver call (the issue: ``pip install kloop kserve``
# and kloop beside ``tritonclient[all]`` must resolve and import). torch goes in first, the CPU
# build: kloop's loose ``torch>=2.4`` would otherwise pull the default CUDA build (several GB).
COINSTALL_TORCH = "torch==2.13.0"
COINSTALL_NEIGHBOURS = ("kserve==0.21.0", "tritonclient[all]==2.73.0")
# what kloop's distribution is built from (pyproject's packages.find + readme); copied so that
# pip builds it away from the checkout (no build/ left here, no stale build/lib, no native .so)
KLOOP_SOURCES = ("pyproject.toml", "README.md", "kloop", "serving", "trainer", "deploy")


def _kloop_source(dest: Path) -> Path:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so", "*.stamp", "*.tmp")
    for name in KLOOP_SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _torch_install(python: Path) -> list[str]:
    """``torch==2.13.0``, the CPU build: the local wheel where pip's find-links has it (as
    scripts/setup), else from the CPU wheel index ($KLOOP_TORCH_INDEX overrides it)."""
    local = subprocess.run([str(python), *PIP, "install", "--dry-run", "--no-index", "--no-deps",
                            COINSTALL_TORCH], check=False, capture_output=True, timeout=300)
    if local.returncode == 0:
        return [COINSTALL_TORCH]
    index = os.environ.get("KLOOP_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
    return ["--index-url", index, "--extra-index-url", "https://pypi.org/simple", COINSTALL_TORCH]


def coinstall_spec() -> dict[str, object]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {"kloop": {"dependencies": project["dependencies"],
                      "requires-python": project["requires-python"]},
            "torch": COINSTALL_TORCH, "neighbours": list(COINSTALL_NEIGHBOURS)}


@pytest.fixture(scope="session")
def coinstall_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The co-install venv's python (``$KLOOP_COINSTALL_VENV``, default
    ``~/.cache/kloop/coinstall-venv``), with this checkout's kloop in it.

    Built on first use and whenever ``coinstall_spec()`` changes: torch first, then kloop,
    kserve and tritonclient[all] by one ``pip install``. A venv built earlier gets this
    checkout's kloop reinstalled (``--no-deps``: its dependencies are in the key), so the code
    under test is always the current one."""
    venv = Path(os.environ.get("KLOOP_COINSTALL_VENV", CACHE / "coinstall-venv"))
    python = venv / "bin" / "python"
    source = _kloop_source(tmp_path_factory.mktemp("kloop-sdist") / "kloop")
    spec = coinstall_spec()

    def installs() -> Iterator[list[str]]:  # run only when (re)building, inside the new venv
        yield _torch_install(python)
        yield [str(source), *COINSTALL_NEIGHBOURS]  # the one resolver call

    python, fresh = cached_venv(venv, spec, installs(),
                                what="kloop + " + " + ".join(COINSTALL_NEIGHBOURS))
    if not fresh:
        run_or_unavailable([python, *PIP, "install", "--quiet", "--no-deps", "--force-reinstall",
                            "--no-build-isolation", source], f"reinstall kloop into {venv}")
    return python


@pytest.fixture(scope="session")
def coinstall_server(coinstall_python: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """``python -m serving`` from the co-install venv (not kloop's dev venv).

    As deploy.local.server_process.ServerProcess does, but with that venv's python and ``-I`` in a
    neutral directory, so the installed kloop runs, not this checkout. Ready = the ports file."""
    root = tmp_path_factory.mktemp("coinstall-registry")
    publish_all(root, tmp_path_factory.mktemp("coinstall-export"))
    home = tmp_path_factory.mktemp("coinstall-home")
    token = ensure_token(home)
    ports_file = home / SERVER_FILE
    cmd = [str(coinstall_python), "-I", "-m", "serving", "--registry", str(root),
           "--http-port", "0", "--grpc-port", "0", "--ports-file", str(ports_file)]
    log_file = home / "server.log"
    children = Processes(grace_s=20.0)
    proc = children.spawn(cmd, cwd=home, log=log_file, env={**os.environ, TOKEN_ENV: token})
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the co-install server exited with {proc.returncode}:\n"
                            f"{log_file.read_text(errors='replace')[-3000:]}")
            try:
                ports = json.loads(ports_file.read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                assert time.monotonic() < deadline, f"not ready after 120 s; see {log_file}"
                time.sleep(0.05)  # polling the ports file: the server writes it once ready
        yield ServerHandle.from_ports(ports, token)
    finally:
        children.close()
