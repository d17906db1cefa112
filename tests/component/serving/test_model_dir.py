"""The KServe runtime mode: ``python -m serving --model-dir DIR`` serves exactly the one version
in DIR (what KServe's storage initializer leaves in /mnt/models), verified like a registry
version, with load/unload refused. Real server processes on loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kloop.artifact import ArtifactCorrupt, Registry, verify_dir
from serving.client import AdminClient, AdminError, HttpClient
from tests.support.serving import MODEL, TOKEN, ModelDirServer, infer, reference


def run_to_exit(model_dir: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--http-port", "0",
         "--grpc-port", "0"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_serves_exactly_that_version(registry_root, tmp_path, images):
    version_dir = registry_root / MODEL / "2"
    env = {"KLOOP_MODEL_NAME": MODEL, "KLOOP_MODEL_VERSION": "2"}
    with ModelDirServer(version_dir, tmp_path / "srv", env) as url:
        assert infer(url, MODEL, images, 3) == ["2", "2", "2"]
        async def logits() -> np.ndarray:
            async with HttpClient(url) as c:
                return (await c.infer(MODEL, {"image": images})).outputs["logits"]
        np.testing.assert_allclose(asyncio.run(logits()), reference(2, images)[0],
                                   rtol=1e-5, atol=1e-6)
        admin = AdminClient(url, TOKEN)
        assert admin.traffic(MODEL) == {2: 100}
        for call in (lambda: admin.load(MODEL, 1), lambda: admin.unload(MODEL, 2)):
            with pytest.raises(AdminError) as e:
                call()
            assert e.value.status == 409 and "--model-dir" in str(e.value)
        text = admin.metrics_text()
        assert f'model="{MODEL}"' in text and 'version="2"' in text


def test_a_flipped_byte_is_refused(registry_root, tmp_path):
    version_dir = tmp_path / "mnt-models"
    shutil.copytree(registry_root / MODEL / "1", version_dir)
    blob = bytearray((version_dir / "model.pt2").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (version_dir / "model.pt2").write_bytes(bytes(blob))
    with pytest.raises(ArtifactCorrupt, match="sha256 of model.pt2"):
        verify_dir(version_dir)
    done = run_to_exit(version_dir, {})
    assert done.returncode == 1
    assert "refusing to load" in done.stderr and "sha256 of model.pt2" in done.stderr


@pytest.mark.parametrize("env, says", [
    ({"KLOOP_MODEL_NAME": MODEL, "KLOOP_MODEL_VERSION": "1"}, "holds digits v2"),
    ({"KLOOP_MODEL_NAME": "iris"}, "expects iris v2"),
])
def test_env_mismatch_refuses_to_start(registry_root, env, says):
    done = run_to_exit(registry_root / MODEL / "2", env)
    assert done.returncode == 1, done.stderr
    assert says in done.stderr and "KLOOP_MODEL_VERSION" in done.stderr


def test_verify_dir_agrees_with_the_registry(registry_root):
    assert verify_dir(registry_root / MODEL / "2") == Registry(registry_root).verify(MODEL, 2)


def test_registry_and_model_dir_are_exclusive(registry_root):
    done = subprocess.run([sys.executable, "-m", "serving", "--registry", str(registry_root),
                           "--model-dir", str(registry_root / MODEL / "2")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
