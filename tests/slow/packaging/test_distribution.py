"""What ``pip install kloop`` puts on a machine: exactly the four import packages, each marked
typed (PEP 561), with the manifests and schemas beside the code, and no tests or tools."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.support.paths import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out), str(REPO)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.glob("kloop-*.whl")
    return zipfile.ZipFile(path)


def test_top_level_packages_are_exactly_kloops(wheel: zipfile.ZipFile) -> None:
    tops = {n.split("/", 1)[0] for n in wheel.namelist() if not n.startswith("kloop-")}
    assert tops == {"kloop", "serving", "trainer", "deploy"}


def test_every_package_is_marked_typed(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for package in ("kloop", "serving", "trainer", "deploy"):
        assert f"{package}/py.typed" in names, package
    assert "kloop/pb/inference_pb2.pyi" in names and "kloop/pb/inference_pb2_grpc.pyi" in names


def test_run_time_data_files_ship(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "deploy/k8s/crds/kloop.dev_rollouts.yaml" in names  # the manifests users apply
    assert not any(n.startswith(("tests/", "loadtests/", "proto/")) for n in names)
