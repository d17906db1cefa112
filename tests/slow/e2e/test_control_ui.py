"""The control plane's web UI in a real browser (Playwright + the system Chromium) against real
processes: ``kloop serve`` and the control plane on a temporary home.

A run started from the runs page's form is watched live (its train step running, then
succeeded; its curve and log filling in), and two rollouts held at their first step are
promoted and aborted with the rollout page's buttons. With ``KLOOP_SCREENSHOTS=1`` the pages
are saved to ``docs/screenshots/`` (CI leaves the docs alone).

Skipped when Playwright or Chromium is missing (Playwright cannot download its own browser
here: ``apt-get install chromium``, ``pip install playwright``), except under ``CI=true``,
where that is a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.control.client import CONTROL_FILE, CONTROL_TOKEN, ControlClient
from deploy.local.server_process import discover
from kloop.artifact import Registry
from tests.support.artifacts import publish_exported
from tests.support.paths import REPO
from tests.support.processes import Processes

SCREENSHOTS = REPO / "docs" / "screenshots"
# Held at the first step: without traffic the analysis is inconclusive and just waits, so
# only the buttons move these rollouts on.
HOLD = {"steps": [10, 50, 100], "min_duration_s": 3600, "min_requests": 1_000_000,
        "step_timeout_s": 7200, "retire_after_s": 0}
MODEL = "digits-ui"  # published here, not trained: the rollouts' model
TWO_OR_MORE = re.compile(r"^([2-9]|[1-9][0-9]+)$")
SECOND = {"task": "digits", "model_name": "digits-b", "epochs": 2, "seed": 1,  # to compare
          "nproc_per_node": 1}


def _chromium() -> str:
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install playwright)")
    chromium = shutil.which("chromium")
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    if missing:
        why = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    assert chromium is not None
    return chromium


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return value


def _control_record(home: Path, pid: int) -> dict[str, Any] | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        doc: dict[str, Any] = json.loads((home / CONTROL_FILE).read_text())
        if doc.get("pid") == pid:
            return doc
    return None


def _start_control(home: Path, processes: Processes, log: Path) -> tuple[str, str]:
    """The control plane as its own process: ``kloop up`` where the CLI has it, else the
    same service started through ``deploy.control.server.serve``."""
    if (REPO / "deploy" / "cli" / "up_cmd.py").exists():
        cmd = [sys.executable, "-m", "deploy.cli", "--home", str(home), "up", "--http-port", "0",
               "--grpc-port", "0"]
    else:
        cmd = [sys.executable, "-c",
               "import sys; from pathlib import Path; "
               "from deploy.control.server import ControlConfig, serve; "
               "from deploy.local.home import Home; "
               "serve(Home(Path(sys.argv[1])), ControlConfig(http_port=0, grpc_port=0))",
               str(home)]
    proc = processes.spawn(cmd, log=log, cwd=REPO)
    record = _wait_for(lambda: proc.poll() is None and _control_record(home, proc.pid)
                       or (proc.poll() is not None and {"dead": True}), 60,
                       f"the control plane did not start; see {log}")
    assert "dead" not in record, log.read_text()
    return str(record["http"]), (home / CONTROL_TOKEN).read_text().strip()


@contextlib.contextmanager
def _traffic(home: Path) -> Iterator[None]:
    """Live requests to MODEL on the home's server (gRPC and HTTP), while the block runs."""
    import numpy as np

    from deploy.local.traffic import LiveData, TrafficConfig, TrafficGenerator

    handle = discover(home)
    assert handle is not None
    images = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    cfg = TrafficConfig(model=MODEL, http_url=handle.http_url, grpc_target=handle.grpc_target,
                        rate_per_s=40)
    with TrafficGenerator(cfg, LiveData.labelled(images, [0] * 16)):
        yield


@pytest.fixture
def world(tmp_path: Path, processes: Processes) -> Iterator[dict[str, Any]]:
    """A control plane on a home with three versions of MODEL; ``serve()`` starts the model
    server on that home (the control plane finds it on its next round)."""
    home = tmp_path / "home"
    reg = Registry(home / "registry")
    for seed, accuracy in ((1, 0.90), (2, 0.91), (3, 0.92)):
        publish_exported(reg.root, MODEL, seed=seed, accuracy=accuracy, tmp=tmp_path)
    reg.set_alias(MODEL, "champion", 1)
    url, token = _start_control(home, processes, tmp_path / "control.log")

    def serve() -> None:
        log = tmp_path / "serve.log"
        processes.spawn([sys.executable, "-m", "deploy.cli", "--home", str(home), "serve",
                         "--http-port", "0", "--grpc-port", "0"], log=log, cwd=REPO)
        _wait_for(lambda: discover(home) is not None, 60, f"kloop serve did not start; {log}")

    yield {"home": home, "url": url, "token": token, "client": ControlClient(url, token),
           "serve": serve}


