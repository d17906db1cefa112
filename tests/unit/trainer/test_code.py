"""trainer.code: a deterministic, bounded pack; an unpack that checks the digest and every entry
before anything is written; the pod-side preparation, idempotent across restarts."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from trainer import code


def make_tree(root: Path) -> Path:
    (root / "mypkg" / "sub").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "task.py").write_text("VALUE = 42\n")
    (root / "mypkg" / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o775)
    (root / "requirements.txt").write_text("# none\n")
    (root / "empty").mkdir()
    return root


def names(archive: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return tar.getnames()


def test_pack_is_deterministic_whatever_the_mtimes_and_modes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "a")
    first = code.pack(tree)
    assert code.pack(tree) == first
    for p in tree.rglob("*"):
        os.utime(p, (1_000_000, 1_000_000))
    (tree / "mypkg" / "task.py").chmod(0o600)  # not executable either way: same mode in the archive
    assert code.pack(tree) == first
    assert code.digest(tree) == hashlib.sha256(first).hexdigest()
    # the same tree made elsewhere, in another order, packs to the same bytes
    other = tmp_path / "b"
    other.mkdir()
    (other / "empty").mkdir()
    (other / "requirements.txt").write_text("# none\n")
    (other / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (other / "run.sh").chmod(0o700)
    (other / "mypkg" / "sub").mkdir(parents=True)
    (other / "mypkg" / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (other / "mypkg" / "task.py").write_text("VALUE = 42\n")
    (other / "mypkg" / "__init__.py").write_text("")
    assert code.pack(other) == first
    (other / "mypkg" / "task.py").write_text("VALUE = 43\n")
    assert code.digest(other) != code.digest(tree)


def test_pack_normalizes_entries(tmp_path: Path) -> None:
    archive = code.pack(make_tree(tmp_path))
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == sorted(members)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""
               for m in members.values())
    assert members["run.sh"].mode == 0o755 and members["mypkg/task.py"].mode == 0o644
    assert members["mypkg"].isdir() and members["mypkg"].mode == 0o755
    assert archive[4:8] == b"\0\0\0\0"  # the gzip header's mtime


def test_pack_excludes_caches_and_keeps_requirements(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    clean = code.pack(tree)
    (tree / "mypkg" / "__pycache__").mkdir()
    (tree / "mypkg" / "__pycache__" / "task.cpython-311.pyc").write_bytes(b"\0" * 10)
    (tree / "stray.pyc").write_bytes(b"\0")
    (tree / ".git" / "objects").mkdir(parents=True)
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tree / ".pytest_cache").mkdir()
    (tree / ".pytest_cache" / "x").write_text("1")
    assert code.pack(tree) == clean
    assert "requirements.txt" in names(clean)
    assert not any("__pycache__" in n or n.endswith(".pyc") or n.startswith(".git") for n in names(clean))


@pytest.mark.parametrize("target_is_dir", [False, True])
def test_pack_refuses_symlinks(tmp_path: Path, target_is_dir: bool) -> None:
    tree = make_tree(tmp_path / "t")
    (tree / "mypkg" / "link").symlink_to(tree / "empty" if target_is_dir else tree / "run.sh")
    with pytest.raises(code.UnsafeCode, match=r"mypkg/link is a symbolic link"):
        code.pack(tree)


def test_pack_refuses_oversize_pointing_at_an_image(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    (tree / "weights.bin").write_bytes(os.urandom(code.MAX_ARCHIVE_BYTES + 1024))  # incompressible
    with pytest.raises(code.CodeTooLarge, match=r"exceeds 900 KiB.*ConfigMap.*image"):
        code.pack(tree)
    with pytest.raises(code.CodeTooLarge):
        code.pack(make_tree(tmp_path / "small"), max_bytes=64)


def test_pack_refuses_what_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(code.CodeError, match="not a directory"):
        code.pack(tmp_path / "missing")


@pytest.mark.parametrize("shadow", ["trainer", "kloop.py"])
def test_pack_refuses_code_that_would_shadow_kloop(tmp_path: Path, shadow: str) -> None:
    tree = make_tree(tmp_path)
    if shadow.endswith(".py"):
        (tree / shadow).write_text("")
    else:
        (tree / shadow).mkdir()
    with pytest.raises(code.CodeError, match=f"{shadow} would shadow kloop's own package"):
        code.pack(tree)


def write_archive(path: Path, archive: bytes) -> tuple[Path, str]:
    path.write_bytes(archive)
    return path, hashlib.sha256(archive).hexdigest()


def test_unpack_round_trip_and_idempotence(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src")
    archive, sha = write_archive(tmp_path / "code.tar.gz", code.pack(tree))
    out = code.unpack(archive, sha, tmp_path / "out" / sha)
    assert out == tmp_path / "out" / sha
    assert (out / "mypkg" / "task.py").read_text() == "VALUE = 42\n"
    assert (out / "mypkg" / "sub" / "data.csv").is_file() and (out / "empty").is_dir()
    assert os.access(out / "run.sh", os.X_OK) and not os.access(out / "mypkg" / "task.py", os.X_OK)
    (out / "mypkg" / "task.py").write_text("touched\n")  # not extracted again: the digest's dir is done
    assert code.unpack(archive, sha, out) == out
    assert (out / "mypkg" / "task.py").read_text() == "touched\n"
    assert sorted(p.name for p in out.parent.iterdir()) == [sha]  # no temporary dir left


def test_unpack_refuses_a_directory_it_did_not_complete(tmp_path: Path) -> None:
    archive, sha = write_archive(tmp_path / "code.tar.gz", code.pack(make_tree(tmp_path / "src")))
    (tmp_path / "out").mkdir()
    with pytest.raises(code.CodeError, match="not the complete unpacked code"):
        code.unpack(archive, sha, tmp_path / "out")


def test_unpack_checks_the_digest_first(tmp_path: Path) -> None:
    archive, sha = write_archive(tmp_path / "code.tar.gz", code.pack(make_tree(tmp_path / "src")))
    wrong = "0" * 64
    with pytest.raises(code.CodeDigestMismatch) as e:
        code.unpack(archive, wrong, tmp_path / "out")
    assert e.value.expected == wrong and e.value.actual == sha
    assert wrong in str(e.value) and sha in str(e.value)
    assert not (tmp_path / "out").exists()


def malicious(*entries: tarfile.TarInfo | tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(("entries", "message"), [
    ([("ok.py", b"1"), ("../evil.py", b"x")], "escapes"),
    ([("a/../../evil.py", b"x")], "escapes"),
    ([("/tmp/evil.py", b"x")], "escapes"),
    ([link("lnk", "/etc", tarfile.SYMTYPE), ("lnk/evil.py", b"x")], "link or special file"),
    ([("ok.py", b"1"), link("hard", "/etc/passwd", tarfile.LNKTYPE)], "link or special file"),
    ([link("fifo", "", tarfile.FIFOTYPE)], "link or special file"),
    ([("dup.py", b"1"), ("dup.py", b"2")], "appears twice"),
], ids=["dotdot", "inner-dotdot", "absolute", "symlink", "hardlink", "fifo", "duplicate"])
def test_unpack_refuses_unsafe_entries(tmp_path: Path, entries: list, message: str) -> None:
    archive, sha = write_archive(tmp_path / "bad.tar.gz", malicious(*entries))
    into = tmp_path / "box" / "code"
    with pytest.raises(code.UnsafeCode, match=message):
        code.unpack(archive, sha, into)
    assert not into.exists()
    assert list((tmp_path / "box").iterdir()) == []  # the half-extracted temporary dir is gone
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "box" / "evil.py").exists()


def test_prepare_keeps_the_archive_on_the_volume_and_survives_a_gone_configmap(tmp_path: Path) -> None:
    (tmp_path / "mount").mkdir()
    archive, sha = write_archive(tmp_path / "mount" / "code.tar.gz", code.pack(make_tree(tmp_path / "src")))
    run_dir = tmp_path / "runs" / "r1"
    code_dir = code.prepare(archive, sha, run_dir)
    assert code_dir == run_dir / "code" / sha
    assert (run_dir / "code" / f"{sha}.tar.gz").read_bytes() == archive.read_bytes()
    assert (code_dir / "mypkg" / "task.py").is_file()
    archive.unlink()  # a pod restarted after the ConfigMap was deleted
    assert code.prepare(archive, sha, run_dir) == code_dir


def test_prepare_refuses_another_archive(tmp_path: Path) -> None:
    archive, sha = write_archive(tmp_path / "code.tar.gz", code.pack(make_tree(tmp_path / "src")))
    with pytest.raises(code.CodeDigestMismatch):
        code.prepare(archive, "f" * 64, tmp_path / "run")
    assert not (tmp_path / "run" / "code" / f"{'f' * 64}.tar.gz").exists()


def test_child_env_puts_the_code_and_its_deps_first(tmp_path: Path) -> None:
    env = code.child_env(tmp_path, {"PYTHONPATH": "/opt/x", "HOME": "/h"})
    assert env["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/opt/x"
    assert env[code.CODE_DIR_ENV] == str(tmp_path) and env["HOME"] == "/h"
    (tmp_path / code.DEPS_DIR).mkdir()
    assert code.child_env(tmp_path, {})["PYTHONPATH"] == f"{tmp_path}{os.pathsep}{tmp_path / code.DEPS_DIR}"


def test_main_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive, sha = write_archive(tmp_path / "code.tar.gz", code.pack(make_tree(tmp_path / "src")))
    argv = ["run", "--archive", str(archive), "--sha256", "0" * 64, "--run-dir", str(tmp_path / "run"),
            "--", "true"]
    assert code.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("kloop code: ") and err.count("\n") == 1 and sha in err
    assert code.main(argv[:-2]) == 1
    assert "no command to run" in capsys.readouterr().err


def test_main_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = make_tree(tmp_path)
    assert code.main(["digest", str(tree)]) == 0
    assert capsys.readouterr().out.strip() == code.digest(tree)
