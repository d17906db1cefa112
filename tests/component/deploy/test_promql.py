"""``PromQLMetrics`` against a REAL Prometheus (the Debian package, 2.42) scraping a REAL
``python -m serving`` process: after real requests, the samples PromQL returns must equal the
server's own /metrics for the same quantities, so analysis judges the same numbers whichever
source a cluster uses. ``ScrapeMetrics`` is checked against the same server.

Prometheus runs as our own subprocess (never the system service), scrape_interval 1s, on a
free loopback port; the test polls its API until the scrape caught up -- no fixed sleeps.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deploy.cluster.prometheus import PromQLMetrics, ScrapeMetrics, escape
from deploy.local.server_process import ServerHandle, ServerProcess
from deploy.rollout.samples import MetricsError, samples_for
from kloop.artifact import Registry
from kloop.faults import Fault
from serving.client import InferenceError
from tests.support.processes import Processes
from tests.support.serving import MODEL, infer, publish_version

PROMETHEUS = Path("/usr/bin/prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{what} not met after {timeout}s (last: {last})")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("registry")
    work = tmp_path_factory.mktemp("export")
    registry = Registry(root)
    publish_version(registry, 1, work)
    publish_version(registry, 2, work)
    proc = ServerProcess(root, tmp_path_factory.mktemp("home"))
    handle = proc.start()
    try:
        admin = handle.admin()
        admin.load(MODEL, 1)
        admin.set_traffic(MODEL, {1: 50, 2: 50})
        admin.set_fault(MODEL, 2, Fault(error_rate=0.3))  # real 500s from v2
        yield handle
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, server: ServerHandle) -> Iterator[str]:
    if not PROMETHEUS.is_file():
        pytest.skip(f"{PROMETHEUS} missing: install the Debian package "
                    "(apt-get install -y prometheus; the service need not run)")
    d = tmp_path_factory.mktemp("prometheus")
    target = server.http_url.removeprefix("http://")
    (d / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "kloop", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = Processes()  # the module's own: Prometheus lives as long as this module's tests
    try:
        procs.spawn([str(PROMETHEUS), f"--config.file={d / 'prometheus.yml'}",
                     f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                    log=d / "prometheus.log")
        wait_for(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200,
                 what="Prometheus ready")
        yield url
    finally:
        procs.close()
        shutil.rmtree(d / "data", ignore_errors=True)


def test_promql_samples_equal_the_servers_own_metrics(server, prometheus):
    images = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    answered = []
    for _ in range(60):
        try:
            answered += infer(server.http_url, MODEL, images)
        except InferenceError:  # the injected 500s: the server counts them, which is the point
            pass
    admin = server.admin()
    truth = samples_for(admin.metrics_text(), MODEL, [1, 2], at=0.0)
    assert truth[1].requests > 0 and truth[2].requests > 0 and truth[2].server_errors > 0
    promql = PromQLMetrics(prometheus)

    def caught_up():
        got = promql.samples(MODEL, {1: None, 2: None}, at=0.0)
        return got if got == truth else None

    got = wait_for(caught_up, what="Prometheus scraped the final counters")
    assert got[2].buckets[-1] == (float("inf"), truth[2].requests)
    assert ScrapeMetrics().samples(MODEL, {1: server.http_url, 2: server.http_url}, 0.0) == truth


def test_label_values_are_escaped_and_absent_series_are_zero(prometheus):
    weird = 'we"ird\\model\nname'
    assert escape(weird) == 'we\\"ird\\\\model\\nname'
    got = PromQLMetrics(prometheus, namespace="kloop").samples(weird, {1: None}, at=5.0)
    assert got[1].requests == 0 and got[1].buckets == () and got[1].at == 5.0


def test_prometheus_unreachable_is_metrics_error():
    with pytest.raises(MetricsError, match="GET http://127.0.0.1"):
        PromQLMetrics(f"http://127.0.0.1:{free_port()}", timeout=1).samples(MODEL, {1: None}, 0)
    with pytest.raises(MetricsError, match="no address"):
        ScrapeMetrics().samples(MODEL, {1: None}, 0)


def test_a_bad_query_is_metrics_error(prometheus):
    with pytest.raises(MetricsError, match="HTTP 400"):
        PromQLMetrics(prometheus).query("sum by (")