def test_control_ui_run_and_rollouts(world: dict[str, Any], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    url, client = world["url"], world["client"]
    shots = os.environ.get("KLOOP_SCREENSHOTS") == "1"
    if shots:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(30_000)

            # ---- the token box: kept in localStorage, sent as a header -----------------------
            page.goto(f"{url}/")
            page.fill("#token", world["token"])
            page.click("#token-save")
            expect(page.locator("#token-state")).to_have_attribute("data-set", "true")

            # ---- a run from the form, watched live -------------------------------------------
            form = page.locator("#new-run")
            form.locator('[name="task"]').fill("digits")
            form.locator('[name="epochs"]').fill("3")
            form.locator('[name="label"]').fill("from the browser")
            page.click("#new-run-submit")
            page.wait_for_url(f"{url}/runs/**")
            run_id = page.url.rsplit("/", 1)[1]
            second = client.create_run(SECOND, label="second")  # trains alongside: for compare
            train = page.locator('#steps [data-step="train"]')
            expect(train).to_have_attribute("data-status", "running", timeout=60_000)
            points_at_start = int(page.locator("#curve").get_attribute("data-points") or 0)
            expect(page.locator("#curve")).to_have_attribute("data-points", TWO_OR_MORE,
                                                             timeout=120_000)
            expect(train).to_have_attribute("data-status", "succeeded", timeout=120_000)
            expect(page.locator("#curve canvas")).to_have_count(1)
            assert points_at_start < 3  # it grew on this page, without a reload
            expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded",
                                                                   timeout=60_000)
            log = page.locator("#log")
            expect(log).to_contain_text("step train: succeeded")
            assert int(log.get_attribute("data-lines") or 0) >= 3
            assert log.inner_text().count("step train: running") == 1  # no line twice
            expect(page.locator('#steps [data-step="decide"]')).to_have_attribute(
                "data-status", "succeeded")
            if shots:
                page.screenshot(path=str(SCREENSHOTS / "control-run.png"), full_page=True)

            _wait_for(lambda: client.get_run(second["id"])["status"] != "running", 120,
                      "the second run did not finish")

            # ---- promote with the button --------------------------------------------------
            # The server starts only now: with one running, a run's first version waits in
            # its canary for traffic this test does not send.
            world["serve"]()
            first = client.create_rollout(MODEL, "2", policy=HOLD)
            page.goto(f"{url}/rollouts/{first['id']}")
            phase = page.locator("#phase")
            expect(phase).to_have_attribute("data-phase", "Progressing", timeout=60_000)
            expect(page.locator("#weights")).to_contain_text("v2 10 %")
            with _traffic(world["home"]):  # the per-version charts fill in from /series
                expect(page.locator("#rate-chart")).to_have_attribute(
                    "data-points", TWO_OR_MORE, timeout=30_000)
                expect(page.locator("#weights-chart canvas")).to_have_count(1)
                if shots:
                    page.screenshot(path=str(SCREENSHOTS / "control-rollout.png"), full_page=True)
            page.click("#promote")
            expect(phase).to_have_attribute("data-phase", "Succeeded", timeout=60_000)
            expect(page.locator("#history")).to_contain_text("promote")
            expect(page.locator("#promote")).to_be_disabled()

            # ---- abort with the button ----------------------------------------------------
            again = client.create_rollout(MODEL, "3", policy=HOLD)
            page.goto(f"{url}/rollouts/{again['id']}")
            expect(phase).to_have_attribute("data-phase", "Progressing", timeout=60_000)
            page.click("#abort")
            expect(phase).to_have_attribute("data-phase", "Aborted", timeout=60_000)
            assert client.get_rollout(again["id"])["phase"] == "Aborted"

            # ---- the other pages ----------------------------------------------------------
            page.goto(f"{url}/")
            expect(page.locator(f'#runs tr[data-run="{run_id}"]')).to_have_attribute(
                "data-status", "succeeded")
            expect(page.locator("#runs tbody tr")).to_have_count(2)
            if shots:
                page.screenshot(path=str(SCREENSHOTS / "control-runs.png"), full_page=True)

            page.goto(f"{url}/models")
            versions = page.locator(f'section[data-model="{MODEL}"] tr[data-version]')
            expect(versions).to_have_count(3)
            expect(page.locator(f'section[data-model="{MODEL}"] tr[data-version="2"]')).to_contain_text(
                first["id"])
            expect(page.locator('section[data-model="digits"] tr[data-version="1"] a').first
                   ).to_have_attribute("href", f"/runs/{run_id}")
            if shots:
                page.screenshot(path=str(SCREENSHOTS / "control-models.png"), full_page=True)

            page.goto(f"{url}/compare?ids={run_id},{second['id']}")
            expect(page.locator("#param-diff")).to_contain_text("spec.epochs")
            curves = page.locator(".compare-curve")
            expect(curves.first.locator("canvas")).to_have_count(1)
            expect(curves.first).to_have_attribute("data-points", TWO_OR_MORE)
            if shots:
                page.screenshot(path=str(SCREENSHOTS / "control-compare.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
