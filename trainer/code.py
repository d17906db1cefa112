"""A task's code as a packed directory: ``kloop train --code DIR`` without building an image.

Why a digest-named archive: what the pods run must be exactly what the user submitted, byte for
byte, and provably so. ``pack`` makes a deterministic tar.gz of the directory (same tree, same
bytes, whatever the files' mtimes or owners); its sha256 goes into the spec (``TrainSpec.code``)
and the pod refuses to run anything else. The archive travels in a ConfigMap, which caps it
(``MAX_ARCHIVE_BYTES``); bigger code belongs in an image built FROM kloop's trainer image.

In the pod, the container command is wrapped (``trainer.job_manifests``)::

    python -m trainer.code run --archive /var/run/kloop/code/code.tar.gz --sha256 HEX \\
        --run-dir <run dir> -- python -m torch.distributed.run -m trainer.main ...

which keeps the archive in the run's directory on the shared volume
(``<run-dir>/code/<sha256>.tar.gz``, the record of what ran), unpacks it to ``<run-dir>/code/<sha256>/``, installs its
``requirements.txt`` (if any) into ``<run-dir>/code/<sha256>/.deps``, puts both on PYTHONPATH and
execs the command. Every step is idempotent and safe when the job's pods do it at once on the
same volume: each result appears by one ``rename`` and a later pod finds it complete.

Stdlib only (no torch): it runs before torchrun, and the CLI calls ``digest`` cheaply.

Errors::

    CodeError (ValueError)      the code cannot be packed, unpacked or prepared; says why
    ├── CodeTooLarge            the archive exceeds what a ConfigMap holds
    ├── UnsafeCode              a link or special file to pack; an archive entry that is not a
    │                           plain file or directory inside the target (absolute, ``..``)
    └── CodeDigestMismatch      the archive's sha256 is not the one asked for
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from kloop.fsutil import atomic_write_bytes

# A ConfigMap holds at most 1 MiB of data (the API server's limit on data + binaryData); the
# rest of the object (metadata, labels) needs a little room.
MAX_ARCHIVE_BYTES = 900 * 1024
ARCHIVE_KEY = "code.tar.gz"  # the ConfigMap's binaryData key, and the file in the pod's mount
REQUIREMENTS = "requirements.txt"  # installed with pip in the pod, when the directory has one
CODE_DIR = "code"  # <run-dir>/code/<sha256>[.tar.gz]
DEPS_DIR = ".deps"  # <code dir>/.deps: pip --target of the requirements
MARKER = ".kloop-code-sha256"  # written last into an unpacked dir / deps dir: it is complete
CODE_DIR_ENV = "KLOOP_CODE_DIR"  # set for the command: where the unpacked code is
EXCLUDED_DIRS = frozenset({"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
# The code goes first on PYTHONPATH: a top-level module of these names would replace kloop's own.
RESERVED = frozenset({"trainer", "kloop", "serving", "deploy"})


class CodeError(ValueError):
    """The task's code cannot be packed, unpacked or prepared; the message says why."""


class CodeTooLarge(CodeError):
    pass


class UnsafeCode(CodeError):
    pass


class CodeDigestMismatch(CodeError):
    def __init__(self, archive: Path, expected: str, actual: str):
        super().__init__(f"{archive}: sha256 is {actual}, expected {expected}: "
                         "this is not the code the run was submitted with")
        self.archive = archive
        self.expected = expected
        self.actual = actual


# ---- pack (the submitting machine) ------------------------------------------------------------


