"""Training on Kubernetes: submit the PyTorchJob / TrainJob a ``TrainSpec`` renders to, follow it
to the end, cancel it, and find the version its pods published.

Why this shape: the operator (Kubeflow Training Operator v1.9 for ``kubeflow.org/v1``
PyTorchJob, Kubeflow Trainer v2 for ``trainer.kubeflow.org/v1alpha1`` TrainJob) owns the pods;
kloop only writes the job and reads what the operator writes back. Progress is the job's
conditions, read through a watch (``Kube.watch`` resumes dropped watches and relists after
410 Gone), never by polling in a sleep loop or by parsing pod logs. Logs are a best-effort
side channel: a cluster without them (or this test apiserver, which has no kubelet) follows
the job all the same.

Phases use the PyTorchJob vocabulary for both kinds, so the CLI prints one language::

    Pending     no condition yet (the operator has not seen the job)
    Created     Running     Restarting     Suspended
    Succeeded   Failed      (terminal)

A TrainJob's ``Complete`` is reported as ``Succeeded``; it has no Running condition, so a
TrainJob is ``Running`` once one of its child Jobs is active.

A spec with ``code`` (a packed directory, ``trainer.code``) is submitted as two objects: the
ConfigMap ``<job>-code`` holding the archive, created first (a pod never waits for a missing
volume), then the job; the archive is packed again here and must have the spec's sha256, else
nothing is applied (the directory changed since the spec was made). Once the job exists the
ConfigMap gets the job as its ownerReference, so the garbage collector deletes it with the job
(``ttlSecondsAfterFinished`` included) even when this process is gone. ``run_on_kubernetes``
deletes it itself when the job ends; ``cancel`` deletes it with the job. A lost connection while
following does not: the job may still be running, and its restarted pods need the ConfigMap.

Errors::

    TrainingError                 any failure of a job kloop follows
    ├── UnsupportedSpec           (also ValueError) the spec cannot run in a cluster; nothing applied
    ├── TrainingJobFailed         the operator set Failed; ``message`` is the condition's
    ├── TrainingDeadlineExceeded  the deadline passed; the job was cancelled
    └── TrainingCancelled         the job was deleted while being followed

Kubernetes API errors (``deploy.cluster.kube.Invalid`` for a 422, ``Conflict`` for a job name in use)
pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from deploy.cluster.kube import (
    KINDS,
    Conflict,
    Forbidden,
    Kind,
    Kube,
    KubeError,
    NotFound,
    Obj,
    kind_of,
)
from kloop.artifact import ArtifactError, Manifest, Registry, registry_path
from trainer import code as packed
from trainer import job_manifests as render
from trainer.spec import TrainSpec

log = logging.getLogger(__name__)

JobKind = Literal["pytorchjob", "trainjob"]
JOB_KINDS: tuple[str, ...] = get_args(JobKind)

TERMINAL = ("Succeeded", "Failed")
PENDING = "Pending"

# The operator names pods and Services ``<job>-<replica type>-<index>`` (e.g. ``-worker-12``,
# 11 characters), and a Service name is a DNS-1035 label of at most 63: 50 leaves room.
_JOB_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,48}[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

CONFIGMAP = KINDS["ConfigMap"]

_POD_POLL_S = 1.0  # how often the log streamer looks for the master pod (a thread, not follow)


class TrainingError(Exception):
    """A training job on Kubernetes did not succeed."""


class UnsupportedSpec(TrainingError, ValueError):
    """The spec is valid but cannot run as the asked kind of job; nothing was applied."""


class TrainingJobFailed(TrainingError):
    def __init__(self, name: str, message: str, reason: str = ""):
        super().__init__(f"training job {name} failed: {message or reason or 'no message'}")
        self.name = name
        self.message = message
        self.reason = reason


class TrainingDeadlineExceeded(TrainingError):
    def __init__(self, name: str, deadline_s: float, phase: str):
        super().__init__(f"training job {name} still {phase} after its deadline of {deadline_s:g} s; cancelled")
        self.name = name
        self.deadline_s = deadline_s
        self.phase = phase


class TrainingCancelled(TrainingError):
    def __init__(self, name: str):
        super().__init__(f"training job {name} was deleted while it was being followed")
        self.name = name


def job_kind(kind: str) -> Kind:
    """The API kind for ``"pytorchjob"`` or ``"trainjob"``."""
    if kind == "pytorchjob":
        return KINDS["PyTorchJob"]
    if kind == "trainjob":
        return KINDS["TrainJob"]
    raise ValueError(f"job kind must be one of {JOB_KINDS}, got {kind!r}")


# ---- submit --------------------------------------------------------------------------------


def check_cluster_spec(spec: TrainSpec, *, name: str, run_id: str, kind: str) -> None:
    """Reject what ``TrainSpec`` allows locally but cannot work as a job in a cluster.
    Raises ``UnsupportedSpec`` with the field and the reason."""
    job_kind(kind)
    problems = []
    if not _JOB_NAME_RE.match(name):
        problems.append(f"job name {name!r}: use 1-50 lower-case letters, digits or '-', starting with a "
                        "letter (the operator derives pod and Service names from it)")
    if not _LABEL_VALUE_RE.match(run_id):
        problems.append(f"run id {run_id!r}: it becomes a label value (1-63 letters, digits, '-', '_', '.')")
    if kind == "trainjob" and spec.elastic is not None:
        problems.append("elastic training needs a PyTorchJob: TrainJob v1alpha1 has no elastic policy")
    if spec.device == "cuda" and spec.resources.gpus == 0:
        problems.append("device='cuda' but resources.gpus=0: the pods would be scheduled without a GPU")
    try:
        registry = registry_path(spec.storage.registry_uri)
    except ValueError:
        problems.append(f"storage.registry_uri {spec.storage.registry_uri!r}: the trainer publishes to a "
                        "file:// path on the shared volume only")
    else:
        mount = Path(spec.storage.mount_path)
        if registry != mount and mount not in registry.parents:
            problems.append(f"storage.registry_uri {spec.storage.registry_uri!r} is outside storage.mount_path "
                            f"{spec.storage.mount_path!r}: the version would be written into the pod's own "
                            "filesystem and vanish with it")
    if kind == "pytorchjob" and not spec.storage.pvc_claim:
        problems.append("storage.pvc_claim is not set: the pods would publish into an emptyDir that vanishes "
                        "with them; name a ReadWriteMany PVC that serving can mount too")
    if problems:
        raise UnsupportedSpec(f"cannot run {kind} {name!r}: " + "; ".join(problems))


def render_job(spec: TrainSpec, *, name: str, run_id: str, kind: str, namespace: str) -> Obj:
    """The manifest ``submit`` would create (checked first); for ``--dry-run`` style output."""
    check_cluster_spec(spec, name=name, run_id=run_id, kind=kind)
    if kind == "trainjob":
        return render.render_trainjob(spec, name=name, namespace=namespace, run_id=run_id)
    return render.render_pytorchjob(spec, name=name, namespace=namespace, run_id=run_id)


def code_archive(spec: TrainSpec) -> bytes | None:
    """``spec.code``'s directory packed (``trainer.code.pack``), or None without code. Raises
    ``UnsupportedSpec`` when it cannot be packed or its digest is not the spec's."""
    if spec.code is None:
        return None
    try:
        archive = packed.pack(Path(spec.code.path))
    except (packed.CodeError, OSError) as e:
        raise UnsupportedSpec(f"code {spec.code.path}: {e}") from e
    actual = hashlib.sha256(archive).hexdigest()
    if actual != spec.code.sha256:
        raise UnsupportedSpec(f"code {spec.code.path} changed since the spec was made: it packs to sha256 "
                              f"{actual}, the spec says {spec.code.sha256}; make the spec again to run "
                              "what is there now")
    return archive


