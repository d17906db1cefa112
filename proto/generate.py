"""Generate kloop's Python stubs for the Open Inference Protocol (``proto/inference.proto``) and
the control plane's API (``proto/control.proto``).

Why a script and not a plain ``protoc`` call:

*Names.* ``kserve`` and ``tritonclient`` register the same messages (``inference.ServerLiveRequest``,
...) in protobuf's default descriptor pool from differently named files, so a third copy under the
same names makes any process that imports two of them fail with ``duplicate symbol``. The wire only
needs field numbers and gRPC method paths, so this script:

1. compiles a copy of the proto whose package is ``kloop.inference`` (the messages register
   as ``kloop.inference.*`` from ``kloop/pb/inference.proto``: no clash);
2. rewrites the service name in the generated ``inference_pb2_grpc.py`` back to
   ``inference.GRPCInferenceService``, so the method paths on the wire stay
   ``/inference.GRPCInferenceService/ModelInfer`` etc., which Triton and KServe clients call.

*Versions.* The generated ``inference_pb2.py`` refuses any protobuf runtime older than the protoc
that wrote it, and ``inference_pb2_grpc.py`` any grpcio older than the grpcio-tools that wrote it.
So the generator is pinned to the floor of the ranges kloop declares (``GENERATOR``; the decision
is in docs/architecture.md, "OIP v2 stubs"), and it runs in an environment of its own that this
script creates and caches (``$KLOOP_PROTO_GENERATOR_VENV``, default
``~/.cache/kloop/proto-generator``; rebuilt when the pins change), so the dev venv keeps the newest
protobuf and grpcio. The ``.pyi`` type stubs are written by mypy-protobuf (``protoc-gen-mypy``,
``protoc-gen-mypy_grpc``) from the same environment, so the stubs type-check under
``mypy --strict``.

Usage::

    python proto/generate.py          # write kloop/pb/{inference,control}_pb2{.py,.pyi,_grpc.py,_grpc.pyi}
    python proto/generate.py --check  # exit 1 if kloop/pb is not what this script would write

Either needs pip to reach a package index the first time (to build the generator environment);
where it cannot, the script exits with code 3 and pip's error. The stubs it writes are committed.
"""

from __future__ import annotations

import argparse
import difflib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "proto" / "inference.proto"
OUT_DIR = REPO / "kloop" / "pb"
# The control plane's API has no peers' stubs to clash with: compiled as written (its package,
# kloop.control.v1, is its name on the wire).
CONTROL = REPO / "proto" / "control.proto"
GENERATED = tuple(f"{stem}{suffix}" for stem in ("inference", "control")
                  for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))

WIRE_PACKAGE = "inference"
KLOOP_PACKAGE = "kloop.inference"
SERVICE = "GRPCInferenceService"

# The generator's environment, every distribution pinned. grpcio-tools fixes what the stubs
# demand of the runtime: its bundled protoc (30.0 for 1.72.1) writes gencode 6.30.0, which needs
# protobuf >= 6.30.0, and its gRPC plugin writes GRPC_GENERATED_VERSION = its own version, which
# needs grpcio >= 1.72.1. Those are pyproject's floors (tests/packaging checks they agree).
# protobuf here is only the runtime the plugins run on (mypy-protobuf 5.1.0's own gencode is
# 6.32.1); it does not change what protoc writes.
GENERATOR = (
    "grpcio-tools==1.72.1",
    "grpcio==1.72.1",
    "protobuf==6.33.6",
    "setuptools==80.9.0",
    "mypy-protobuf==5.1.0",
    "types-protobuf==6.30.2.20250914",
)
GENERATOR_UNAVAILABLE = 3  # exit code: the generator environment cannot be built here
_MARKER = "kloop-generator.json"


class GeneratorUnavailable(Exception):
    """The pinned generator cannot be installed here (no index, no wheel, ...)."""


def generator_key() -> str:
    """What the generator environment is built from; a change rebuilds it."""
    spec = {"pins": list(GENERATOR), "python": list(sys.version_info[:2])}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def generator_venv() -> Path:
    default = Path.home() / ".cache" / "kloop" / "proto-generator"
    return Path(os.environ.get("KLOOP_PROTO_GENERATOR_VENV", default))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (other checkouts on this machine share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_generator() -> Path:
    """The generator environment's python, built (or rebuilt) on first use."""
    venv = generator_venv()
    python = venv / "bin" / "python"
    marker = venv / _MARKER
    key = generator_key()

    def current() -> bool:
        try:
            return bool(json.loads(marker.read_text()).get("key") == key and python.exists())
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    if current():
        return python
    with _locked(venv.with_name(venv.name + ".lock")):
        if current():  # built by another process while this one waited
            return python
        print(f"building the stub generator environment {venv} ({', '.join(GENERATOR)})",
              file=sys.stderr)
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", *GENERATOR],
        ]
        for cmd in steps:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise GeneratorUnavailable(
                    f"cannot build the stub generator environment {venv}: "
                    f"{' '.join(cmd[:4])} ... failed:\n{(done.stderr or done.stdout)[-1500:]}")
        marker.write_text(json.dumps({"key": key, "pins": list(GENERATOR)}, indent=1) + "\n")
    return python