def pack(directory: Path, *, max_bytes: int = MAX_ARCHIVE_BYTES) -> bytes:
    """A deterministic tar.gz of ``directory``: entries sorted by path, mtime 0, owner 0/0 with
    no names, modes 0644 / 0755 (files with an execute bit, directories); without caches
    (``EXCLUDED_DIRS``, ``*.pyc``). Raises ``UnsafeCode`` for a symlink or special file (what it
    points at would not travel), ``CodeTooLarge`` past ``max_bytes`` compressed, ``CodeError``
    for a top-level ``trainer``/``kloop``/... module (it would shadow kloop's)."""
    root = Path(directory)
    if not root.is_dir():
        raise CodeError(f"{root}: not a directory")
    clash = sorted(p.name for p in root.iterdir() if p.name.removesuffix(".py") in RESERVED)
    if clash:
        raise CodeError(f"{root}: {', '.join(clash)} would shadow kloop's own package of that name "
                        "in the pods; rename it")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _entries(root):
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data = path.read_bytes()
                info.size = len(data)
                info.mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
                tar.addfile(info, io.BytesIO(data))
            if buf.tell() > max_bytes:  # stop early; the compressor lags, so check again below
                raise _too_large(root, max_bytes)
    if buf.tell() > max_bytes:
        raise _too_large(root, max_bytes)
    return buf.getvalue()


def digest(directory: Path) -> str:
    """The sha256 (hex) of ``pack(directory)``: what ``TrainSpec.code.sha256`` records."""
    return hashlib.sha256(pack(directory)).hexdigest()


