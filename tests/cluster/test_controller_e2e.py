"""The controller end to end: ``python -m deploy.cli controller`` as a REAL PROCESS against the
real kube-apiserver, with real clocks, real model servers and real requests.

Nothing here calls ``tick`` or the reconciler in-process. The test only plays the parts of the
cluster that do not exist here:

* KServe: for every InferenceService the controller creates, it writes the status KServe would
  (Ready/PredictorReady, modelStatus Loaded, ``address.url``), pointing at a real
  ``python -m serving --model-dir <registry>/digits/<version>`` server started once per version;
* the Gateway: a loop sends real OIP v2 HTTP requests to each version's server in proportion
  to the backendRef weights of the kloop-owned HTTPRoute, re-reading the route as it changes.

The controller scrapes those servers' /metrics (``--metrics scrape``), judges each step,
writes routes and the Rollout's status, moves the champion alias in the shared registry
directory, and records Events. Scenarios: a promotion (10 -> 50 -> 100), a rollback on injected
5xx, a SIGKILL mid-rollout resumed by a new process, and two replicas behind one Lease.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest

from deploy.cluster import kube as k
from deploy.cluster.cr_store import ROLLOUT, CRRolloutStore, rollout_from_cr
from deploy.cluster.kserve_manifests import isvc_name
from deploy.rollout import Phase, Rollout, RolloutPolicy, new_rollout
from kloop.artifact import Registry
from kloop.faults import Fault
from serving.client import AdminClient
from tests.support.processes import Processes
from tests.support.serving import MODEL, TOKEN, ModelDirServer, publish_version

ISVC, HTTP_ROUTE, LEASE = k.KINDS["InferenceService"], k.KINDS["HTTPRoute"], k.KINDS["Lease"]
LEASE_NAME = "kloop-controller"
NOW = "2026-01-01T00:00:00Z"
# Fast, but every step is still judged on real traffic: >= 10 candidate requests and >= 1 s.
# Latency is not what these scenarios test (2 shared cores make p99 noisy): a wide p99 slack.
POLICY = RolloutPolicy.from_dict(dict(
    steps=(10, 50, 100), min_requests=10, min_duration_s=1.0, step_timeout_s=60.0,
    failure_limit=1, retire_after_s=0.0, ready_timeout_s=60.0, p99_slack_ms=2000.0))
# What only the acting replica may send (reads, watches and the Lease are everyone's).
WRITE = re.compile(r'"(PUT|POST|PATCH|DELETE) /(apis/(kloop\.dev|serving\.kserve\.io|'
                   r'gateway\.networking\.k8s\.io|autoscaling)/|api/v1/namespaces/[^/]+/events)')
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             diagnose: Callable[[], str] = lambda: "") -> T:
    """Poll ``probe`` until it returns something truthy; no fixed sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{diagnose()}")
        time.sleep(0.1)


# ---- module setup: a registry and one real server per version ------------------------------


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    work = tmp_path_factory.mktemp("export")
    reg = Registry(root)
    for seed in (1, 2, 3):  # accuracy 0.51, 0.52, 0.53: every candidate passes the gate
        publish_version(reg, seed, work)
    return root


@pytest.fixture(scope="module")
def servers(registry_root, tmp_path_factory) -> Iterator[dict[str, str]]:
    """version -> URL of a real ``python -m serving --model-dir`` (the kloop runtime), with an
    admin token so faults can be injected. Started in parallel."""
    procs = {v: ModelDirServer(registry_root / MODEL / v, tmp_path_factory.mktemp(f"srv{v}"),
                               {"KLOOP_MODEL_NAME": MODEL, "KLOOP_MODEL_VERSION": v,
                                "KLOOP_ADMIN_TOKEN": TOKEN})
             for v in ("1", "2", "3")}
    try:
        with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
            urls = dict(zip(procs, pool.map(lambda p: p.start(), procs.values()), strict=True))
        yield urls
    finally:
        for p in procs.values():
            p.stop()


# ---- the parts of the cluster that are not here ---------------------------------------------


