"""``python -m serving``: the server without the rest of kloop's CLI (tests start it this way)."""

from __future__ import annotations

import argparse
import sys

from serving import openmp

if __name__ == "__main__":  # before torch loads, which reads it once (serving.openmp)
    openmp.restart_with_spin_count()

from serving.cli import add_serve_arguments, run  # imports torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description="kloop model server")
    add_serve_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
