"""kloop's own in-process figure: each registry model loaded as ``kloop serve`` loads it (the
same loader and graph choice), then called in a loop with no server, like the harness's
``baseline.py`` does with the peers' TorchScript file.

The harness's figure is the limit the targets are measured against. This one says how much of
a gap to it comes from the server and how much from the graph: kloop may run a faster graph
than the TorchScript file (``serving.core.runtime``: oneDNN where it measures faster), and then
a server share above 100 % of the harness's limit is still below kloop's own.

Usage: python -m loadtests.benchmark.inprocess REGISTRY [SECONDS]  -> JSON list on stdout
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kloop.artifact import Registry
from kloop.modelfile import load_exported
from loadtests.benchmark.models import MODELS
from serving.core.runtime import RuntimeOptions, prepare

BATCHES = (1, 32)
THREADS = 2  # the harness's two-thread cells, which the targets use


def measure(registry: Path, seconds: float,
            names: tuple[str, ...] = MODELS) -> list[dict[str, Any]]:
    """items/s and p50 per call of each model at each of BATCHES rows, ``seconds`` each."""
    reg = Registry(registry)
    options = RuntimeOptions()
    out: list[dict[str, Any]] = []
    torch.set_num_threads(THREADS)
    for name in names:
        version = reg.versions(name)[-1]
        manifest = reg.manifest(name, version)
        # what the server's loader does (serving.core.repository.make_loader), keeping the type
        runner = prepare(load_exported(reg.path(name, version) / manifest.model_file), manifest,
                         options)
        shape = manifest.inputs[0].shape[1:]
        for batch in BATCHES:
            x = torch.randn(batch, *shape)
            lat = []
            with torch.inference_mode():
                for _ in range(5):
                    runner(x)
                end = time.perf_counter() + seconds
                while True:
                    t0 = time.perf_counter()
                    runner(x)
                    t1 = time.perf_counter()
                    lat.append(t1 - t0)
                    if t1 > end:
                        break
            arr = np.array(lat)
            out.append({"model": name, "batch": batch, "threads": THREADS,
                        "graph": runner.strategy, "items_per_s": batch * len(arr) / arr.sum(),
                        "p50_ms": float(np.percentile(arr, 50) * 1e3)})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    seconds = float(argv[1]) if len(argv) > 1 else 3.0
    print(json.dumps(measure(Path(argv[0]), seconds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
