"""Training progress as events: human lines on stdout and JSON lines in ``progress.jsonl``.

Why two forms of one event: people read the log; the pipeline and the local launcher read the
JSON lines (appended, one object per line, flushed per event), so nothing ever parses a human
log line. Events (all carry ``event`` and ``time``, unix seconds):

* ``start``  task, epochs, start_epoch, start_step, world_size, device, resumed, restart
             (torchrun's restart count), data_fingerprint, primary_metric
* ``step``   epoch, step, steps (per epoch), loss (running mean of this epoch)
* ``checkpoint`` epoch, step: a mid-epoch checkpoint (``checkpoint_every_steps``)
* ``epoch``  epoch, epochs, loss (training, over all processes), held_out (the task's metrics
             on the held-out split, all-reduced), samples_per_s
* ``done``   metrics (held-out evaluation of the exported model), model_path, seconds,
             primary_metric

Only rank 0 writes. The file is appended across resumes, so one log tells the whole story.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from trainer.rundir import PROGRESS_FILE


def format_event(ev: dict[str, Any]) -> str:
    """The human line for an event."""
    kind = ev.get("event")
    if kind == "start":
        how = "starting"
        if ev.get("resumed"):
            how = f"resuming at epoch {ev['start_epoch']}"
            if ev.get("start_step"):
                how += f" after step {ev['start_step']}"
        if ev.get("restart"):
            how = f"restart {ev['restart']} after a worker died, {how}"
        task = f" {ev['task']}," if ev.get("task") else ""
        return f"train:{task} {how}, {ev['epochs']} epochs on {ev['world_size']} process(es), {ev['device']}"
    if kind == "checkpoint":
        return f"  checkpoint at epoch {ev['epoch']} step {ev['step']}"
    if kind == "step":
        return f"  epoch {ev['epoch']} step {ev['step']}/{ev['steps']} loss {ev['loss']:.4f}"
    if kind == "epoch":
        held = "".join(f" held-out {k} {v:.4f}" for k, v in ev.get("held_out", {}).items())
        return (f"epoch {ev['epoch']}/{ev['epochs']} loss {ev['loss']:.4f}{held} "
                f"{ev['samples_per_s']:.0f} samples/s")
    if kind == "done":
        m = ev.get("metrics", {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items()
                          if isinstance(v, int | float) and k != "num_examples")
        return f"train: done in {ev['seconds']:.1f}s, held-out {shown} -> {ev['model_path']}"
    return json.dumps(ev)


class ProgressLog:
    """Rank 0's event sink. ``enabled=False`` on other ranks turns every call into a no-op."""

    def __init__(self, run_dir: Path, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.path = run_dir / PROGRESS_FILE
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        ev = {"event": event, **fields, "time": time.time()}
        if not self.enabled:
            return ev
        line = json.dumps(ev, sort_keys=True) + "\n"
        # One write per event, appended and fsynced; a reader may still catch a line mid-write,
        # which ``read_events`` leaves for its next read.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        print(format_event(ev), file=self.stream, flush=True)
        return ev


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete events in ``path`` from byte ``offset``; returns them and the next offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a partial last line is left for the next read
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


def iter_events(path: Path) -> Iterator[dict[str, Any]]:
    yield from read_events(path)[0]
