"""A run's logs on disk: the pipeline's step log and its training processes' output.

They live in the run's directory (``<home>/runs/<id>/``), so they stay readable after the
run's processes are gone, whoever ran it.
"""

from __future__ import annotations

from pathlib import Path

MAX_LOG_BYTES = 1 << 20
LOG_SOURCES = {"pipeline": "pipeline.log", "train": "train/train.log"}


def read_log(path: Path, offset: int, limit: int) -> tuple[str, int, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return "", offset, 0
    return data.decode("utf-8", "replace"), offset + len(data), size


def new_lines(path: Path, offset: int) -> tuple[list[tuple[str, int]], int]:
    """Complete lines from ``offset``: (line, offset after it) each, and the next offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(MAX_LOG_BYTES)
    except FileNotFoundError:
        return [], offset
    out = []
    at = offset
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        at += len(raw)
        out.append((raw.decode("utf-8", "replace").rstrip("\n"), at))
    return out, at
