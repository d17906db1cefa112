"""The side-by-side benchmark (``python -m loadtests.benchmark``): kloop's graph measured in
process as the server loads it, and a real smoke run of the whole command (kloop and the trivial
gRPC server through the shared harness's own ``bench.py``, wrk and ``grpc_load.py``). The report's
verdicts on known figures are unit tests (tests/unit/loadtests/test_benchmark_report.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.benchmark import report
from loadtests.benchmark.harness import HarnessMissing, peers_dir
from tests.support.paths import REPO


def test_kloop_graph_in_process_is_measured_as_the_server_loads_it(tmp_path: Path) -> None:
    try:
        peers_dir()
    except HarnessMissing as e:
        pytest.skip(str(e))
    from loadtests.benchmark import models

    models.publish(tmp_path / "registry", ("tiny",))
    code = ("import json, sys; from pathlib import Path; from loadtests.benchmark import inprocess;"
            " print(json.dumps(inprocess.measure(Path(sys.argv[1]), 0.05, ('tiny',))))")
    # its own process: it sets torch's thread count, as the benchmark's subprocess does
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "registry")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(done.stdout)
    cells = [(r["model"], r["batch"], r["threads"]) for r in got]
    assert cells == [("tiny", 1, 2), ("tiny", 32, 2)]
    for r in got:
        assert r["graph"] in ("trace", "onednn")  # what "auto" chose, as the server would
        assert r["items_per_s"] > 0 and r["p50_ms"] > 0


def test_the_benchmark_command_runs_end_to_end(clients_python: Path, tmp_path: Path) -> None:
    try:
        peers_dir()
    except HarnessMissing as e:
        pytest.skip(str(e))
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.benchmark", "--quick", "--rounds", "2", "--harness-python",
         str(clients_python), "--scratch", str(tmp_path / "scratch"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = report.load_runs(out / "runs.jsonl")
    cells = {(r["peer"], r["proto"], r["conc"]): r for r in runs}
    for key in (("kloop", "grpc", 8), ("kloop", "http", 8), ("null_grpc", "grpc", 32),
                ("null_grpc_nginx", "grpc", 32)):
        assert key in cells, sorted(cells)
        assert cells[key].get("errors") == 0 and cells[key]["rps"] > 0, json.dumps(cells[key])
        assert len(cells[key]["rps_rounds"]) == 2  # measured in each round
    text = (out / "report.md").read_text()
    assert "| kloop, 1 process | grpc | 8 |" in text
