"""A real kube-apiserver + etcd for the cluster tests (../shared/k8s), started once per session.

The session fixture builds the server if needed (a no-op when cached; CI builds it in a setup
step), starts it on loopback with a watchdog tied to this process, loads every CRD from
../shared/crds (through the toolkit's ``crd_fixup`` for this 1.20 server) plus kloop's own CRDs
from ``deploy/k8s/crds``, and waits until all are Established. Each test gets a fresh namespace.

Tests skip with the reason when ../shared/k8s is absent or the server binary is not built and
KLOOP_K8S_BUILD=0; in CI the shared folder is present and the server must start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploy.cluster.kube import Kube, KubeConfig
from tests.support.crds import REPO, shared_dir

KLOOP_CRDS = REPO / "deploy" / "k8s" / "crds"


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    run_dir: Path

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def _k8s_dir() -> Path:
    return shared_dir() / "k8s"


def _binary() -> Path:
    cache = Path(os.environ.get("KLOOP_K8S_CACHE", Path.home() / ".cache" / "kloop-k8s"))
    return Path(os.environ.get("KLOOP_K8S_APISERVER", cache / "bin" / "kube-apiserver"))


def _start(k8s: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """apiserver.sh start; its run dir and kubeconfig. A second try, in a fresh dir, when the
    first fails: once in CI the server exited within 2 s of its start leaving an empty log, and
    an immediate restart came up. Both attempts' output are in the error when neither does."""
    failures = []
    for _ in range(2):
        run_dir = tmp_path_factory.mktemp("apiserver") / "run"
        out = subprocess.run(
            [str(k8s / "apiserver.sh"), "start", "--dir", str(run_dir), "--owner-pid",
             str(os.getpid())], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            return run_dir, Path(out.stdout.strip().splitlines()[-1])
        failures.append(f"exit {out.returncode} ({run_dir}):\n{out.stderr[-3000:]}")
    raise RuntimeError("apiserver.sh start failed twice:\n" + "\n".join(failures))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    k8s = _k8s_dir()
    if not (k8s / "apiserver.sh").is_file():
        pytest.skip(f"no kube-apiserver toolkit at {k8s} (set KLOOP_SHARED)")
    if not _binary().is_file():
        if os.environ.get("KLOOP_K8S_BUILD", "1") == "0":
            pytest.skip(f"kube-apiserver not built ({_binary()}) and KLOOP_K8S_BUILD=0")
        subprocess.run([str(k8s / "build-kube-apiserver.sh")], check=True)
    run_dir, kubeconfig = _start(k8s, tmp_path_factory)
    failed = False
    try:
        c = Cluster(kubeconfig=kubeconfig, run_dir=run_dir)
        _load_crds(c)
        yield c
    except BaseException:
        failed = True
        raise
    finally:
        stop = [str(k8s / "apiserver.sh"), "stop", "--dir", str(run_dir)]
        if failed or os.environ.get("CI"):
            stop.append("--keep-logs")
        subprocess.run(stop, check=False, capture_output=True)


def _load_crds(c: Cluster) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    sys.path.insert(0, str(_k8s_dir()))
    import crd_fixup  # the toolkit's own: rewrites modern CRDs for the 1.20 server

    api = client.ApiextensionsV1Api(c.api_client())
    docs: list[dict] = []
    for f in sorted((shared_dir() / "crds").glob("*.yaml")):
        fixed, _report = crd_fixup.load_fixed(str(f))
        docs.extend(fixed)
    for f in sorted(KLOOP_CRDS.glob("*.yaml")) if KLOOP_CRDS.is_dir() else []:
        docs.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    names = []
    for doc in docs:
        try:
            api.create_custom_resource_definition(doc)
        except ApiException as e:
            if e.status != 409:
                raise
        names.append(doc["metadata"]["name"])
    deadline = time.monotonic() + 60
    for name in names:
        while True:
            crd = api.read_custom_resource_definition(name)
            conds = {x.type: x.status for x in (crd.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established: {conds}")
            time.sleep(0.1)


@pytest.fixture
def namespace(cluster: Cluster) -> str:
    """A fresh namespace per test (deletion never finishes without a namespace controller,
    so names are never reused)."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    client.CoreV1Api(cluster.api_client()).create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture
def kube(cluster: Cluster, namespace: str) -> Iterator[Kube]:
    """kloop's client, defaulting to the test's namespace; its connections closed after."""
    with Kube.connect(KubeConfig(kubeconfig=cluster.kubeconfig, namespace=namespace)) as client:
        yield client


@pytest.fixture
def admin(cluster: Cluster) -> Iterator[Kube]:
    """kloop's client with the cluster admin's kubeconfig and no namespace of its own."""
    with Kube.connect(KubeConfig(kubeconfig=cluster.kubeconfig)) as client:
        yield client