def _entries(root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []

    def walk(d: Path, prefix: str) -> None:
        for child in sorted(d.iterdir(), key=lambda p: p.name):
            rel = prefix + child.name
            if child.is_symlink():
                raise UnsafeCode(f"{root}: {rel} is a symbolic link; copy what it points at into "
                                 "the directory (links are not packed)")
            if child.is_dir():
                if child.name not in EXCLUDED_DIRS:
                    out.append((rel, child))
                    walk(child, rel + "/")
            elif child.is_file():
                if not child.name.endswith(EXCLUDED_SUFFIXES):
                    out.append((rel, child))
            else:
                raise UnsafeCode(f"{root}: {rel} is not a regular file or directory")

    walk(root, "")
    return out


def _too_large(root: Path, max_bytes: int) -> CodeTooLarge:
    return CodeTooLarge(f"{root}: the packed code exceeds {max_bytes // 1024} KiB compressed, more "
                        "than a ConfigMap carries; build an image FROM the kloop trainer image "
                        "with the code installed (examples/Dockerfile.task) and pass --image")


# ---- unpack (the pod) -------------------------------------------------------------------------


def unpack(archive: Path, sha256: str, into: Path) -> Path:
    """Extract ``archive`` into the directory ``into`` (created; returned), after checking its
    sha256 (``CodeDigestMismatch``) and every entry (``UnsafeCode``: only plain files and
    directories, relative, no ``..``). Idempotent: a directory already unpacked from the same
    digest is returned as it is, also when another process finished it first."""
    data = Path(archive).read_bytes()
    _check(Path(archive), data, sha256)
    into = Path(into)
    if _complete(into, sha256):
        return into
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{into.name}.", dir=into.parent))
    try:
        tmp.chmod(0o755)
        _extract(data, tmp)
        (tmp / MARKER).write_text(sha256 + "\n")
        _rename_dir(tmp, into, sha256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; a leftover otherwise
    return into


def _check(archive: Path, data: bytes, sha256: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CodeDigestMismatch(archive, sha256, actual)


def _complete(directory: Path, sha256: str) -> bool:
    marker = directory / MARKER
    if marker.is_file() and marker.read_text().strip() == sha256:
        return True
    if directory.exists():
        raise CodeError(f"{directory} exists but is not the complete unpacked code of {sha256}")
    return False


def _rename_dir(tmp: Path, target: Path, sha256: str) -> None:
    """Move the finished ``tmp`` to ``target``; when another process got there first with the
    same content (a pod of the same job on the shared volume), keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not _complete(target, sha256):
            raise


def _extract(data: bytes, dest: Path) -> None:
    root = dest.resolve()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            parts = _safe_parts(member.name)
            if not parts:
                continue  # the archive's own "." entry
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(root):
                raise UnsafeCode(f"archive entry {member.name!r} points outside the code directory")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None  # a regular member always has content
                try:
                    with open(target, "xb") as f:
                        shutil.copyfileobj(src, f)
                except FileExistsError:
                    raise UnsafeCode(f"archive entry {member.name!r} appears twice") from None
                target.chmod(0o755 if member.mode & 0o100 else 0o644)
            else:
                raise UnsafeCode(f"archive entry {member.name!r} is a link or special file; "
                                 "code archives hold plain files and directories only")


def _safe_parts(name: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or ".." in path.parts:
        raise UnsafeCode(f"archive entry {name!r} escapes the code directory (absolute or '..')")
    return path.parts


# ---- prepare and run (the pod) ----------------------------------------------------------------


def prepare(archive: Path, sha256: str, run_dir: Path) -> Path:
    """What the pod does before training; returns the unpacked code directory.

    Keeps the archive as ``<run-dir>/code/<sha256>.tar.gz`` (copied from ``archive`` unless a
    verified copy is there: a restarted pod needs no ConfigMap), unpacks it into
    ``<run-dir>/code/<sha256>/`` and installs its ``requirements.txt`` into ``.deps`` there."""
    root = Path(run_dir) / CODE_DIR
    kept = root / f"{sha256}.tar.gz"
    if not (kept.is_file() and hashlib.sha256(kept.read_bytes()).hexdigest() == sha256):
        data = Path(archive).read_bytes()
        _check(Path(archive), data, sha256)
        atomic_write_bytes(kept, data)
    code_dir = unpack(kept, sha256, root / sha256)
    install_requirements(code_dir, sha256)
    return code_dir


def install_requirements(code_dir: Path, sha256: str) -> Path | None:
    """``pip install --target <code dir>/.deps -r requirements.txt`` once; the deps directory,
    or None when the code has no requirements file."""
    req = code_dir / REQUIREMENTS
    if not req.is_file():
        return None
    deps = code_dir / DEPS_DIR
    if _complete(deps, sha256):
        return deps
    tmp = Path(tempfile.mkdtemp(prefix=f"{DEPS_DIR}.", dir=code_dir))
    try:
        # cwd = the code dir: a requirement given as a relative path (a vendored wheel) is
        # found there. Output goes to the pod's log.
        rc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
             "--no-warn-script-location", "--target", str(tmp), "-r", str(req)],
            cwd=code_dir, check=False).returncode
        if rc != 0:
            raise CodeError(f"pip install -r {req} failed with exit code {rc} (its output is above)")
        (tmp / MARKER).write_text(sha256 + "\n")
        _rename_dir(tmp, deps, sha256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return deps


def child_env(code_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the code directory (then its ``.deps``, if installed) first on PYTHONPATH,
    so torchrun's workers import the task from there; ``KLOOP_CODE_DIR`` names it."""
    deps = code_dir / DEPS_DIR
    paths = [str(code_dir), *([str(deps)] if deps.is_dir() else [])]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    return {**env, "PYTHONPATH": os.pathsep.join(paths), CODE_DIR_ENV: str(code_dir)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.code",
                                description="Prepare a task's packed code and run a command with it.")
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="verify, keep and unpack the archive, install its "
                                     "requirements, then exec the command after --")
    run.add_argument("--archive", type=Path, required=True, help="the packed code (tar.gz)")
    run.add_argument("--sha256", required=True, help="the digest the archive must have")
    run.add_argument("--run-dir", type=Path, required=True, help="the run's directory (shared volume)")
    dig = sub.add_parser("digest", help="print the sha256 of a directory's packed code")
    dig.add_argument("directory", type=Path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    head, cmd = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    ns = _parser().parse_args(head)
    try:
        if ns.action == "digest":
            print(digest(ns.directory))
            return 0
        if not cmd:
            raise CodeError("no command to run: give it after --")
        code_dir = prepare(ns.archive, ns.sha256, ns.run_dir)
    except (CodeError, OSError, tarfile.TarError) as e:
        print(f"kloop code: {e}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    try:
        os.execvpe(cmd[0], cmd, child_env(code_dir, os.environ))
    except OSError as e:
        print(f"kloop code: cannot run {cmd[0]!r}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main())
