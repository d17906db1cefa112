"""The one type for a model version in every package.

A version is the registry's number for it (1, 2, ...): an ``int``. It is text only on the wire
(OIP's ``model_version``, JSON keys, metric labels, a Kubernetes object's fields), where
``parse_version`` converts it at the edge. Dependency-free, so the pure layers may use it.
"""

from __future__ import annotations

from typing import TypeAlias

Version: TypeAlias = int


def parse_version(text: str | int) -> Version:
    """``"3"`` -> 3; ``ValueError`` for anything that is not a version number (>= 1)."""
    if isinstance(text, bool):
        raise ValueError(f"not a version number: {text!r}")
    if isinstance(text, int):
        value = text
    elif isinstance(text, str) and text.isascii() and text.isdecimal():
        value = int(text)
    else:
        raise ValueError(f"not a version number: {text!r}")
    if value < 1:
        raise ValueError(f"version numbers start at 1, got {value}")
    return value