def render_objects(spec: TrainSpec, *, name: str, run_id: str, kind: str, namespace: str) -> list[Obj]:
    """Everything ``submit`` would create, in order: the code ConfigMap (when ``spec.code`` is
    set) and the job; for ``--dry-run`` output (``render.to_yaml`` of the list)."""
    job = render_job(spec, name=name, run_id=run_id, kind=kind, namespace=namespace)
    archive = code_archive(spec)
    if archive is None:
        return [job]
    cm = render.render_code_configmap(spec, name=name, namespace=namespace, run_id=run_id, archive=archive)
    return [cm, job]


def submit(kube: Kube, spec: TrainSpec, *, name: str, run_id: str, kind: JobKind = "pytorchjob",
           namespace: str | None = None) -> Obj:
    """Create the job (after its code ConfigMap, when the spec has code); returns the job the
    server stored. Raises ``UnsupportedSpec`` before anything is applied, ``kube.Invalid`` (the
    server's 422 message) when the server rejects it, ``kube.Conflict`` when a job (or code
    ConfigMap) of that name exists (run ids are never reused). A job the server refuses leaves
    no ConfigMap behind."""
    ns = namespace or kube.namespace
    objs = render_objects(spec, name=name, run_id=run_id, kind=kind, namespace=ns)
    if len(objs) == 1:
        return kube.create(objs[0], ns)
    cm, job = objs
    try:
        kube.create(cm, ns)
    except Conflict as e:
        raise Conflict(f"ConfigMap {ns}/{cm['metadata']['name']} exists: job name {name} is in use, or "
                       f"it is left from an earlier job of that name (kloop train cancel {name} "
                       "removes it)", e.status) from e
    try:
        created = kube.create(job, ns)
    except Conflict:
        _delete_code_quietly(kube, name, ns)  # the name was taken before: not this run's job
        raise
    except BaseException:
        _after_failed_create(kube, job, run_id, ns)
        raise
    _owned_by(kube, cm["metadata"]["name"], created, ns)
    return created


