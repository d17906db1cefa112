"""The load test against a real server: locust headless as a subprocess, both user classes,
against ``python -m serving`` serving a real exported digits model; the CSV must show HTTP and
gRPC requests and no failures."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from deploy.local.server_process import ServerProcess
from kloop.artifact import Registry
from tests.support.artifacts import publish_exported
from tests.support.paths import REPO

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"


def read_stats(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_locust_drives_http_and_grpc_without_failures(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    publish_exported(reg.root, "digits", seed=1, accuracy=0.9, tmp=tmp_path)
    out = tmp_path / "out"
    server = ServerProcess(reg.root, tmp_path / "home")
    handle = server.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
             "--host", handle.http_url, "--grpc-target", handle.grpc_target,
             "--scenario", "steady", "-u", "4", "-r", "4", "--run-time", "6s",
             "--csv", str(out / "steady"), "--html", str(out / "steady.html"),
             "--only-summary", "--loglevel", "INFO"],
            # Another directory than the repository: the locustfile must find its package itself.
            cwd=tmp_path, check=False, capture_output=True, text=True, timeout=60,
        )
    finally:
        server.stop()
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    stats = read_stats(out / "steady")
    grpc_row = stats[("grpc", "ModelInfer")]
    http_row = stats[("POST", "/v2/models/[model]/infer")]
    for row in (grpc_row, http_row):
        assert int(row["Request Count"]) > 0, log
        assert int(row["Failure Count"]) == 0, log
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    assert "served by version: grpc v1: " in proc.stderr and "http v1: " in proc.stderr, log
    assert (out / "steady.html").stat().st_size > 0
