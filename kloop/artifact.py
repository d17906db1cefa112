"""The artifact format and the registry: the one contract shared by trainer, serving and deploy.

Layout of a registry (a plain directory; ``file://`` URIs map onto it)::

    <root>/<model>/<version>/manifest.json      what the version is (see ``Manifest``)
    <root>/<model>/<version>/MANIFEST.sha256    sha256 of manifest.json
    <root>/<model>/<version>/<files...>         every file listed, with its sha256, in the manifest
    <root>/<model>/aliases/<alias>.json         {"version": N, "digest": ..., "updated": ...}
    <root>/<model>/.staging-*                   versions being written; never read

Why this shape:

* A version is written into a staging directory on the same filesystem and renamed into place,
  so a reader sees either nothing or the whole version, never half of it. Renaming onto an
  existing, non-empty version directory fails, so two concurrent publishers cannot share a
  version number: the loser retries with the next one.
* A version is immutable: its manifest lists the sha256 of every file, and ``verify`` refuses a
  version where any byte differs, a file is missing or an unlisted file appeared.
* Aliases (``champion``, ``candidate``) are small files beside the versions, replaced atomically
  with ``os.replace``; moving an alias never touches a version.

This module knows nothing of torch: the model file's format is named in the manifest
(``torch.export`` today) and loaded by its reader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kloop.fsutil import atomic_write_bytes

MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_FILE = "MANIFEST.sha256"
ALIASES_DIR = "aliases"
SCHEMA_VERSION = 1
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
     "FP16", "FP32", "FP64", "BF16", "BYTES"}
)

# Versions published before tasks declared their metrics were all the digits CNN's.
_LEGACY_DIRECTIONS = {"accuracy": "higher", "loss": "lower"}


class ArtifactError(Exception):
    """Root of the registry's errors."""


class VersionNotFound(ArtifactError):
    """The model, version or alias does not exist."""