def _rewrite_package(proto_text: str) -> str:
    line = f"package {WIRE_PACKAGE};"
    if proto_text.count(line) != 1:
        raise SystemExit(f"{SOURCE}: expected exactly one '{line}' line")
    return proto_text.replace(line, f"package {KLOOP_PACKAGE};")


def _fix_grpc_module(text: str) -> str:
    """Serve under the standard service name; import the messages from kloop.pb."""
    kloop_service = f"{KLOOP_PACKAGE}.{SERVICE}"
    if kloop_service not in text:
        raise SystemExit(f"generated gRPC module does not name {kloop_service!r}: protoc changed?")
    text = text.replace(kloop_service, f"{WIRE_PACKAGE}.{SERVICE}")
    # protoc writes ``from kloop.pb import inference_pb2 as kloop_dot_pb_dot_inference__pb2``
    # because the proto lives at kloop/pb/ under the include root; keep that import and refuse
    # anything else, so a change in protoc's habits is caught here rather than at import time.
    if "from kloop.pb import inference_pb2 as" not in text:
        raise SystemExit("generated gRPC module does not import 'from kloop.pb import inference_pb2'")
    return text


def generate(out_dir: Path) -> None:
    """Write the generated files into ``out_dir``."""
    python = ensure_generator()
    bin_dir = python.parent
    with tempfile.TemporaryDirectory(prefix="kloop-proto-") as tmp:
        root = Path(tmp) / "src"
        gen = Path(tmp) / "gen"
        (root / "kloop" / "pb").mkdir(parents=True)
        gen.mkdir()
        # The proto's path under the include root becomes its name in the descriptor pool:
        # "kloop/pb/inference.proto" cannot collide with kserve's or Triton's file names.
        (root / "kloop" / "pb" / "inference.proto").write_text(_rewrite_package(SOURCE.read_text()))
        (root / "kloop" / "pb" / "control.proto").write_text(CONTROL.read_text())
        # ``python -m grpc_tools.protoc`` adds grpcio-tools' well-known protos to the include path.
        cmd = [
            str(python), "-m", "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--mypy_out={gen}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_grpc_out={gen}",
            "kloop/pb/inference.proto",
            "kloop/pb/control.proto",
        ]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"protoc failed with exit code {done.returncode}:\n{done.stderr}")
        produced = gen / "kloop" / "pb"
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (produced / name).read_text()
            if name == "inference_pb2_grpc.py":
                text = _fix_grpc_module(text)
            elif name == "control_pb2_grpc.py" and "from kloop.pb import control_pb2 as" not in text:
                raise SystemExit("generated control gRPC module does not import "
                                 "'from kloop.pb import control_pb2'")
            (out_dir / name).write_text(text)


def check() -> int:
    """0 when kloop/pb holds exactly what ``generate`` writes; 1 with a diff otherwise."""
    with tempfile.TemporaryDirectory(prefix="kloop-proto-check-") as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir)
        stale = []
        for name in GENERATED:
            fresh = (fresh_dir / name).read_text()
            current_path = OUT_DIR / name
            current = current_path.read_text() if current_path.exists() else ""
            if fresh != current:
                stale.append(name)
                diff = difflib.unified_diff(
                    current.splitlines(keepends=True), fresh.splitlines(keepends=True),
                    fromfile=f"kloop/pb/{name}", tofile=f"regenerated/{name}", n=1,
                )
                sys.stderr.writelines(list(diff)[:40])
    if stale:
        print(
            f"kloop/pb is stale ({', '.join(stale)}): proto/inference.proto or the generator "
            "(or proto/control.proto) changed since the stubs were written. Run: "
            "python proto/generate.py",
            file=sys.stderr,
        )
        return 1
    print("kloop/pb is up to date with proto/inference.proto")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if kloop/pb is stale; write nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return check()
        generate(OUT_DIR)
    except GeneratorUnavailable as e:
        print(e, file=sys.stderr)
        return GENERATOR_UNAVAILABLE
    print(f"wrote {', '.join(GENERATED)} to {OUT_DIR.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