def _after_failed_create(kube: Kube, job: Obj, run_id: str, namespace: str) -> None:
    """The job's create failed or was interrupted: keep the code ConfigMap only if the job was
    created all the same (the answer was lost), making it the owner; otherwise delete it."""
    name = job["metadata"]["name"]
    try:
        found = kube.get(kind_of(job), name, namespace)
    except NotFound:
        found = None
    except KubeError as e:
        log.warning("cannot tell whether %s %s exists (%s); its code ConfigMap is kept", job["kind"], name, e)
        return
    if found is not None and (found["metadata"].get("labels") or {}).get("kloop.dev/run-id") == run_id:
        _owned_by(kube, render.code_configmap_name(name), found, namespace)
    else:
        _delete_code_quietly(kube, name, namespace)


def _owned_by(kube: Kube, cm_name: str, job: Obj, namespace: str) -> None:
    """Make the job the ConfigMap's owner: the garbage collector deletes it with the job. Best
    effort: without it the ConfigMap is still deleted when kloop sees the job end."""
    ref = {"apiVersion": job["apiVersion"], "kind": job["kind"], "name": job["metadata"]["name"],
           "uid": job["metadata"]["uid"]}
    try:
        kube.patch(CONFIGMAP, cm_name, {"metadata": {"ownerReferences": [ref]}}, namespace)
    except KubeError as e:
        log.warning("could not make %s %s the owner of ConfigMap %s: %s", job["kind"],
                    job["metadata"]["name"], cm_name, e)


def delete_code(kube: Kube, name: str, namespace: str | None = None) -> bool:
    """Delete job ``name``'s code ConfigMap when it is kloop's (labelled for that job); True
    when one was deleted. Idempotent; a ConfigMap of that name that is not kloop's is kept."""
    cm_name = render.code_configmap_name(name)
    try:
        cm = kube.get(CONFIGMAP, cm_name, namespace)
    except NotFound:
        return False
    found = cm["metadata"].get("labels") or {}
    if found.get("app.kubernetes.io/managed-by") != "kloop" or found.get("app.kubernetes.io/instance") != name:
        log.warning("ConfigMap %s is not kloop's code for job %s; leaving it", cm_name, name)
        return False
    # Background: nothing depends on it, and a Foreground delete waits for a garbage collector.
    kube.delete(CONFIGMAP, cm_name, namespace, propagation="Background")
    return True


def _delete_code_quietly(kube: Kube, name: str, namespace: str | None) -> None:
    try:
        delete_code(kube, name, namespace)
    except Forbidden as e:  # RBAC without configmaps: fine for jobs without code, which is most
        log.debug("cannot look for a code ConfigMap of %s: %s", name, e)
    except KubeError as e:
        log.warning("could not delete the code ConfigMap of %s (the garbage collector removes it "
                    "with the job): %s", name, e)


# ---- phase ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Phase:
    phase: str  # see the module docstring
    message: str = ""  # the deciding condition's message ("" when none)
    reason: str = ""


def phase_of(job: Mapping[str, Any]) -> Phase:
    """The job's phase from its status, for either kind (see the module docstring)."""
    status = job.get("status") or {}
    conds = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    by_type = {c.get("type"): c for c in conds}
    is_trainjob = job.get("kind") == "TrainJob"

    def ph(name: str, c: Mapping[str, Any]) -> Phase:
        return Phase(name, c.get("message") or "", c.get("reason") or "")

    # Terminal conditions win over anything else still True (the operator sets Running to
    # False on the way out, but a status written by someone else need not).
    if "Failed" in by_type:
        return ph("Failed", by_type["Failed"])
    for done in ("Complete", "Succeeded") if is_trainjob else ("Succeeded",):
        if done in by_type:
            return ph("Succeeded", by_type[done])
    if is_trainjob and "Suspended" not in by_type and any(
            (j.get("active") or 0) > 0 for j in status.get("jobsStatus") or []):
        return Phase("Running")
    if not conds:
        return Phase(PENDING)
    # The operator appends each new condition at the end: the last True one is the latest.
    return ph(conds[-1].get("type") or PENDING, conds[-1])


