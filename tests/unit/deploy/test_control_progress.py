"""Training progress as the control plane reports it, folded from progress events as the
trainer writes them (``trainer.progress``): percent, the remaining-time estimate across a
resume, restarts, and per-epoch curves that a resumed run does not repeat."""

from __future__ import annotations

from typing import Any

import pytest

from deploy.control.progress import Progress, curves


def _start(t: float, epoch: int = 1, step: int = 0, restart: int = 0) -> dict[str, Any]:
    return {"event": "start", "time": t, "epochs": 4, "start_epoch": epoch, "start_step": step,
            "restart": restart, "resumed": epoch > 1 or step > 0}


def _step(t: float, epoch: int, step: int, loss: float = 1.0) -> dict[str, Any]:
    return {"event": "step", "time": t, "epoch": epoch, "step": step, "steps": 10, "loss": loss}


def _epoch(t: float, epoch: int, loss: float, acc: float) -> dict[str, Any]:
    return {"event": "epoch", "time": t, "epoch": epoch, "epochs": 4, "steps": 10, "loss": loss,
            "held_out": {"accuracy": acc, "loss": loss + 0.1}, "samples_per_s": 500.0}


def fold(events: list[dict[str, Any]]) -> Progress:
    p = Progress()
    for ev in events:
        p.fold(ev)
    return p


def test_percent_and_remaining_time_follow_the_steps() -> None:
    p = fold([_start(100.0), _step(110.0, 1, 5)])
    assert p.percent == 12.5  # half of the first of four epochs
    assert p.remaining_s == pytest.approx(70.0)  # 12.5 % took 10 s
    p.fold(_epoch(120.0, 1, 0.9, 0.6))
    assert (p.epoch, p.step, p.percent) == (1, 10, 25.0)
    assert p.loss == 0.9 and p.metrics == {"accuracy": 0.6, "loss": pytest.approx(1.0)}
    assert p.samples_per_s == 500.0 and p.remaining_s == pytest.approx(60.0)
    p.fold({"event": "done", "time": 160.0})
    assert p.done and p.percent == 100.0 and p.remaining_s == 0.0


def test_a_resume_restarts_the_estimate_and_a_restart_is_counted() -> None:
    # two epochs done before the process died; the resume starts the clock again
    p = fold([_start(0.0), _epoch(50.0, 1, 1.0, 0.5), _epoch(100.0, 2, 0.8, 0.6),
              _start(1000.0, epoch=3, restart=1)])
    assert p.percent == 50.0 and p.restarts == 1
    assert p.remaining_s is None  # no pace measured since the resume yet
    p.fold(_step(1010.0, 3, 5))
    assert p.percent == 62.5 and p.remaining_s == pytest.approx(30.0)  # 12.5 % in 10 s


def test_no_events_mean_nothing_is_estimated() -> None:
    p = fold([_start(5.0)])
    assert p.percent == 0.0 and p.remaining_s is None and not p.done


def test_curves_take_each_epoch_once_the_latest_wins() -> None:
    events = [_epoch(1, 1, 1.0, 0.5), _epoch(2, 2, 0.8, 0.6),
              _epoch(3, 2, 0.7, 0.65),  # epoch 2 again, after a restart: it replaces the first
              _epoch(4, 3, 0.6, 0.7), {"event": "epoch", "epoch": 4, "loss": float("nan")}]
    got = curves(events)
    assert got["train_loss"] == ([1.0, 2.0, 3.0], [1.0, 0.7, 0.6])
    assert got["accuracy"] == ([1.0, 2.0, 3.0], [0.5, 0.65, 0.7])
    assert got["loss"] == ([1.0, 2.0, 3.0], [pytest.approx(1.1), pytest.approx(0.8),
                                             pytest.approx(0.7)])
