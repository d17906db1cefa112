"""Build the native gRPC front end (``_grpc_front``) next to this file.

    python -m serving.grpc.native.build [--force]

Needs a C++17 compiler, pybind11 (``pip install pybind11``, in kloop's ``native`` extra) and
gRPC's C++ library found by pkg-config (Debian/Ubuntu: ``apt-get install libgrpc++-dev``).
``scripts/setup`` runs it where those are present. It rebuilds only when the source, the gRPC
version or the Python version changed (a stamp file records them), so it is cheap to call
every time. Exit 0 built or up to date; 1 when something it needs is missing (it says what).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "grpc_front.cpp"
MODULE = "_grpc_front"


def target() -> Path:
    suffix: str = sysconfig.get_config_var("EXT_SUFFIX")  # e.g. ".cpython-311-x86_64-linux-gnu.so"
    return HERE / (MODULE + suffix)


def _pkg_config(*args: str) -> str:
    return subprocess.run(["pkg-config", *args, "grpc++"], check=True, capture_output=True,
                          text=True).stdout.strip()


def missing() -> str:
    """What the build lacks, or '' when it can run."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}; Debian: apt-get install g++)"
    if shutil.which("pkg-config") is None:
        return "no pkg-config (Debian: apt-get install pkg-config)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's C headers are not installed (Debian: apt-get install python3-dev)"
    if subprocess.run(["pkg-config", "--exists", "grpc++"], check=False).returncode != 0:
        return "gRPC's C++ library is not installed (Debian: apt-get install libgrpc++-dev)"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (pip install 'kloop[native]')"
    return ""


def _stamp(grpc_version: str) -> str:
    """What the built module depends on: the source, gRPC's version, this Python."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(grpc_version.encode())
    digest.update(sysconfig.get_config_var("EXT_SUFFIX").encode())
    return digest.hexdigest()


def build(force: bool = False) -> Path:
    import pybind11

    out = target()
    stamp_file = out.with_suffix(".stamp")
    grpc_version = _pkg_config("--modversion")
    stamp = _stamp(grpc_version)
    if not force and out.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        print(f"[native] {out.name} is up to date", file=sys.stderr)
        return out
    tmp = out.with_name(out.name + ".tmp")
    command = [
        os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC",
        "-fvisibility=hidden", "-Wall",
        f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
        *_pkg_config("--cflags").split(), str(SOURCE), "-o", str(tmp),
        *_pkg_config("--libs").split(),
    ]
    print(f"[native] building {out.name} against gRPC {grpc_version}", file=sys.stderr)
    subprocess.run(command, check=True)
    os.replace(tmp, out)  # a running server keeps the old inode
    stamp_file.write_text(stamp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.grpc.native.build",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"[native] not built: {reason}", file=sys.stderr)
        return 1
    try:
        build(force=args.force)
    except subprocess.CalledProcessError as e:
        print(f"[native] build failed ({e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
