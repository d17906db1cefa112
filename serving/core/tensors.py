"""The bridge between the core's numpy tensors and torch, for every OIP datatype.

Numeric and BOOL arrays become tensors without a copy (``torch.from_numpy``; a read-only
buffer from ``np.frombuffer`` over request bytes is copied once, since torch wants writable
memory). BF16 arrives as ``uint16`` bit patterns and is reinterpreted as ``torch.bfloat16``
(``Tensor.view``: no copy, no rounding).

BYTES has no torch dtype. A model whose signature declares a BYTES tensor of shape ``S``
receives a ``uint8`` tensor of shape ``S + [L]``, each element's bytes zero-padded to the
longest element ``L`` (how byte-level models take text), and a BYTES output is read back the
same way: a ``uint8`` tensor ``S + [L]`` becomes ``S`` elements, each its row of ``L`` bytes
without trailing zero bytes (the inverse of the padding; so an element cannot end in NUL).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from serving.core.errors import InvalidInput
from serving.core.types import as_bytes_array, oip_datatype


def to_torch(data: np.ndarray[Any, Any], datatype: str) -> torch.Tensor:
    """A tensor for one (already shaped) input of the given OIP datatype."""
    if datatype == "BYTES":
        return _bytes_to_uint8(data)
    if not data.flags.writeable:  # np.frombuffer over request bytes
        data = data.copy()
    tensor = torch.from_numpy(data)
    return tensor.view(torch.bfloat16) if datatype == "BF16" else tensor


def from_torch(value: Any, declared: str) -> tuple[str, np.ndarray[Any, Any]]:
    """(the datatype the model produced, its core array) for one output; ``declared`` is the
    manifest's datatype, which decides how a ``uint8`` tensor is read (BYTES or UINT8). Raises
    the library's error (AttributeError, TypeError, ...) for a value that is not a tensor."""
    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return "BF16", np.ascontiguousarray(tensor.view(torch.int16).numpy().view(np.uint16))
    if declared == "BYTES" and tensor.dtype == torch.uint8 and tensor.dim() >= 1:
        return "BYTES", _uint8_to_bytes(np.ascontiguousarray(tensor.numpy()))
    array = np.ascontiguousarray(tensor.numpy())
    return oip_datatype(array.dtype), array


MAX_PADDED_BYTES = 64 << 20  # what one BYTES input may grow to once padded (the body limit)


def _bytes_to_uint8(data: np.ndarray[Any, Any]) -> torch.Tensor:
    flat = data.reshape(-1)
    width = max((len(x) for x in flat), default=0)
    if flat.size * width > MAX_PADDED_BYTES:
        # Padding multiplies: 8 M empty elements next to one 32 MB element would need 256 TB.
        raise InvalidInput(f"BYTES input of {flat.size} elements padded to the longest "
                           f"({width} bytes) exceeds {MAX_PADDED_BYTES} bytes")
    buf = b"".join(x.ljust(width, b"\0") for x in flat)
    out = np.frombuffer(buf, dtype=np.uint8).reshape(*data.shape, width).copy()
    return torch.from_numpy(out)


def _uint8_to_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    lead, width = array.shape[:-1], array.shape[-1]
    raw = array.tobytes()
    items = [raw[i * width:(i + 1) * width].rstrip(b"\0") for i in range(int(np.prod(lead)))]
    return as_bytes_array(items).reshape(lead)