class ArtifactCorrupt(ArtifactError):
    """A version's files do not match its manifest (a flipped byte, a missing or extra file)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's signature. ``-1`` in ``shape`` means any size (batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"unknown datatype {self.datatype!r}; expected one of {sorted(DATATYPES)}")
        if any(d < -1 for d in self.shape):
            raise ValueError(f"shape {self.shape} of {self.name!r}: dimensions are >= 0 or -1")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), datatype=str(d["datatype"]), shape=tuple(int(x) for x in d["shape"]))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a published version is. Written once, by ``Registry.publish``; never edited."""

    name: str
    version: int
    created: float  # unix seconds
    framework: str  # "pytorch"
    torch_version: str
    format: str  # how ``model_file`` is stored: "torch.export"
    model_file: str  # relative path inside the version directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metrics: Mapping[str, Any]  # evaluation on the held-out split
    params: Mapping[str, Any]  # training parameters
    data_fingerprint: str  # sha256 of the held-out split's definition and contents
    run_id: str  # the training run that produced it
    files: Mapping[str, str]  # relative path -> sha256 hex, every file but the manifest
    schema: int = SCHEMA_VERSION
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # How the metrics are judged, as the task declared: {"primary": NAME, "metrics": {NAME:
    # {"direction": "higher" | "lower", "threshold": float | None}}}. Empty in versions
    # published before tasks declared it (``primary_metric`` and ``direction`` then answer
    # for the digits CNN they all were).
    evaluation: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Where the version came from: task reference, code digest or image, config, data
    # fingerprint, run id (``trainer.publish`` writes it).
    lineage: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def primary_metric(self) -> str:
        """The metric the gate judges by default."""
        return str(self.evaluation.get("primary") or "accuracy")

    def direction(self, metric: str) -> str | None:
        """"higher" or "lower" (which is better) for ``metric``, None when not declared."""
        declared = self.evaluation.get("metrics", {}).get(metric)
        if isinstance(declared, Mapping):
            d = declared.get("direction")
            return d if d in ("higher", "lower") else None
        if self.evaluation:
            return None
        return _LEGACY_DIRECTIONS.get(metric)

    def threshold(self, metric: str) -> float | None:
        """The task's absolute floor ("higher") or ceiling ("lower") for ``metric``, if any."""
        declared = self.evaluation.get("metrics", {}).get(metric)
        t = declared.get("threshold") if isinstance(declared, Mapping) else None
        return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        d["metrics"] = dict(self.metrics)
        d["params"] = dict(self.params)
        d["files"] = dict(sorted(self.files.items()))
        d["labels"] = dict(self.labels)
        d["evaluation"] = dict(self.evaluation)
        d["lineage"] = dict(self.lineage)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        try:
            m = cls(
                name=str(d["name"]),
                version=int(d["version"]),
                created=float(d["created"]),
                framework=str(d["framework"]),
                torch_version=str(d["torch_version"]),
                format=str(d["format"]),
                model_file=str(d["model_file"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                metrics=dict(d["metrics"]),
                params=dict(d["params"]),
                data_fingerprint=str(d["data_fingerprint"]),
                run_id=str(d["run_id"]),
                files=dict(d["files"]),
                schema=int(d.get("schema", SCHEMA_VERSION)),
                labels=dict(d.get("labels", {})),
                evaluation=dict(d.get("evaluation", {})),
                lineage=dict(d.get("lineage", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactCorrupt(f"manifest is malformed: {e}") from e
        unsafe = [f for f in m.files if Path(f).is_absolute() or ".." in Path(f).parts]
        if unsafe:
            raise ArtifactCorrupt(f"manifest lists files outside the version directory: {unsafe}")
        if m.model_file not in m.files:
            # Only hashed files may be loaded: the model file must be one of them.
            raise ArtifactCorrupt(f"manifest's model_file {m.model_file!r} is not among its hashed files")
        return m

    @property
    def digest(self) -> str:
        """sha256 of the canonical manifest: identifies the version's exact content."""
        return hashlib.sha256(_canonical(self.to_dict())).hexdigest()


def _canonical(d: Mapping[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, indent=2).encode() + b"\n"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} is not valid: use 1-63 lower-case letters, digits, '.', '_' or '-'"
            " (a Kubernetes-friendly name)"
        )
    return name


def registry_path(uri: str | os.PathLike[str]) -> Path:
    """The local directory for a registry URI: a path or ``file://``. Other schemes are cluster
    storage (``s3://``, ``gs://``, ``pvc://``) that only the cluster backends understand."""
    s = os.fspath(uri)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if "://" in s:
        raise ValueError(f"registry {s!r}: only local paths and file:// URIs can be read from this machine")
    return Path(s).expanduser()


class Registry:
    """A directory of immutable, checksummed model versions with aliases."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = registry_path(root)

    # ---- reading -------------------------------------------------------------------------

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def versions(self, name: str) -> list[int]:
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isascii() and p.name.isdigit() and p.is_dir())

    def path(self, name: str, version: int) -> Path:
        p = self.root / check_name(name) / str(int(version))
        if not p.is_dir():
            raise VersionNotFound(f"model {name!r} has no version {version} in {self.root}")
        return p

    def manifest(self, name: str, version: int) -> Manifest:
        """The manifest, after checking it against MANIFEST.sha256 (not the other files)."""
        m = read_manifest(self.path(name, version), f"{name} v{version}")
        if m.name != name or m.version != int(version):
            raise ArtifactCorrupt(f"{name} v{version}: manifest says {m.name} v{m.version}")
        return m

    def verify(self, name: str, version: int) -> Manifest:
        """The manifest, after checking the sha256 of every file and that no file was added."""
        m = self.manifest(name, version)
        _verify_files(self.path(name, version), m, f"{name} v{version}")
        return m

    def resolve(self, name: str, ref: str | int) -> int:
        """A version number from ``3``, ``"3"``, ``"latest"`` or an alias name."""
        if isinstance(ref, int) or (str(ref).isascii() and str(ref).isdigit()):
            v = int(ref)
            self.path(name, v)
            return v
        if ref == "latest":
            vs = self.versions(name)
            if not vs:
                raise VersionNotFound(f"model {name!r} has no versions in {self.root}")
            return vs[-1]
        alias = self.alias(name, str(ref))
        if alias is None:
            raise VersionNotFound(f"model {name!r} has no alias {ref!r}")
        return alias

    def alias(self, name: str, alias: str) -> int | None:
        p = self.root / check_name(name) / ALIASES_DIR / f"{_check_alias(alias)}.json"
        try:
            return _alias_version(p)
        except FileNotFoundError:
            return None

    def aliases(self, name: str) -> dict[str, int]:
        d = self.root / check_name(name) / ALIASES_DIR
        if not d.is_dir():
            return {}
        return {p.stem: _alias_version(p) for p in sorted(d.glob("*.json"))}

    # ---- writing -------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> None:
        _check_alias(alias)
        m = self.manifest(name, version)
        d = self.root / name / ALIASES_DIR
        d.mkdir(parents=True, exist_ok=True)
        body = {"version": m.version, "digest": m.digest, "updated": time.time()}
        atomic_write_bytes(d / f"{alias}.json", _canonical(body))

    def remove_alias(self, name: str, alias: str) -> None:
        (self.root / check_name(name) / ALIASES_DIR / f"{_check_alias(alias)}.json").unlink(missing_ok=True)

    def publish(
        self,
        name: str,
        source_dir: str | os.PathLike[str],
        *,
        model_file: str,
        format: str,
        torch_version: str,
        inputs: Iterable[TensorSpec],
        outputs: Iterable[TensorSpec],
        metrics: Mapping[str, Any],
        params: Mapping[str, Any],
        data_fingerprint: str,
        run_id: str,
        labels: Mapping[str, str] | None = None,
        framework: str = "pytorch",
        evaluation: Mapping[str, Any] | None = None,
        lineage: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Copy ``source_dir``'s files into a new version, atomically. Returns its manifest."""
        check_name(name)
        src = Path(source_dir)
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(model_dir)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        try:
            shutil.copytree(src, staging, dirs_exist_ok=True)
            files = {
                str(f.relative_to(staging)): sha256_file(f)
                for f in sorted(staging.rglob("*"))
                if f.is_file()
            }
            if model_file not in files:
                raise ValueError(f"model file {model_file!r} is not in {src}")
            reserved = {MANIFEST_FILE, MANIFEST_DIGEST_FILE} & set(files)
            if reserved:
                raise ValueError(f"{src} must not contain {sorted(reserved)}")
            for attempt in range(100):
                version = (self.versions(name) or [0])[-1] + 1
                manifest = Manifest(
                    name=name, version=version, created=time.time(), framework=framework,
                    torch_version=torch_version, format=format, model_file=model_file,
                    inputs=tuple(inputs), outputs=tuple(outputs), metrics=dict(metrics),
                    params=dict(params), data_fingerprint=data_fingerprint, run_id=run_id,
                    files=files, labels=dict(labels or {}),
                    evaluation=dict(evaluation or {}), lineage=dict(lineage or {}),
                )
                raw = _canonical(manifest.to_dict())
                (staging / MANIFEST_FILE).write_bytes(raw)
                (staging / MANIFEST_DIGEST_FILE).write_text(hashlib.sha256(raw).hexdigest() + "\n")
                _fsync_tree(staging)
                try:
                    os.rename(staging, model_dir / str(version))
                except OSError:
                    if (model_dir / str(version)).exists():
                        continue  # another publisher took this number; take the next
                    raise
                _fsync_dir(model_dir)
                return manifest
            raise ArtifactError(f"could not allocate a version for {name!r} after {attempt + 1} tries")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def verify_dir(path: str | os.PathLike[str]) -> Manifest:
    """Verify ONE version directory outside a registry (what KServe's storage initializer puts
    in ``/mnt/models``): the same checks as ``Registry.verify`` -- manifest against
    MANIFEST.sha256, the sha256 of every listed file, no file missing or added. The name and
    version come from the manifest, since the directory's own name means nothing there."""
    p = Path(path)
    if not p.is_dir():
        raise VersionNotFound(f"{p} is not a directory")
    m = read_manifest(p, str(p))
    _verify_files(p, m, f"{m.name} v{m.version} in {p}")
    return m


def read_manifest(p: Path, what: str) -> Manifest:
    """``p``'s manifest, checked against MANIFEST.sha256; ``what`` names it in errors."""
    raw = _read_bytes(p / MANIFEST_FILE)
    want = _read_bytes(p / MANIFEST_DIGEST_FILE).decode(errors="replace").strip()
    if hashlib.sha256(raw).hexdigest() != want:
        raise ArtifactCorrupt(f"{what}: manifest.json does not match MANIFEST.sha256")
    try:
        return Manifest.from_dict(json.loads(raw))
    except json.JSONDecodeError as e:
        raise ArtifactCorrupt(f"{what}: manifest.json is not JSON: {e}") from e


def _verify_files(p: Path, m: Manifest, what: str) -> None:
    present = {str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()} - {
        MANIFEST_FILE, MANIFEST_DIGEST_FILE}
    missing = sorted(set(m.files) - present)
    extra = sorted(present - set(m.files))
    if missing or extra:
        raise ArtifactCorrupt(f"{what}: missing files {missing}, unlisted files {extra}")
    for rel, want in m.files.items():
        if sha256_file(p / rel) != want:
            raise ArtifactCorrupt(f"{what}: sha256 of {rel} does not match the manifest")


STAGING_MAX_AGE_S = 24 * 3600  # a publisher still copying after a day has died


def _remove_abandoned_staging(model_dir: Path) -> None:
    """Staging directories of publishers that died (crash, kill -9) are never read; old ones
    are removed so they do not pile up. Young ones may belong to a live publisher."""
    cutoff = time.time() - STAGING_MAX_AGE_S
    for d in model_dir.glob(".staging-*"):
        with contextlib.suppress(OSError):
            if d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)


def _check_alias(alias: str) -> str:
    if not _ALIAS_RE.match(alias) or alias == "latest":
        raise ValueError(f"alias {alias!r} is not valid: lower-case letters, digits and '-', not 'latest'")
    return alias


def _alias_version(p: Path) -> int:
    try:
        return int(json.loads(p.read_text())["version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ArtifactCorrupt(f"alias file {p} is malformed: {e}") from e


def _read_bytes(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError as e:
        raise ArtifactCorrupt(f"{p} is missing") from e


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
