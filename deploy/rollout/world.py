"""What a backend saw for one model at one moment: the input ``decide`` judges the rollout by.

A backend reads the world before every decision, so the controller never trusts its own memory
of what it wrote (a crashed controller, a restarted server or a manual change all show here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from deploy.rollout.samples import VersionSample
from kloop.model_version import Version


@dataclasses.dataclass(frozen=True)
class World:
    """What a backend saw for one model at one moment.

    ``samples`` holds one cumulative metrics sample per loaded version; it is ``None`` and
    ``error`` says why when the metrics could not be read. ``weights`` are the serving side's
    actual traffic weights (percent, summing to 100). ``loaded`` are the versions READY to serve
    (a backend that loads asynchronously reports a version only once it is); ``failed`` maps a
    version that will not become ready without a new deployment (KServe's ``FailedToLoad``) to
    why, so the rollout gives up at once instead of waiting for its deadline.
    """

    weights: Mapping[Version, int]
    loaded: frozenset[Version]
    samples: Mapping[Version, VersionSample] | None
    error: str | None = None
    failed: Mapping[Version, str] = dataclasses.field(default_factory=dict)


def normalized(weights: Mapping[Version, int]) -> dict[Version, int]:
    """Weights without zero entries: ``{2: 100, 1: 0}`` and ``{2: 100}`` route the same."""
    return {v: int(w) for v, w in sorted(weights.items()) if int(w) != 0}
