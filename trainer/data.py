"""Task data as kloop uses it: the held-out fingerprint, batches as positional inputs, shards.

Why a fingerprint over the held-out split's definition AND its bytes: the rollout's gate
compares a candidate with the champion, which is only fair on the same examples. The task says
how its split is made (``Datasets.definition``: source, seed, fraction); the fingerprint hashes
that together with every held-out item's tensors (dtype, shape, bytes), so a changed file, a
new split seed or a different preprocessing of the raw data all show as a different
fingerprint, and the gate refuses to compare.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.task import TaskError


def fingerprint(definition: Mapping[str, Any], held_out: Dataset[Any]) -> str:
    """sha256 hex over ``definition`` (as canonical JSON) and every held-out item's tensors."""
    h = hashlib.sha256()
    try:
        h.update(json.dumps(dict(definition), sort_keys=True).encode())
    except TypeError as e:
        raise TaskError(f"the held-out split's definition must be plain JSON data: {e}") from e
    for i in range(_length(held_out, "held_out")):
        for t in _tensors(held_out[i]):
            t = t.detach().cpu()
            if t.dtype is torch.bfloat16:  # numpy has no bfloat16: its bits, named as such
                a, tag = np.ascontiguousarray(t.view(torch.int16).numpy()), "bf16"
            else:
                a = np.ascontiguousarray(t.numpy())
                tag = a.dtype.str
            h.update(f"|{tag}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors of an item, in a fixed order (dict keys sorted)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, np.ndarray):
        yield torch.from_numpy(np.ascontiguousarray(obj))
    elif isinstance(obj, Mapping):
        for k in sorted(obj):
            yield from _tensors(obj[k])
    elif isinstance(obj, tuple | list):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, bool | int | float):
        yield torch.tensor(obj)
    else:
        raise TaskError(f"a dataset item holds a {type(obj).__name__}; items are tensors, "
                        "numbers, or tuples / dicts of them")


def _length(ds: Dataset[Any], what: str) -> int:
    try:
        n = len(ds)  # type: ignore[arg-type]  # map-style datasets define __len__
    except TypeError:
        raise TaskError(f"the {what} dataset has no len(): kloop needs map-style datasets "
                        "(indexable, with a length) to shard them") from None
    if n < 1:
        raise TaskError(f"the {what} dataset is empty")
    return int(n)


def length(ds: Dataset[Any], what: str) -> int:
    return _length(ds, what)


def positional(inputs: Any, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """A collated batch's inputs as the positional tensors the graph takes (names' order)."""
    if isinstance(inputs, torch.Tensor):
        if len(names) != 1:
            raise TaskError(f"the dataset yields one input tensor; the example input names "
                            f"{len(names)} ({', '.join(names)}): yield a dict keyed by them")
        return (inputs,)
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise TaskError(f"the dataset's inputs lack {', '.join(missing)} "
                            f"(it yields {', '.join(map(str, inputs))})")
        return tuple(inputs[n] for n in names)
    raise TaskError(f"a dataset item's inputs are a {type(inputs).__name__}; expected a tensor "
                    "or a dict of tensors by input name")


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def shard(n: int, rank: int, world: int) -> list[int]:
    """This process's share of ``n`` held-out items: every world-th from ``rank``, no padding
    (DistributedSampler would repeat items to even the shards, and count them twice)."""
    return list(range(rank, n, world))
