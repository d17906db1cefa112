"""The CLI's fast paths as a user runs them: help, dry-run manifests, input errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.support.crds import validate


def kloop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], check=False, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("command", [[], ["train"], ["serve"], ["rollout"], ["pipeline", "run"],
                                     ["runs"], ["status"], ["demo"]])
def test_every_command_has_help(command: list[str]) -> None:
    out = kloop(*command, "--help")
    assert out.returncode == 0 and "usage: kloop" in out.stdout


@pytest.mark.parametrize("extra", [["--pvc", "runs"], ["--gpus", "2", "--num-nodes", "4", "--pvc", "runs"], ["--elastic", "1:4", "--num-nodes", "2", "--batch-size", "96", "--pvc", "runs"],
                                   ["--kind", "trainjob", "--gpus", "1", "--nproc", "1"]])
def test_train_kubernetes_dry_run_is_a_valid_job(extra: list[str]) -> None:
    out = kloop("train", "--target", "kubernetes", "--dry-run", "--run-id", "r1", *extra)
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load(out.stdout)
    validate(job)
    if job["kind"] == "PyTorchJob":
        specs = job["spec"]["pytorchReplicaSpecs"]
        container = next(iter(specs.values()))["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"
        assert "trainer.main" in container["command"]
        if "--gpus" in extra:
            assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        if "--elastic" in extra:
            assert job["spec"]["elasticPolicy"]["minReplicas"] == 1
            assert job["spec"]["elasticPolicy"]["maxReplicas"] == 4


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-size", "63"], "not divisible"),
    (["--num-nodes", "2"], "storage.pvc_claim is not set"),  # a PyTorchJob publishes to a PVC
])
def test_bad_spec_is_a_clear_error_not_a_traceback(args: list[str], message: str) -> None:
    out = kloop("train", "--target", "kubernetes", "--dry-run", *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_rollout_without_a_server_says_how_to_start_one(tmp_path) -> None:
    from tests.support.artifacts import publish_dummy

    publish_dummy(tmp_path / "registry", "digits", 2)
    out = kloop("--home", str(tmp_path), "rollout", "digits", "--candidate", "2")
    assert out.returncode == 2 and "kloop serve" in out.stderr


def test_kserve_dry_run_of_a_first_version_routes_everything_to_it(tmp_path) -> None:
    from tests.support.artifacts import publish_dummy

    publish_dummy(tmp_path / "registry", "digits", 1)
    out = kloop("--home", str(tmp_path), "rollout", "digits", "--candidate", "1", "--target", "kserve",
                "--dry-run")
    assert out.returncode == 0, out.stderr
    objs = [o for o in yaml.safe_load_all(out.stdout) if o]
    assert sorted(o["kind"] for o in objs) == ["GRPCRoute", "HTTPRoute", "InferenceService"]
    for o in objs:
        validate(o)
        if o["kind"] == "HTTPRoute":
            refs = o["spec"]["rules"][0]["backendRefs"]
            assert [r["weight"] for r in refs] == [100]
