"""Generate kloop's Python stubs for the Open Inference Protocol from ``proto/inference.proto``.

Why a script and not a plain ``protoc`` call: ``kserve`` and ``tritonclient`` register the same
messages (``inference.ServerLiveRequest``, ...) in protobuf's default descriptor pool from
differently named files, so a third copy under the same names makes any process that imports
two of them fail with ``duplicate symbol``. The wire only needs field numbers and gRPC method
paths, so this script:

1. compiles a copy of the proto whose package is ``kloop.inference`` (the messages register
   as ``kloop.inference.*`` from ``kloop/pb/inference.proto``: no clash);
2. rewrites the service name in the generated ``inference_pb2_grpc.py`` back to
   ``inference.GRPCInferenceService``, so the method paths on the wire stay
   ``/inference.GRPCInferenceService/ModelInfer`` etc., which Triton and KServe clients call.

Usage::

    python proto/generate.py          # write kloop/pb/inference_pb2{.py,.pyi,_grpc.py}
    python proto/generate.py --check  # exit 1 if kloop/pb is not what this script would write

The generator (grpcio-tools) is a dev dependency; the stubs it writes are committed.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "proto" / "inference.proto"
OUT_DIR = REPO / "kloop" / "pb"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")

WIRE_PACKAGE = "inference"
KLOOP_PACKAGE = "kloop.inference"
SERVICE = "GRPCInferenceService"


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
    """Write the three generated files into ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # a dev dependency: say how to get it
        raise SystemExit("grpcio-tools is not installed: pip install 'kloop[dev]'") from e
    import importlib.resources

    with tempfile.TemporaryDirectory(prefix="kloop-proto-") as tmp:
        root = Path(tmp) / "src"
        gen = Path(tmp) / "gen"
        (root / "kloop" / "pb").mkdir(parents=True)
        gen.mkdir()
        # The proto's path under the include root becomes its name in the descriptor pool:
        # "kloop/pb/inference.proto" cannot collide with kserve's or Triton's file names.
        (root / "kloop" / "pb" / "inference.proto").write_text(_rewrite_package(SOURCE.read_text()))
        well_known = importlib.resources.files("grpc_tools") / "_proto"
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
            "kloop/pb/inference.proto",
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        produced = gen / "kloop" / "pb"
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (produced / name).read_text()
            if name == "inference_pb2_grpc.py":
                text = _fix_grpc_module(text)
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
            "changed since the stubs were written. Run: python proto/generate.py",
            file=sys.stderr,
        )
        return 1
    print("kloop/pb is up to date with proto/inference.proto")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if kloop/pb is stale; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    generate(OUT_DIR)
    print(f"wrote {', '.join(GENERATED)} to {OUT_DIR.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
