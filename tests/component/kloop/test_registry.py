"""kloop.artifact.Registry on small dummy files: the contract the trainer writes through."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kloop.artifact import ArtifactCorrupt, Registry, TensorSpec, VersionNotFound
from tests.support.paths import REPO


def _publish(reg: Registry, src: Path, name: str = "toy", run_id: str = "r"):
    return reg.publish(
        name, src, model_file="model.bin", format="torch.export", torch_version="x",
        inputs=[TensorSpec("image", "FP32", (-1, 1, 8, 8))], outputs=[TensorSpec("label", "INT64", (-1,))],
        metrics={"accuracy": 0.9}, params={"lr": 0.1}, data_fingerprint="f" * 64, run_id=run_id,
    )


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "model.bin").write_bytes(b"\x00model-bytes\x01" * 100)
    return d


def test_publish_versions_and_verify(tmp_path: Path, src: Path) -> None:
    reg = Registry(f"file://{tmp_path / 'reg'}")
    m1, m2 = _publish(reg, src), _publish(reg, src)
    assert (m1.version, m2.version) == (1, 2)
    assert reg.versions("toy") == [1, 2] and reg.models() == ["toy"]
    assert reg.verify("toy", 2) == m2
    assert reg.resolve("toy", "latest") == 2
    assert m1.inputs[0].shape == (-1, 1, 8, 8)


def test_aliases_point_at_versions(tmp_path: Path, src: Path) -> None:
    reg = Registry(tmp_path / "reg")
    _publish(reg, src), _publish(reg, src)
    reg.set_alias("toy", "champion", 1)
    reg.set_alias("toy", "candidate", 2)
    assert reg.aliases("toy") == {"candidate": 2, "champion": 1}
    reg.set_alias("toy", "champion", 2)
    assert reg.resolve("toy", "champion") == 2
    reg.remove_alias("toy", "candidate")
    with pytest.raises(VersionNotFound):
        reg.resolve("toy", "candidate")
    with pytest.raises(VersionNotFound):
        reg.set_alias("toy", "champion", 9)


def test_verify_detects_flipped_byte_and_extra_file(tmp_path: Path, src: Path) -> None:
    reg = Registry(tmp_path / "reg")
    _publish(reg, src), _publish(reg, src)
    f = reg.path("toy", 1) / "model.bin"
    data = bytearray(f.read_bytes())
    data[5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match="sha256 of model.bin"):
        reg.verify("toy", 1)
    (reg.path("toy", 2) / "extra.txt").write_text("x")
    with pytest.raises(ArtifactCorrupt, match="unlisted"):
        reg.verify("toy", 2)


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path, src: Path) -> None:
    reg = Registry(tmp_path / "reg")
    n = 8
    barrier = threading.Barrier(n)
    got: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            got.append(_publish(Registry(tmp_path / "reg"), src, run_id=f"r{i}").version)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(got) == list(range(1, n + 1))
    assert {reg.manifest("toy", v).run_id for v in got} == {f"r{i}" for i in range(n)}


def test_crashed_publish_is_never_listed(tmp_path: Path, src: Path) -> None:
    """A publisher SIGKILLed after copying its files (just before the rename) leaves only a
    .staging-* directory, which no reader lists."""
    reg_root = tmp_path / "reg"
    _publish(Registry(reg_root), src)
    script = textwrap.dedent(f"""
        import os, signal
        import kloop.artifact as a
        a._fsync_tree = lambda root: os.kill(os.getpid(), signal.SIGKILL)
        reg = a.Registry({str(reg_root)!r})
        reg.publish("toy", {str(src)!r}, model_file="model.bin", format="torch.export",
                    torch_version="x", inputs=[], outputs=[], metrics={{}}, params={{}},
                    data_fingerprint="f", run_id="crash")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr.decode()
    staging = list((reg_root / "toy").glob(".staging-*"))
    assert staging and (staging[0] / "model.bin").is_file()  # the half-written version exists...
    reg = Registry(reg_root)
    assert reg.versions("toy") == [1]  # ...and is invisible
    assert reg.resolve("toy", "latest") == 1
    assert _publish(reg, src).version == 2  # and does not block the next publisher


def test_a_manifest_cannot_point_outside_its_hashed_files(tmp_path) -> None:
    import json as _json

    from kloop.artifact import ArtifactCorrupt, Manifest

    m = _json.loads(_json.dumps(Manifest(
        name="m", version=1, created=0.0, framework="pytorch", torch_version="x", format="torch.export",
        model_file="model.pt2", inputs=(), outputs=(), metrics={}, params={}, data_fingerprint="f",
        run_id="r", files={"model.pt2": "0" * 64}).to_dict()))
    Manifest.from_dict(m)
    with pytest.raises(ArtifactCorrupt, match="not among its hashed files"):
        Manifest.from_dict({**m, "model_file": "../../elsewhere.pt2"})
    with pytest.raises(ArtifactCorrupt, match="outside the version"):
        Manifest.from_dict({**m, "model_file": "../x", "files": {"../x": "0" * 64}})


def test_alias_names_are_checked_and_bad_alias_files_are_artifact_errors(tmp_path) -> None:
    from kloop.artifact import ArtifactCorrupt, Registry

    reg = Registry(tmp_path)
    (tmp_path / "m" / "aliases").mkdir(parents=True)
    with pytest.raises(ValueError, match="not valid"):
        reg.alias("m", "../../etc")
    (tmp_path / "m" / "aliases" / "champion.json").write_text("{not json")
    with pytest.raises(ArtifactCorrupt):
        reg.alias("m", "champion")
