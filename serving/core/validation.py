"""Check a request against the signature in the version's manifest, before the model runs.

A model fed the wrong shape fails deep inside torch with a message no client can act on, and
as a 500. Checking here turns every such mistake into ``InvalidInput`` (400 / INVALID_ARGUMENT)
naming the tensor and the problem. ``-1`` in a manifest shape matches any size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kloop.artifact import Manifest, TensorSpec
from serving.core.errors import InvalidInput
from serving.core.types import InferenceRequest, InferInput, fixed_itemsize


def validate(request: InferenceRequest, manifest: Manifest) -> None:
    """Raise ``InvalidInput`` for the first problem found; return when the request fits."""
    inputs, declared = request.inputs, manifest.inputs
    if len(inputs) == len(declared) and all(
            t.name == s.name for t, s in zip(inputs, declared, strict=True)):
        # The usual request: the manifest's inputs, in its order (no lookups to build).
        for tensor, spec in zip(inputs, declared, strict=True):
            _check_tensor(tensor, spec)
    else:
        _check_named_inputs(inputs, manifest)
    _check_requested_outputs(request.outputs, manifest)


def _check_named_inputs(inputs: Sequence[InferInput], manifest: Manifest) -> None:
    """Inputs in any order: each known and given once, each checked, none missing."""
    specs = {s.name: s for s in manifest.inputs}
    seen: set[str] = set()
    for tensor in inputs:
        if tensor.name in seen:
            raise InvalidInput(f"input {tensor.name!r} is given more than once")
        seen.add(tensor.name)
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInput(
                f"unknown input {tensor.name!r} for model {manifest.name!r}; expected {sorted(specs)}"
            )
        _check_tensor(tensor, spec)
    missing = sorted(set(specs) - seen)
    if missing:
        raise InvalidInput(f"missing input(s) {missing} for model {manifest.name!r}")


def _check_tensor(tensor: InferInput, spec: TensorSpec) -> None:
    name = tensor.name
    if tensor.datatype != spec.datatype:
        raise InvalidInput(
            f"input {name!r} has datatype {tensor.datatype}, the model expects {spec.datatype}"
        )
    shape = tensor.shape
    if shape and min(shape) < 1:
        raise InvalidInput(f"input {name!r} has shape {list(shape)}: dimensions must be >= 1")
    if len(shape) != len(spec.shape) or any(
        want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
    ):
        raise InvalidInput(
            f"input {name!r} has shape {list(shape)}, the model expects {list(spec.shape)}"
            " (-1 = any size)"
        )
    elements = math.prod(shape)
    itemsize = fixed_itemsize(spec.datatype)  # None for BYTES: its decoder checked the framing
    if tensor.raw_nbytes is not None and itemsize is not None:
        if tensor.raw_nbytes != elements * itemsize:
            raise InvalidInput(
                f"input {name!r}: raw contents hold {tensor.raw_nbytes} bytes, shape "
                f"{list(shape)} of {spec.datatype} needs {elements * itemsize}"
            )
    if tensor.data.size != elements:
        raise InvalidInput(
            f"input {name!r}: {tensor.data.size} elements given, shape {list(shape)} needs {elements}"
        )


def _check_requested_outputs(requested: Sequence[str], manifest: Manifest) -> None:
    if not requested:  # all outputs (the usual request)
        return
    known = {s.name for s in manifest.outputs}
    unknown = [n for n in requested if n not in known]
    if unknown:
        raise InvalidInput(
            f"unknown requested output(s) {unknown} for model {manifest.name!r}; "
            f"the model has {sorted(known)}"
        )