# ---- follow --------------------------------------------------------------------------------


def master_pod(kube: Kube, name: str, namespace: str | None = None, kind: str = "pytorchjob") -> Obj | None:
    """The pod whose log is the job's log: the PyTorchJob's Master (Worker 0 for elastic jobs,
    which have no Master), or the TrainJob's node 0. ``None`` while there is none."""
    if kind == "trainjob":
        selectors = [f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
                     "batch.kubernetes.io/job-completion-index=0"]
    else:
        base = f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-index=0"
        # v1.9 labels replica types in lower case; earlier releases used "Master"/"Worker".
        selectors = [f"{base},training.kubeflow.org/replica-type in (master,Master)",
                     f"{base},training.kubeflow.org/replica-type in (worker,Worker)"]
    for sel in selectors:
        items = kube.list(KINDS["Pod"], namespace, label_selector=sel).get("items", [])
        live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
        if live:
            newest: Obj = max(live, key=lambda p: p["metadata"].get("creationTimestamp") or "")
            return newest
    return None


class _LogStreamer:
    """Streams the master pod's log to ``on_log`` in a daemon thread, best effort.

    Each container start (pod uid, restart count) is streamed once; a pod that is not running
    yet, a log the kubelet cannot serve, or an API error is reported once per pod and retried
    on the next poll. It never raises into ``follow``.
    """

    def __init__(self, kube: Kube, name: str, namespace: str, kind: str, on_log: Callable[[str], None]):
        self._kube, self._name, self._ns, self._kind = kube, name, namespace, kind
        self._on_log = on_log
        self._stop = threading.Event()
        self._streamed: set[tuple[str, int]] = set()
        self._reported: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=f"kloop-logs-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait_s: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(wait_s)  # a blocked log read ends with the pod; the thread is a daemon

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
            except Exception as e:  # noqa: BLE001 - best effort by design; follow must not die of logs
                log.debug("log streaming of %s: %s", self._name, e)
            self._stop.wait(_POD_POLL_S)

    def _once(self) -> None:
        pod = master_pod(self._kube, self._name, self._ns, self._kind)
        if pod is None or (pod.get("status") or {}).get("phase") not in ("Running", "Succeeded", "Failed"):
            return
        meta = pod["metadata"]
        key = (meta.get("uid", ""), _restarts(pod))
        if key in self._streamed:
            return
        try:
            for line in self._kube.pod_log(meta["name"], self._ns, container=render.CONTAINER_NAME):
                self._on_log(line)
                if self._stop.is_set():
                    return
        except KubeError as e:
            if meta.get("uid", "") not in self._reported:
                self._reported.add(meta.get("uid", ""))
                self._on_log(f"[kloop] logs of pod {meta['name']} unavailable ({e}); following status only")
            return
        self._streamed.add(key)


def _restarts(pod: Obj) -> int:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return sum(int(s.get("restartCount") or 0) for s in statuses if s.get("name") == render.CONTAINER_NAME)


def follow(kube: Kube, name: str, namespace: str | None = None, kind: JobKind = "pytorchjob", *,
           deadline_s: float | None = None, on_phase: Callable[[str, str], None] = lambda p, m: None,
           on_log: Callable[[str], None] | None = None,
           clock: Callable[[], float] = time.monotonic) -> str:
    """Follow the job until it ends; returns ``"Succeeded"``.

    Calls ``on_phase(phase, message)`` for the first phase seen and on every change; streams the
    master pod's log lines to ``on_log`` when given. Raises ``TrainingJobFailed`` (with the
    Failed condition's message), ``TrainingDeadlineExceeded`` after cancelling the job when
    ``deadline_s`` (seconds from now, by ``clock``) passes first, ``TrainingCancelled`` when the
    job is deleted meanwhile, ``kube.NotFound`` when there is no such job.
    """
    ns = namespace or kube.namespace
    api_kind = job_kind(kind)
    kube.get(api_kind, name, ns)  # NotFound now rather than an endless wait for an ADDED
    deadline = None if deadline_s is None else clock() + deadline_s
    streamer = _LogStreamer(kube, name, ns, kind, on_log) if on_log else None
    if streamer:
        streamer.start()
    last: Phase | None = None
    try:
        while True:
            remaining = None if deadline is None else deadline - clock()
            if remaining is not None and remaining <= 0:
                cancel(kube, name, ns, kind)
                raise TrainingDeadlineExceeded(name, deadline_s or 0.0, last.phase if last else PENDING)
            for etype, job in kube.watch(api_kind, ns, name=name, timeout_s=remaining,
                                         stop=None if deadline is None else (lambda: clock() >= deadline)):
                if etype == "DELETED" or job.get("metadata", {}).get("deletionTimestamp"):
                    raise TrainingCancelled(name)
                current = phase_of(job)
                if current != last:
                    last = current
                    on_phase(current.phase, current.message)
                if current.phase == "Failed":
                    raise TrainingJobFailed(name, current.message, current.reason)
                if current.phase == "Succeeded":
                    return current.phase
    finally:
        if streamer:
            streamer.stop()


