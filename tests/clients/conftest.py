"""Standard OIP v2 clients against a real ``python -m serving`` process.

The clients cannot live in kloop's venv: tritonclient 2.73 and kserve 0.21 need protobuf < 7
(kserve 0.21 no longer imports under protobuf 7), while kloop's generated stubs need protobuf
>= 7.35. So they get a venv of their own (``$KLOOP_CLIENTS_VENV``, default
``~/.cache/kloop/clients-venv``), made here on first use with the pins below, and each client
family runs as a subprocess of that venv's python (which also keeps kserve's and tritonclient's
``inference.*`` protobuf symbols out of each other's way, see ../shared/ARCHITECTURE.md).

The server hosts one copy model per datatype (tests/serving/dtype_models.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.server_process import ServerHandle, ServerProcess
from tests.serving.dtype_models import publish_all

HERE = Path(__file__).resolve().parent
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
    be installed here."""
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
            pytest.skip(f"cannot install the OIP clients ({' '.join(CLIENT_REQUIREMENTS)}) into "
                        f"{venv}: {(done.stderr or done.stdout)[-800:]}")
    if not _works(python):
        pytest.skip(f"the OIP clients installed into {venv} do not import")
    return python


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("client-registry")
    publish_all(root, tmp_path_factory.mktemp("client-export"))
    home = tmp_path_factory.mktemp("client-home")
    with ServerProcess(root, home) as handle:
        yield handle


def run_client(python: Path, script: str, *args: str) -> list[dict[str, object]]:
    """Run a client script; fail with every failed check's traceback."""
    done = subprocess.run([str(python), str(HERE / script), *args], check=False, cwd=HERE,
                          text=True, capture_output=True, timeout=300)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    report = "\n".join(f"--- {r['check']}\n{r['error']}" for r in failed)
    assert done.returncode == 0 and results, (
        f"{script} {args[0]}: exit {done.returncode}, {len(failed)} of {len(results)} checks "
        f"failed\n{report}\nstderr:\n{done.stderr[-3000:]}"
    )
    return results
