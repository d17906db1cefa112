"""Training progress as live fields and curves, read from a run's ``progress.jsonl``.

The trainer's rank 0 appends structured events (``trainer.progress``); this folds them into what
a run page shows: the fields Kubeflow Trainer's progress tracking reports (epoch, step, loss,
metrics, samples/s, percent, estimated remaining seconds) and the per-epoch curves (training
loss and each held-out metric). The file outlives the processes, so a finished run's curves stay.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trainer.progress import read_events
from trainer.rundir import PROGRESS_FILE


@dataclasses.dataclass
class Progress:
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    samples_per_s: float | None = None
    percent: float = 0.0
    remaining_s: float | None = None
    restarts: int = 0
    done: bool = False
    # Where the estimate runs from: the latest start (a resume or restart restarts the clock).
    _fraction: float = 0.0
    _started_at: float | None = None
    _started_fraction: float = 0.0
    _last_time: float | None = None

    def fold(self, ev: Mapping[str, Any]) -> None:
        """Take one event into account (events in file order)."""
        kind = ev.get("event")
        at = _num(ev.get("time"))
        if kind == "start":
            self.epochs = int(ev.get("epochs") or self.epochs)
            self.epoch = max(int(ev.get("start_epoch") or 1) - 1, 0)  # epochs complete
            self.step = int(ev.get("start_step") or 0)
            self.restarts = max(self.restarts, int(ev.get("restart") or 0))
            self.done = False
            self._fraction = self._epochs_done(self.epoch, self.step)
            self._started_at, self._started_fraction = at, self._fraction
        elif kind == "step":
            self.epoch = int(ev.get("epoch") or self.epoch)
            self.step = int(ev.get("step") or 0)
            self.steps = int(ev.get("steps") or self.steps)
            self.loss = _num(ev.get("loss"))
            self._fraction = self._epochs_done(self.epoch - 1, self.step)
        elif kind == "epoch":
            self.epoch = int(ev.get("epoch") or self.epoch)
            self.epochs = int(ev.get("epochs") or self.epochs)
            self.steps = int(ev.get("steps") or self.steps)
            self.step = self.steps
            self.loss = _num(ev.get("loss"))
            self.metrics = {k: float(v) for k, v in (ev.get("held_out") or {}).items()
                            if _num(v) is not None}
            self.samples_per_s = _num(ev.get("samples_per_s"))
            self._fraction = self._epochs_done(self.epoch, 0)
        elif kind == "done":
            self.done = True
            self._fraction = 1.0
        if at is not None:
            self._last_time = at
        self.percent = round(100.0 * self._fraction, 1)
        self.remaining_s = 0.0 if self.done else None
        if (not self.done and self._started_at is not None and self._last_time is not None
                and self._fraction > self._started_fraction
                and self._last_time > self._started_at):
            rate = (self._fraction - self._started_fraction) / (self._last_time - self._started_at)
            self.remaining_s = round((1.0 - self._fraction) / rate, 1)

    def _epochs_done(self, complete: int, step: int) -> float:
        """The fraction of training done: ``complete`` epochs and ``step`` steps of the next."""
        if not self.epochs:
            return 0.0
        within = step / self.steps if self.steps else 0.0
        return max(0.0, min(1.0, (complete + within) / self.epochs))

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epochs": self.epochs, "step": self.step,
                "steps": self.steps, "loss": self.loss, "metrics": dict(self.metrics),
                "samples_per_s": self.samples_per_s, "percent": self.percent,
                "remaining_s": self.remaining_s, "restarts": self.restarts, "done": self.done}


def progress_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "train" / PROGRESS_FILE


def read_progress(run_dir: str | Path) -> Progress | None:
    """The run's training progress, None before training wrote any."""
    events, _ = read_events(progress_path(run_dir))
    if not events:
        return None
    p = Progress()
    for ev in events:
        p.fold(ev)
    return p


def curves(events: Iterable[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per-epoch series: ``train_loss`` and each held-out metric (the task's own names, which
    may include a held-out ``loss``), keyed by name. A resumed
    run repeats no epoch: a later event for an epoch replaces the earlier one."""
    by_epoch: dict[int, Mapping[str, Any]] = {}
    for ev in events:
        if ev.get("event") == "epoch" and isinstance(ev.get("epoch"), int):
            by_epoch[ev["epoch"]] = ev
    series: dict[str, tuple[list[float], list[float]]] = {}
    for epoch in sorted(by_epoch):
        ev = by_epoch[epoch]
        values = {"train_loss": ev.get("loss"), **(ev.get("held_out") or {})}
        for name, v in values.items():
            y = _num(v)
            if y is None:
                continue
            xs, ys = series.setdefault(name, ([], []))
            xs.append(float(epoch))
            ys.append(y)
    return series


def run_curves(run_dir: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    return curves(read_events(progress_path(run_dir))[0])


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)