# ---- cancel --------------------------------------------------------------------------------


def cancel(kube: Kube, name: str, namespace: str | None = None, kind: JobKind = "pytorchjob") -> bool:
    """Delete the job with Foreground propagation (its pods go first, then the job), and its
    code ConfigMap, best effort (also one left without a job). Idempotent: returns False when
    there was no such job (or it is already being deleted)."""
    api_kind = job_kind(kind)
    try:
        job = kube.get(api_kind, name, namespace)
    except NotFound:
        _delete_code_quietly(kube, name, namespace)
        return False
    kube.delete(api_kind, name, namespace, propagation="Foreground")
    _delete_code_quietly(kube, name, namespace)
    return not job["metadata"].get("deletionTimestamp")


# ---- results -------------------------------------------------------------------------------


def find_published(registry: Registry, model: str, run_id: str) -> Manifest | None:
    """The version of ``model`` that training run ``run_id`` published, verified (every file's
    sha256), or None. Newest first: a restarted job publishes at most once per success."""
    for version in reversed(registry.versions(model)):
        try:
            if registry.manifest(model, version).run_id == run_id:
                return registry.verify(model, version)
        except ArtifactError as e:
            log.warning("skipping %s v%s in %s: %s", model, version, registry.root, e)
    return None


def local_registry(spec: TrainSpec) -> Registry | None:
    """The pods' registry, when it is readable from this machine at the same path (a file://
    URI whose directory exists here, e.g. the PVC mounted where the pods mount it)."""
    try:
        root = registry_path(spec.storage.registry_uri)
    except ValueError:
        return None
    return Registry(root) if root.is_dir() else None


def run_on_kubernetes(kube: Kube, spec: TrainSpec, *, name: str, run_id: str, kind: JobKind = "pytorchjob",
                      namespace: str | None = None, deadline_s: float | None = None,
                      out: Callable[[str], None] = print, logs: bool = True,
                      registry: Registry | None = None,
                      clock: Callable[[], float] = time.monotonic) -> Manifest | None:
    """Submit, follow to the end, and return the version the pods published: what
    ``kloop train --target kubernetes`` does. Ctrl-C cancels the job and re-raises. When the
    job has ended (succeeded, failed, deleted, past the deadline) its code ConfigMap is deleted.

    ``registry``: where the pods' registry is readable from here (default: the spec's
    ``registry_uri`` when that path exists here); None when it is not, with a note to ``out``.
    """
    ns = namespace or kube.namespace
    job = submit(kube, spec, name=name, run_id=run_id, kind=kind, namespace=ns)
    out(f"submitted {job['kind']} {ns}/{name} (run {run_id})")

    def on_phase(phase: str, message: str) -> None:
        out(f"{job['kind']} {name}: {phase}" + (f": {message}" if message else ""))

    try:
        follow(kube, name, ns, kind, deadline_s=deadline_s, on_phase=on_phase,
               on_log=out if logs else None, clock=clock)
    except KeyboardInterrupt:
        out(f"interrupted: cancelling {job['kind']} {ns}/{name}")
        cancel(kube, name, ns, kind)
        raise
    except TrainingError:
        if spec.code is not None:  # the job is over; nothing will mount its code again
            _delete_code_quietly(kube, name, ns)
        raise
    if spec.code is not None:
        _delete_code_quietly(kube, name, ns)
    reg = registry or local_registry(spec)
    if reg is None:
        out(f"the registry {spec.storage.registry_uri} is not readable from here; the published "
            f"version carries run id {run_id}")
        return None
    manifest = find_published(reg, spec.model_name, run_id)
    if manifest is None:
        out(f"no version of {spec.model_name} from run {run_id} in {reg.root}")
    else:
        out(f"published {manifest.name} v{manifest.version} (run {run_id})")
    return manifest
