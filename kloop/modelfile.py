"""Load a ``torch.export`` archive (``.pt2``) without ever running pickle on its contents.

``torch.export.load`` is only pickle-free for archives that ``torch.export.save`` wrote for
plain tensors. The format also allows entries that it loads with ``pickle``/``torch.load(
weights_only=False)``: weights or constants marked ``use_pickle``, custom/opaque objects,
legacy ``data/weights/<model>.pt`` files, AOTInductor payloads, and sample inputs (where a
failed ``weights_only=True`` load falls back to full unpickling). A version's sha256 proves
its files are the ones published, not who wrote them, so the loader must refuse such entries
itself: every entry of the archive is checked against an allow-list BEFORE torch sees it.

Both the server (``serving``) and the trainer's evaluation load models through this module,
so the rule is written once.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

# Entries (relative to the archive's root folder) that carry no code. Weights and tensor
# constants are raw bytes described by JSON; models/*.json is the serialized graph.
_ALLOWED = re.compile(
    r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json"
    r"|data/weights/[\w.-]+_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/[\w.-]+_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/[\w.-]+\.pt"
    r"|extra/[\w./-]+)$"
)
_PAYLOAD_NAME = {"weights": re.compile(r"^weight_\d+$"), "constants": re.compile(r"^tensor_\d+$")}


class UnsafeModelFile(Exception):
    """The archive holds something that would be unpickled (or is not a torch.export archive)."""


def check_export_archive(path: str | Path) -> None:
    """Raise ``UnsafeModelFile`` unless every entry of ``path`` is data, never code."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            roots = {n.split("/", 1)[0] for n in names}
            if len(roots) != 1 or any("/" not in n for n in names):
                raise UnsafeModelFile(f"{path}: not a torch.export archive (expected one root folder)")
            for name in names:
                rel = name.split("/", 1)[1]
                if not _ALLOWED.match(rel):
                    raise UnsafeModelFile(f"{path}: entry {rel!r} is not allowed (it could be unpickled)")
                if rel.endswith("_config.json"):
                    _check_payload_config(path, rel, json.loads(z.read(name)))
                elif rel.startswith("data/sample_inputs/"):
                    _check_weights_only(path, rel, z.read(name))
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError, OSError) as e:
        raise UnsafeModelFile(f"{path}: unreadable torch.export archive: {e}") from e


def _check_payload_config(path: str | Path, rel: str, doc: Any) -> None:
    kind = "weights" if rel.startswith("data/weights/") else "constants"
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise UnsafeModelFile(f"{path}: {rel} has no 'config' mapping")
    for fqn, meta in config.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise UnsafeModelFile(f"{path}: {kind} entry {fqn!r} is pickled")
        if not _PAYLOAD_NAME[kind].match(str(meta.get("path_name", ""))):
            raise UnsafeModelFile(f"{path}: {kind} entry {fqn!r} is not a plain tensor payload")


def _check_weights_only(path: str | Path, rel: str, data: bytes) -> None:
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # any failure means torch would fall back to full unpickling
        raise UnsafeModelFile(f"{path}: {rel} needs full unpickling: {e}") from e


def load_exported(path: str | Path) -> Any:
    """The callable module of a checked ``torch.export`` archive."""
    import torch

    check_export_archive(path)
    return torch.export.load(str(path)).module()
