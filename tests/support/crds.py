"""Validate manifests against the real upstream CRDs in ../shared/crds (jsonschema on each
CRD version's openAPIV3Schema). Tests call ``validate(obj)``; it skips with a reason when the
shared CRDs are absent (set KLOOP_SHARED to point elsewhere)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.paths import REPO


def shared_dir() -> Path:
    return Path(os.environ.get("KLOOP_SHARED", REPO.parent / "shared"))


@functools.cache
def _schemas() -> dict[tuple[str, str], dict[str, Any]]:
    crds = shared_dir() / "crds"
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for f in sorted(crds.glob("*.yaml")):
        for doc in yaml.load_all(f.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                if v.get("served", True):
                    out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = v["schema"][
                        "openAPIV3Schema"
                    ]
    return out


def validate(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when ``obj`` does not match its CRD's schema."""
    if not (shared_dir() / "crds").is_dir():
        pytest.skip(f"shared CRDs not found at {shared_dir() / 'crds'} (set KLOOP_SHARED)")
    key = (obj["apiVersion"], obj["kind"])
    schemas = _schemas()
    if key not in schemas:
        raise AssertionError(f"no CRD in {shared_dir() / 'crds'} serves {key}; have {sorted(schemas)}")
    jsonschema.validate(obj, schemas[key], cls=jsonschema.Draft4Validator)
    unknown = list(_unknown_fields(obj, schemas[key], ""))
    if unknown:
        # An API server would prune these silently: a typo would vanish instead of failing.
        raise AssertionError(f"{key}: fields not in the CRD schema: {unknown}")


def _unknown_fields(value: Any, schema: dict[str, Any], path: str):
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        if path == ".metadata" or schema.get("x-kubernetes-preserve-unknown-fields"):
            return
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                yield from _unknown_fields(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                yield from _unknown_fields(v, extra, f"{path}.{k}")
            elif props is not None and extra is not True:
                yield f"{path}.{k}"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            yield from _unknown_fields(v, schema["items"], f"{path}[{i}]")
