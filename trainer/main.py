"""The one training entry point: ``python -m trainer.main --spec spec.json --run-dir DIR [--resume]``.

It runs unchanged under local ``torchrun``, in PyTorchJob / TrainJob pods (where it is started by
``python -m torch.distributed.run``, which reads the operator's PET_* variables) and bare, as a
world of one. Only this module reads argv; the loop receives typed values.

In a cluster the spec arrives inline (``--spec-json``), so the pod needs no extra file, and
``--publish --run-id ID`` makes rank 0 publish the result to ``spec.storage.registry_uri``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from trainer.distributed import DistEnv, die_with_agent
from trainer.spec import TrainSpec


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", type=Path, help="path to a TrainSpec JSON file")
    src.add_argument("--spec-json", help="the TrainSpec as an inline JSON string")
    p.add_argument("--run-dir", type=Path, required=True, help="checkpoints, progress, export")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint, if any")
    p.add_argument("--publish", action="store_true", help="rank 0 publishes to spec.storage.registry_uri")
    p.add_argument("--run-id", default="", help="training run id recorded in the published manifest")
    args = p.parse_args(argv)
    if args.publish and not args.run_id:
        p.error("--publish needs --run-id")
    return args


def load_spec(args: argparse.Namespace) -> TrainSpec:
    raw = args.spec.read_text() if args.spec is not None else args.spec_json
    return TrainSpec.from_dict(json.loads(raw))


@record  # torchrun's failure summary then names the exception and its traceback, per rank
def main(argv: Sequence[str] | None = None) -> int:
    die_with_agent()  # before any work: a worker never outlives the torchrun that started it
    args = parse_args(argv)
    spec = load_spec(args)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    env = DistEnv.from_env()

    from trainer.loop import train

    result = train(spec, args.run_dir, resume=args.resume, env=env)
    if result is not None and args.publish:
        from kloop.artifact import Registry
        from trainer.publish import publish

        m = publish(Registry(spec.storage.registry_uri), spec, args.run_dir, args.run_id,
                    image=spec.image)
        print(f"published {m.name} v{m.version} to {spec.storage.registry_uri}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