class Loop(threading.Thread):
    """A daemon thread running ``body`` until stopped; the first exception is kept."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self.body()
                except k.KubeError:  # an API hiccup: the next round reads again
                    self.stopping.wait(0.1)
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def body(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        if self.error is not None:
            raise AssertionError(f"{self.name} failed") from self.error


class KServe(Loop):
    """Plays the KServe controller: every kloop InferenceService becomes Ready for its
    generation, its address the real server of its version."""

    def __init__(self, kube: k.Kube, namespace: str, urls: dict[str, str]) -> None:
        super().__init__("play-kserve")
        self.kube, self.ns, self.urls = kube, namespace, urls
        self.served: list[str] = []  # versions made ready, in order
        self.failing: dict[str, str] = {}  # version -> why its model fails to load

    def body(self) -> None:
        items = self.kube.list(ISVC, self.ns, label_selector="app.kubernetes.io/managed-by=kloop")
        for isvc in items.get("items", []):
            meta = isvc["metadata"]
            version = meta.get("labels", {}).get("kloop.dev/version")
            status = isvc.get("status") or {}
            url = self.urls.get(version or "")
            if version in self.failing:
                if (status.get("modelStatus") or {}).get("transitionStatus") != "BlockedByFailedLoad":
                    self._fail(meta, self.failing[version])
                continue
            if url is None or (status.get("observedGeneration") == meta["generation"]
                               and (status.get("address") or {}).get("url") == url):
                continue
            status = {
                "observedGeneration": meta["generation"], "deploymentMode": "Standard",
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": NOW}
                               for t in ("PredictorReady", "Ready")],
                "modelStatus": {"transitionStatus": "UpToDate",
                                "states": {"activeModelState": "Loaded",
                                           "targetModelState": "Loaded"}},
                "address": {"url": url}, "url": url,
            }
            try:
                self.kube.patch(ISVC, meta["name"], {"status": status}, self.ns, status=True)
            except k.NotFound:
                continue  # deleted since the list (a rollback, a retire)
            self.served.append(version)
        self.stopping.wait(0.1)


    def _fail(self, meta: dict[str, Any], why: str) -> None:
        """What KServe writes for a predictor whose model cannot load."""
        status = {
            "observedGeneration": meta["generation"], "deploymentMode": "Standard",
            "conditions": [{"type": t, "status": "False", "reason": "ModelLoadFailed",
                            "message": why, "lastTransitionTime": NOW}
                           for t in ("PredictorReady", "Ready")],
            "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                            "states": {"activeModelState": "FailedToLoad",
                                       "targetModelState": "FailedToLoad"},
                            "lastFailureInfo": {"reason": "ModelLoadFailed", "message": why}},
        }
        with contextlib.suppress(k.NotFound):
            self.kube.patch(ISVC, meta["name"], {"status": status}, self.ns, status=True)


def route_weights(kube: k.Kube, namespace: str) -> dict[str, int]:
    try:
        route = kube.get(HTTP_ROUTE, MODEL, namespace)
    except k.NotFound:
        return {}
    prefix = isvc_name(MODEL, "")
    return {ref["name"].removeprefix(prefix).removesuffix("-predictor"): int(ref.get("weight", 1))
            for rule in route["spec"]["rules"] for ref in rule["backendRefs"]}


class Gateway(Loop):
    """Plays the Gateway: real requests to each version's server in proportion to the
    HTTPRoute's weights (smooth weighted round robin), the route re-read every batch."""

    BATCH = 10
    BODY = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": [0.5] * 64}]}).encode()

    def __init__(self, kube: k.Kube, namespace: str, urls: dict[str, str]) -> None:
        super().__init__("play-gateway")
        self.kube, self.ns, self.urls = kube, namespace, urls
        self.routes: list[dict[str, int]] = []  # distinct consecutive route states seen
        self.answers: dict[str, collections.Counter[int]] = collections.defaultdict(
            collections.Counter)  # version -> HTTP status -> count
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self._credit: dict[str, float] = {}

    def body(self) -> None:
        weights = route_weights(self.kube, self.ns)
        if weights and (not self.routes or self.routes[-1] != weights):
            self.routes.append(weights)
            self._credit = {}
        live = {v: w for v, w in weights.items() if w > 0}
        for _ in range(self.BATCH if live else 0):
            for v, w in live.items():
                self._credit[v] = self._credit.get(v, 0.0) + w
            v = max(live, key=lambda x: self._credit[x])
            self._credit[v] -= sum(live.values())
            self.answers[v][self._infer(v)] += 1
        self.stopping.wait(0.05)

    def _infer(self, version: str) -> int:
        for attempt in (1, 2):
            conn = self._conns.get(version)
            if conn is None:
                conn = self._conns[version] = http.client.HTTPConnection(
                    urlsplit(self.urls[version]).netloc, timeout=10)
            try:
                conn.request("POST", f"/v2/models/{MODEL}/infer", self.BODY,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                del self._conns[version]
                if attempt == 2:
                    raise
                continue
            if resp.status == 200:
                assert str(json.loads(body)["model_version"]) == version
            return resp.status
        raise AssertionError("unreachable")

    def served(self, version: str, status: int = 200) -> int:
        return self.answers[version][status]

    def stop(self) -> None:
        try:
            super().stop()
        finally:  # the keep-alive connections, once the thread that used them is done
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()


class Controller:
    """``python -m deploy.cli controller`` as a child process, logging to a file."""

    def __init__(self, processes: Processes, kubeconfig: Path, namespace: str, registry: Path,
                 identity: str, log_dir: Path, *, debug: bool = False,
                 lease_s: float = 3.0) -> None:
        self.processes = processes
        self.identity = identity
        self.log = log_dir / f"controller-{identity}.log"
        self.cmd = [sys.executable, "-m", "deploy.cli", "controller", "--kubeconfig", str(kubeconfig),
                    "-n", namespace, "--lease-namespace", namespace, "--lease-name", LEASE_NAME,
                    "--registry", str(registry), "--metrics", "scrape", "--identity", identity,
                    "--lease-duration", str(lease_s), "--renew", "0.5", "--interval", "0.5",
                    "--log-level", "DEBUG" if debug else "INFO"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Controller:
        self.proc = self.processes.spawn(self.cmd, log=self.log,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def leading(self) -> bool:
        return "leading: reconciling" in self.text()

    def signal(self, sig: int) -> int:
        assert self.proc is not None and self.proc.poll() is None, \
            f"{self.identity} is not running:\n{self.text()[-3000:]}"
        self.proc.send_signal(sig)
        return self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None:
            self.processes.stop(self.proc, grace_s=15)


class World:
    """One scenario's namespace: KServe and the Gateway played, controllers started on demand,
    the Rollout's status observed (every resourceVersion the test saw)."""

    def __init__(self, cluster, namespace: str, registry_root: Path, urls: dict[str, str],
                 log_dir: Path, processes: Processes) -> None:
        self.cluster, self.ns, self.registry_root, self.log_dir = (
            cluster, namespace, registry_root, log_dir)
        self.processes = processes
        self.kube = k.Kube.connect(k.KubeConfig(kubeconfig=cluster.kubeconfig, namespace=namespace))
        self.store = CRRolloutStore(self.kube, namespace)
        self.registry = Registry(registry_root)
        self.kserve = KServe(k.Kube.connect(k.KubeConfig(kubeconfig=cluster.kubeconfig)),
                             namespace, urls)
        self.gateway = Gateway(k.Kube.connect(k.KubeConfig(kubeconfig=cluster.kubeconfig)),
                               namespace, urls)
        self.controllers: list[Controller] = []
        self.observed: list[dict[str, Any]] = []  # the Rollout's status, per resourceVersion

    def controller(self, identity: str, *, debug: bool = False,
                   lease_s: float = 3.0) -> Controller:
        c = Controller(self.processes, self.cluster.kubeconfig, self.ns, self.registry_root,
                       identity, self.log_dir, debug=debug, lease_s=lease_s)
        self.controllers.append(c)
        return c.start()

    def create(self, name: str, candidate: str, champion: str) -> None:
        self.registry.set_alias(MODEL, "champion", int(champion))  # what the last rollout left
        self.store.create(new_rollout(name, MODEL, int(candidate), int(champion), POLICY,
                                      time.time()))

    def rollout(self, name: str) -> Rollout:
        obj = self.store.get_object(name)
        rv = obj["metadata"]["resourceVersion"]
        if not self.observed or self.observed[-1]["rv"] != rv:
            self.observed.append({"rv": rv, **(obj.get("status") or {})})
        return rollout_from_cr(obj)

    def wait(self, name: str, what: str, ok: Callable[[Rollout], bool],
             timeout: float = 40.0) -> Rollout:
        def probe() -> Rollout | None:
            r = self.rollout(name)
            return r if ok(r) else None

        return wait_for(what, probe, timeout, lambda: self.diagnose(name))

    def holder(self) -> str | None:
        try:
            return self.kube.get(LEASE, LEASE_NAME, self.ns)["spec"].get("holderIdentity")
        except k.NotFound:
            return None

    def exists(self, version: str) -> bool:
        try:
            self.kube.get(ISVC, isvc_name(MODEL, version), self.ns)
            return True
        except k.NotFound:
            return False

    def events(self, name: str) -> list[dict[str, Any]]:
        obj = self.store.get_object(name)
        obj.update(apiVersion=ROLLOUT.api_version, kind=ROLLOUT.kind)
        return self.kube.events_for(obj)

    def diagnose(self, name: str) -> str:
        try:
            r = self.store.get(name)
            lines = [f"phase {r.phase.value} step {r.step} weights {dict(r.weights)} "
                     f"reason {r.reason!r}"] + [f"  {e.kind_name} [{e.verdict}] {e.message}"
                                                for e in r.history]
        except Exception as e:  # noqa: BLE001 - diagnostics only
            lines = [f"rollout unreadable: {e}"]
        lines.append(f"routes seen: {self.gateway.routes}; answers: {dict(self.gateway.answers)}")
        for c in self.controllers:
            lines.append(f"--- {c.identity} (rc {c.proc.poll() if c.proc else None}) ---")
            lines.append("\n".join(ln for ln in c.text().splitlines()[-40:]
                                   if "urllib3" not in ln and "kubernetes" not in ln))
        return "\n".join(lines)

    def close(self) -> None:
        try:
            for c in self.controllers:
                c.stop()
            self.gateway.stop()
            self.kserve.stop()
        finally:
            for kube in (self.kube, self.kserve.kube, self.gateway.kube):
                kube.close()


@pytest.fixture
def world(cluster, namespace, registry_root, servers, tmp_path, processes) -> Iterator[World]:
    w = World(cluster, namespace, registry_root, servers, tmp_path, processes)
    w.kserve.start()
    w.gateway.start()
    try:
        yield w
    finally:
        w.close()


# ---- checks shared by the scenarios ---------------------------------------------------------


def assert_promoted_once(w: World, r: Rollout, champion: str = "1", candidate: str = "2", *,
                         lost_events: bool = False) -> None:
    """Succeeded, and every step applied exactly once with a passed analysis between steps.
    ``lost_events``: a SIGKILL may land between a status write and its Event (Events are
    best effort, written after the status), so one Event may be missing, never duplicated."""
    assert r.phase is Phase.SUCCEEDED, w.diagnose(r.id)
    steps = [e for e in r.history if e.kind_name == "set_weights"]
    assert [e.weights.get(int(candidate)) for e in steps] == [10, 50, 100], w.diagnose(r.id)
    for e in steps[1:]:  # each later step was earned by the previous step's analysis
        assert (e.verdict and e.verdict.value) == "successful" and "passed" in e.message, e
    kinds = [e.kind_name for e in r.history]
    assert kinds.count("promote") == 1 and kinds.count("retire") == 1 and kinds[-2:] == [
        "promote", "retire"], kinds
    assert "rollback" not in kinds and "abort" not in kinds and "error" not in kinds, kinds
    assert r.weights == {int(candidate): 100}
    assert w.registry.alias(MODEL, "champion") == int(candidate)  # moved in the shared registry
    assert not w.exists(champion) and w.exists(candidate)  # the old champion retired
    # The Gateway saw each step once, in order, never going back (nothing applied twice).
    want = [{champion: 100 - p, candidate: p} for p in (10, 50, 100)] + [{candidate: 100}]
    assert wait_for("the retired champion to leave the route",
                    lambda: w.gateway.routes if w.gateway.routes[-1:] == want[-1:] else None,
                    5) == want
    assert w.gateway.served(candidate) >= 3 * POLICY.analysis.min_requests
    steps_seen = [s.get("step") for s in w.observed if s.get("step") is not None]
    assert steps_seen == sorted(steps_seen), steps_seen  # status step never went back
    reasons = collections.Counter(e["reason"] for e in w.events(r.id))
    assert reasons["Promote"] == 1 and reasons["Retire"] == 1, reasons
    if lost_events:
        assert reasons["SetWeights"] in (2, 3) and reasons["RunGate"] <= 1, reasons
    else:
        assert reasons["SetWeights"] == 3 and reasons["RunGate"] == 1, reasons


# ---- the scenarios --------------------------------------------------------------------------


def test_rollout_steps_10_50_100_and_promotes(world):
    w = world
    ctl = w.controller("ctl-1")
    w.create("digits-v2", candidate="2", champion="1")
    r = w.wait("digits-v2", "Succeeded", lambda r: r.phase.terminal)
    assert_promoted_once(w, r)
    assert set(w.kserve.served) == {"1", "2"}  # both versions deployed by the controller
    assert r.gate is not None and r.gate.verdict.value == "successful"
    promote = next(e for e in r.history if e.kind_name == "promote")
    assert promote.message.startswith("step 3/3 (100%) passed"), promote
    events = w.events("digits-v2")
    assert all(e["source"]["component"] == "kloop-controller" for e in events)
    assert all(e["type"] == "Normal" for e in events), events
    assert w.holder() == "ctl-1"
    assert ctl.signal(signal.SIGTERM) == 0
    assert w.holder() is None  # released on SIGTERM


def test_injected_5xx_rolls_back_and_deletes_the_candidate(world, servers):
    w = world
    admin = AdminClient(servers["3"], TOKEN)
    admin.set_fault(MODEL, 3, Fault(error_rate=1.0))  # every request to v3 answers 500
    try:
        w.controller("ctl-1")
        w.create("digits-v3", candidate="3", champion="2")
        r = w.wait("digits-v3", "RolledBack", lambda r: r.phase.terminal)
    finally:
        admin.clear_fault(MODEL, 3)
    assert r.phase is Phase.ROLLED_BACK, w.diagnose(r.id)
    assert "step 1/3 (10%) failed" in r.reason and "error rate 1.0000" in r.reason, r.reason
    assert [e.weights.get(3) for e in r.history if e.kind_name == "set_weights"] == [10]
    assert w.gateway.served("3", 500) >= POLICY.analysis.min_requests and w.gateway.served("3") == 0
    assert not w.exists("3") and w.exists("2")  # the candidate's InferenceService deleted
    assert route_weights(w.kube, w.ns) == {"2": 100} and r.weights == {2: 100}
    assert w.registry.alias(MODEL, "champion") == 2  # unchanged
    wait_for("the Gateway to route only to the champion",
             lambda: w.gateway.routes[-1] == {"2": 100}, 5)
    assert w.gateway.routes == [{"2": 90, "3": 10}, {"2": 100}]
    warnings = [e for e in w.events("digits-v3") if e["type"] == "Warning"]
    assert {e["reason"] for e in warnings} == {"Rollback"}, warnings


def test_sigkill_mid_rollout_resumes_at_the_same_step(world):
    w = world
    first = w.controller("ctl-a")
    w.create("digits-v2", candidate="2", champion="1")
    at_kill = w.wait("digits-v2", "the first step in the status",
                     lambda r: r.step >= 0 and r.phase is Phase.PROGRESSING)
    assert first.signal(signal.SIGKILL) == -signal.SIGKILL  # no release, no cleanup
    killed = w.rollout("digits-v2")  # what the dead controller left
    assert killed.step == at_kill.step == 0 and w.holder() == "ctl-a"
    assert killed.weights == {1: 90, 2: 10}

    second = w.controller("ctl-b")  # a new pod: a new identity, waits out the old Lease
    r = w.wait("digits-v2", "Succeeded after the restart", lambda r: r.phase.terminal, 60)
    assert second.leading() and w.holder() == "ctl-b"
    assert_promoted_once(w, r, lost_events=True)
    # Resumed, not restarted: the dead controller's history is kept as it was, the new one
    # appended after it, and the status step went 0 -> 1 -> 2 (never back to -1 or 0).
    assert [e.to_dict() for e in r.history[:len(killed.history)]] == \
        [e.to_dict() for e in killed.history]
    kill = next(i for i, s in enumerate(w.observed) if s["rv"] == killed.generation)
    after = [s["step"] for s in w.observed[kill:]]
    assert after[0] == 0 and set(after) == {0, 1, 2}, after


def test_two_replicas_only_the_lease_holder_acts(world):
    w = world
    # A long Lease: the standby must not take over by expiry on a slow machine, only on SIGTERM.
    replicas = {i: w.controller(i, debug=True, lease_s=8.0) for i in ("rep-1", "rep-2")}
    holder = wait_for("a Lease holder", lambda: w.holder() if w.holder() in replicas else None,
                      30, lambda: w.diagnose("digits-v2"))
    standby = next(i for i in replicas if i != holder)
    wait_for("the holder to lead", replicas[holder].leading, 20)
    w.create("digits-v2", candidate="2", champion="1")
    w.wait("digits-v2", "the first step", lambda r: r.step >= 0)
    assert w.holder() == holder and not replicas[standby].leading()

    # SIGTERM the holder (a pod deleted): it releases the Lease, the standby takes over at once.
    assert replicas[holder].signal(signal.SIGTERM) == 0
    assert "released lease" in replicas[holder].text()
    wait_for("the standby to take the Lease", lambda: w.holder() == standby, 10,
             lambda: w.diagnose("digits-v2"))
    r = w.wait("digits-v2", "Succeeded after the handover", lambda r: r.phase.terminal, 60)
    assert replicas[standby].leading()
    assert_promoted_once(w, r)
    lease = w.kube.get(LEASE, LEASE_NAME, w.ns)["spec"]
    assert lease["holderIdentity"] == standby and lease["leaseTransitions"] >= 1

    # Who wrote: every API write of each replica is in its log (urllib3 at DEBUG). The
    # standby wrote nothing before it led; the holder wrote while it led and nothing after
    # it released the Lease.
    def writes(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if WRITE.search(ln)]

    s_text = replicas[standby].text()
    before_lead, _, after_lead = s_text.partition("leading: reconciling")
    assert writes(before_lead) == [], writes(before_lead)[:5]
    assert any("/rollouts/digits-v2/status" in ln for ln in writes(after_lead))
    h_text = replicas[holder].text()
    h_led, _, h_after = h_text.partition("released lease")
    assert any("/rollouts/digits-v2/status" in ln for ln in writes(h_led))
    assert writes(h_after) == [], writes(h_after)
    assert h_led.index("leading: reconciling") < h_led.index("/rollouts/digits-v2/status")


def test_candidate_that_never_loads_fails_and_is_cleaned_up(world):
    """KServe reports FailedToLoad for the candidate: no traffic ever reaches it, the rollout
    ends RolledBack with KServe's reason, and its InferenceService is deleted."""
    w = world
    w.kserve.failing["3"] = "out of memory while loading the model"
    w.controller("ctl-1")
    w.create("digits-v3-broken", candidate="3", champion="2")
    r = w.wait("digits-v3-broken", "RolledBack", lambda r: r.phase.terminal)
    assert r.phase is Phase.ROLLED_BACK, w.diagnose(r.id)
    assert r.reason.startswith("candidate never became ready") and "out of memory" in r.reason
    assert not any(e.kind_name == "set_weights" for e in r.history)  # never got traffic
    assert w.gateway.served("3") == 0 and w.gateway.served("3", 500) == 0
    wait_for("the broken candidate's InferenceService to be deleted",
             lambda: not w.exists("3") or None, 10)
    assert w.exists("2") and w.registry.alias(MODEL, "champion") == 2
