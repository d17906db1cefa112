"""``python -m loadtests.hotpath``: the in-process measurement of the gRPC hot path runs the real
servicer through the native front end's per-call coroutine and prints a row per level."""

from __future__ import annotations

import re

import pytest

from loadtests import hotpath
from tests.support.serving import require_native


def test_hotpath_prints_cpu_per_request_for_each_level(capsys: pytest.CaptureFixture[str]) -> None:
    require_native()
    assert hotpath.main(["--concurrency", "4,2", "--seconds", "0.2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) µs \| (\d+) \|$", out, flags=re.M)
    assert [r[0] for r in rows] == ["4", "2"]
    for _, us, done in rows:
        assert float(us) > 0 and int(done) > 0
