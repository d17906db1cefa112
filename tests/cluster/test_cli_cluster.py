"""The cluster commands as a user types them, against the real apiserver: a Rollout created by
``kloop rollout --target kserve``, listed by ``kloop get rollouts`` and shown by ``kloop describe
rollout``; a training job submitted by ``kloop train --target kubernetes`` that runs past its
deadline is cancelled; ``kloop train cancel`` deletes a job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from deploy.cluster.kube import KINDS, Kube, NotFound


def kloop(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", "--home", str(tmp_path / "home"), *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


def test_rollout_get_describe(cluster, namespace, kube, tmp_path) -> None:
    kc = ["--kubeconfig", str(cluster.kubeconfig), "-n", namespace]
    out = kloop(tmp_path, "rollout", "digits", "--candidate", "2", "--target", "kserve", *kc,
                "--steps", "20,100", "--min-requests", "50")
    assert out.returncode == 0, out.stderr
    name = out.stdout.split("rollout.kloop.dev/")[1].split()[0]
    obj = kube.get(KINDS["Rollout"], name)
    assert obj["spec"]["model"] == "digits" and obj["spec"]["candidate"] == "2"
    assert obj["spec"]["policy"]["steps"] == [20, 100]
    listed = kloop(tmp_path, "get", "rollouts", *kc)
    assert listed.returncode == 0 and name in listed.stdout and "MODEL" in listed.stdout.upper()
    described = kloop(tmp_path, "describe", "rollout", name, *kc)
    assert described.returncode == 0 and name in described.stdout and "digits" in described.stdout
    missing = kloop(tmp_path, "describe", "rollout", "nope", *kc)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_train_on_kubernetes_deadline_cancels_and_cancel_deletes(cluster, namespace, kube,
                                                                 tmp_path) -> None:
    kc = ["--kubeconfig", str(cluster.kubeconfig), "-n", namespace]
    # Nobody plays the operator here: the job never starts, so the deadline cancels it.
    out = kloop(tmp_path, "train", "--target", "kubernetes", "--pvc", "runs", "--run-id", "r1",
                "--deadline", "2", *kc)
    assert out.returncode == 1 and "deadline" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    assert _deleted(kube, "digits-r1")

    dry = kloop(tmp_path, "train", "--target", "kubernetes", "--dry-run", "--pvc", "runs", "--run-id", "r3", *kc)
    assert dry.returncode == 0
    kube.create(yaml.safe_load(dry.stdout), namespace)
    gone = kloop(tmp_path, "train", "cancel", "digits-r3", *kc)
    assert gone.returncode == 0 and "deleted" in gone.stdout
    assert _deleted(kube, "digits-r3")
    again = kloop(tmp_path, "train", "cancel", "nope", *kc)
    assert again.returncode == 1 and "no such job" in again.stdout


def _deleted(kube: Kube, name: str) -> bool:
    """Gone, or marked for deletion (Foreground deletion waits for a garbage collector that
    this API server does not run)."""
    try:
        return kube.get(KINDS["PyTorchJob"], name)["metadata"].get("deletionTimestamp") is not None
    except NotFound:
        return True
