"""kloop's stubs run, without a warning, at both ends of the protobuf/grpcio range it declares.

The range's floor is what the pinned generator writes (proto/generate.py, docs/architecture.md
"OIP v2 stubs"): gencode 6.30.0 refuses any older protobuf, GRPC_GENERATED_VERSION any older
grpcio. So pyproject's floors must be exactly those versions (checked here from the files), a
fresh venv with exactly the floor must run the stubs (``floor_python``, slow the first time),
and so must the dev venv, which has the newest releases.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.support.paths import REPO
from tests.support.venvs import CACHE, cached_venv

STUBS = REPO / "kloop" / "pb"
CHECK = REPO / "tests" / "support" / "scripts" / "stub_check.py"


def declared() -> dict[str, SpecifierSet]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name: r.specifier for r in reqs if r.name in ("protobuf", "grpcio")}


def floor(spec: SpecifierSet) -> str:
    (low,) = [s.version for s in spec if s.operator == ">="]
    return low


def gencode_version() -> tuple[int, int, int, str]:
    text = (STUBS / "inference_pb2.py").read_text()
    m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
                  r"(\d+),\s*(\d+),\s*(\d+),\s*'([^']*)'", text)
    assert m, "inference_pb2.py has no runtime version check: was it written by protoc >= 26?"
    return int(m[1]), int(m[2]), int(m[3]), m[4]


def grpc_generated_version() -> str:
    m = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$",
                  (STUBS / "inference_pb2_grpc.py").read_text(), re.M)
    assert m, "inference_pb2_grpc.py names no GRPC_GENERATED_VERSION"
    return m[1]


def generator_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kloop_proto_generate", REPO / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# protobuf's two Python implementations run the generated module differently (the pure-Python
# one also executes its ``if not _descriptor._USE_C_DESCRIPTORS`` block): both are checked.
IMPLEMENTATIONS = ("upb", "python")


def run_check(python: Path | str, implementation: str) -> dict[str, str]:
    """stub_check.py under ``python`` with warnings as errors, kloop from this checkout.

    Its stderr must be empty. gRPC's C core logs at ERROR only here: at its default it may
    print an INFO line when the check's server closes a connection (seen once in CI: "Got
    goaway ... Cancelling all calls", grpcio 1.85), which is gRPC's shutdown, not the stubs."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "error",
           "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": implementation, "GRPC_VERBOSITY": "ERROR"}
    done = subprocess.run([str(python), "-W", "error", str(CHECK)], check=False, cwd=CHECK.parent,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr.strip(), (
        f"kloop's stubs failed under {python} (exit {done.returncode}):\n"
        f"{done.stderr[-3000:]}{done.stdout[-1000:]}")
    versions: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    assert versions["protobuf_implementation"] == implementation
    return versions


def test_declared_floors_are_what_the_generator_writes() -> None:
    ranges = declared()
    major, minor, patch, suffix = gencode_version()
    gencode = f"{major}.{minor}.{patch}{suffix}"
    assert floor(ranges["protobuf"]) == gencode, (
        f"the stubs are gencode {gencode} (they refuse older protobuf); pyproject declares "
        f"protobuf{ranges['protobuf']}")
    # the gencode's major and the next one, which the runtime accepts without a word (see
    # docs/architecture.md); a later major is not promised, so it is not declared
    assert ranges["protobuf"].contains(f"{major + 1}.99.0")
    assert not ranges["protobuf"].contains(f"{major + 2}.0.0")
    generated = grpc_generated_version()
    assert floor(ranges["grpcio"]) == generated, (
        f"the gRPC stubs refuse grpcio older than {generated}; pyproject declares "
        f"grpcio{ranges['grpcio']}")
    pins = dict(p.split("==") for p in generator_module().GENERATOR)
    assert pins["grpcio-tools"] == generated, "the generator pin and the committed stubs disagree"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_newest_runtime_runs_the_stubs_without_a_warning(
        implementation: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The dev venv (the newest protobuf and grpcio, kept so by scripts/setup)."""
    versions = run_check(sys.executable, implementation)
    ranges = declared()
    assert versions["protobuf"] in ranges["protobuf"] and versions["grpcio"] in ranges["grpcio"]
    with capsys.disabled():
        print(f"\n[stubs on the dev venv] {versions}")


@pytest.fixture(scope="session")
def floor_python() -> Path:
    """A venv with exactly the declared floor of protobuf and grpcio (and nothing of kloop's
    other dependencies: the stubs need none), cached as ~/.cache/kloop/floor-venv."""
    ranges = declared()
    pins = [f"protobuf=={floor(ranges['protobuf'])}", f"grpcio=={floor(ranges['grpcio'])}"]
    python, _ = cached_venv(CACHE / "floor-venv", {"pins": pins},
                            [["--only-binary=:all:", *pins]], what=" and ".join(pins))
    return python


@pytest.mark.timeout(900)  # the first run builds the floor venv in the fixture's set-up
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_floor_runtime_runs_the_stubs_without_a_warning(
        floor_python: Path, implementation: str, capsys: pytest.CaptureFixture[str]) -> None:
    versions = run_check(floor_python, implementation)
    ranges = declared()
    assert versions["protobuf"] == floor(ranges["protobuf"])
    assert versions["grpcio"] == floor(ranges["grpcio"])
    with capsys.disabled():
        print(f"\n[stubs on the declared floor] {versions}")
