"""``deploy.cluster.kube`` against the real kube-apiserver 1.20 (tests/cluster/conftest.py): optimistic
concurrency, idempotent apply and delete, /status patches, the server's 422 message, watches
including a real 410 Gone, the autoscaling/v2 -> v2beta2 fallback, events."""

from __future__ import annotations

import logging

import pytest

from deploy.cluster.kube import KINDS, Conflict, Invalid, Kube, KubeConfig, NotFound

CM = KINDS["ConfigMap"]
PTJ = KINDS["PyTorchJob"]



def configmap(name: str, **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def pytorchjob(name: str, backoff_limit=3) -> dict:
    container = {"name": "pytorch", "image": "busybox", "command": ["true"]}
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
        "spec": {
            "runPolicy": {"backoffLimit": backoff_limit},
            "pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "OnFailure",
                                               "template": {"spec": {"containers": [container]}}}},
        },
    }


def test_connect_reads_the_kubeconfig(cluster, namespace):
    with Kube.connect(KubeConfig(kubeconfig=cluster.kubeconfig, namespace=namespace)) as k:
        assert k.namespace == namespace
        assert k.create(configmap("c"))["metadata"]["namespace"] == namespace
    with Kube.connect(KubeConfig(kubeconfig=cluster.kubeconfig)) as k:
        assert k.namespace == "default"


def test_create_get_and_stale_replace_conflicts(kube):
    created = kube.create(configmap("c", a="1"))
    with pytest.raises(Conflict):
        kube.create(configmap("c", a="1"))  # already exists
    got = kube.get(CM, "c")
    assert got["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    kube.replace({**got, "data": {"a": "2"}})
    with pytest.raises(Conflict) as e:
        kube.replace({**got, "data": {"a": "3"}})  # got's resourceVersion is stale now
    assert e.value.status == 409
    assert kube.get(CM, "c")["data"] == {"a": "2"}
    with pytest.raises(NotFound):
        kube.get(CM, "missing")


def test_apply_is_idempotent(kube):
    first = kube.apply(configmap("c", a="1"))
    again = kube.apply(configmap("c", a="1"))
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    changed = kube.apply(configmap("c", a="2"))
    assert changed["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]
    assert kube.get(CM, "c")["data"] == {"a": "2"}


def test_merge_patch_of_status_keeps_spec(kube):
    kube.create(pytorchjob("j"))
    cond = {"type": "Running", "status": "True", "message": "m"}
    out = kube.patch(PTJ, "j", {"status": {"conditions": [cond]}}, status=True)
    assert out["status"]["conditions"][0]["type"] == "Running"
    got = kube.get(PTJ, "j")
    assert got["status"]["conditions"][0]["message"] == "m"
    assert got["spec"]["runPolicy"]["backoffLimit"] == 3
    # the main resource ignores status: a PUT of the object does not change it
    kube.replace({**got, "status": {"conditions": []}})
    assert kube.get(PTJ, "j")["status"]["conditions"][0]["type"] == "Running"


def test_delete_is_idempotent(kube):
    kube.create(configmap("bg"))
    kube.delete(CM, "bg", propagation="Background")
    kube.delete(CM, "bg", propagation="Background")
    with pytest.raises(NotFound):
        kube.get(CM, "bg")
    # Foreground: with no garbage collector here the object stays, marked for deletion
    kube.create(configmap("fg"))
    kube.delete(CM, "fg")
    kube.delete(CM, "fg")
    meta = kube.get(CM, "fg")["metadata"]
    assert meta["deletionTimestamp"] and "foregroundDeletion" in meta["finalizers"]
    kube.delete(CM, "never-existed")


def test_invalid_object_carries_the_servers_message(kube):
    with pytest.raises(Invalid) as e:
        kube.create(pytorchjob("bad", backoff_limit="three"))
    assert e.value.status == 422
    assert "backoffLimit" in e.value.message and "integer" in e.value.message
    with pytest.raises(NotFound):
        kube.get(PTJ, "bad")


def test_watch_sees_added_modified_deleted(kube):
    kube.create(configmap("w", a="1"))
    kube.create(configmap("other"))
    events = kube.watch(CM, name="w", timeout_s=15)
    etype, obj = next(events)  # from the initial list
    assert (etype, obj["metadata"]["name"], obj["kind"]) == ("ADDED", "w", "ConfigMap")
    kube.patch(CM, "w", {"data": {"a": "2"}})
    kube.delete(CM, "w", propagation="Background")
    seen = []
    for etype, obj in events:
        seen.append((etype, obj["metadata"]["name"], obj.get("data")))
        if etype == "DELETED":
            break
    events.close()
    assert seen == [("MODIFIED", "w", {"a": "2"}), ("DELETED", "w", {"a": "2"})]


def test_watch_from_an_expired_version_relists_and_continues(kube, caplog):
    """A real 410: the watch cache of a CRD kind starts at the CRD's creation, so version "1"
    is older than its window and the server answers with an ERROR event, code 410."""
    kube.create(pytorchjob("j"))
    caplog.set_level(logging.INFO, logger="deploy.cluster.kube")
    events = kube.watch(PTJ, name="j", timeout_s=15, resource_version="1")
    etype, obj = next(events)
    assert (etype, obj["metadata"]["name"]) == ("ADDED", "j")
    assert any("expired; listing again" in r.getMessage() for r in caplog.records)
    kube.patch(PTJ, "j", {"status": {"conditions": [{"type": "Created", "status": "True"}]}}, status=True)
    etype, obj = next(events)
    events.close()
    assert etype == "MODIFIED" and obj["status"]["conditions"][0]["type"] == "Created"


def test_watch_stops_at_its_timeout(kube):
    assert list(kube.watch(CM, name="nothing", timeout_s=1)) == []


def test_hpa_v2_is_written_as_v2beta2_on_this_server(kube):
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d"},
            "minReplicas": 1, "maxReplicas": 3,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "kloop_inflight_requests"},
                                                  "target": {"type": "AverageValue", "averageValue": "4"}}}],
        },
    }
    assert not kube.served(KINDS["HorizontalPodAutoscaler"])
    created = kube.create(hpa)
    assert created["apiVersion"] == "autoscaling/v2beta2"
    assert created["spec"]["metrics"][0]["pods"]["metric"]["name"] == "kloop_inflight_requests"
    again = kube.apply(hpa)
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert kube.get(KINDS["HorizontalPodAutoscaler"], "h")["spec"]["maxReplicas"] == 3


def test_events_are_recorded_and_listed(kube):
    job = kube.create(pytorchjob("j"))
    kube.event(job, "Submitted", "submitted by kloop")
    kube.event(job, "Failed", "it broke", type="Warning")
    events = kube.events_for(job)
    assert sorted((e["reason"], e["type"], e["message"]) for e in events) == [
        ("Failed", "Warning", "it broke"), ("Submitted", "Normal", "submitted by kloop")]
    assert {e["involvedObject"]["uid"] for e in events} == {job["metadata"]["uid"]}


def test_pod_log_errors_are_kube_errors(kube):
    """No kubelet here: the log of a pod bound to a node that does not exist is a 404."""
    kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                 "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "busybox"}]}})
    with pytest.raises(NotFound):
        list(kube.pod_log("p", follow=False))
