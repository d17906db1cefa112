"""The side-by-side benchmark's report (``loadtests.benchmark.report``): its verdicts, rounds and
failed cells, on known figures."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.benchmark import report


def _cell(peer: str, model: str, proto: str, conc: int, rps: float, p50: float = 1.0,
          p99: float = 2.0, errors: int = 0) -> dict[str, object]:
    return {"peer": peer, "model": model, "proto": proto, "conc": conc, "rps": rps,
            "p50_ms": p50, "p99_ms": p99, "errors": errors}


def test_verdicts_compare_with_the_best_peer_of_each_cell_and_the_limits() -> None:
    runs = [
        _cell("kloop", "tiny", "grpc", 32, 3000, p99=10),
        _cell("kserve", "tiny", "grpc", 32, 700, p99=40),
        _cell("torchserve_batch", "tiny", "grpc", 32, 3500, p99=9),  # faster: kloop loses
        _cell("null_grpc", "tiny", "grpc", 32, 4000),
        _cell("kloop", "tiny", "http", 32, 8000, p99=5),
        _cell("kserve", "tiny", "http", 32, 1000, p99=30),
        _cell("kloop", "cnn", "grpc", 8, 400),
        _cell("kloop", "cnn", "grpc", 32, 330),  # 0.825 of c=8: a collapse
        _cell("null_grpc_nginx", "tiny", "grpc", 32, 9800),
        _cell("kloop", "tiny", "grpc", 1, 900, p50=1.1),
        _cell("kserve", "tiny", "grpc", 1, 950, p50=1.0),
    ]
    baseline = [{"model": "cnn", "batch": 32, "threads": 2, "items_per_s": 400.0, "p50_ms": 80}]
    got = {(c.name, c.cell): c for c in report.checks(runs, baseline)}
    assert got[("ahead of the best peer", "tiny grpc c=32")].ok is False
    assert "TorchServe" in got[("ahead of the best peer", "tiny grpc c=32")].target
    assert got[("ahead of the best peer", "tiny http c=32")].ok is True
    assert got[("4x KServe", "tiny grpc c=32")].ok is True  # 3000 / 700
    assert got[("4x KServe", "tiny http c=32")].ok is True
    context = got[("context: load generator's ceiling", "tiny grpc c=32")]
    assert context.ok is None and "14.0x KServe" in context.value  # 9800 / 700
    assert got[("share of the trivial gRPC server", "tiny grpc c=32")].ok is True  # 75 %
    assert got[("share of in-process batch-32", "cnn grpc c=32")].ok is True  # 330 / 400
    assert got[("no collapse from 8 to 32 clients", "cnn grpc")].ok is False
    assert got[("lone client no slower than KServe", "tiny grpc c=1")].ok is False
    text = report.markdown(runs, baseline, {"date": "d", "duration_s": 1})
    assert "| kloop, 1 process | grpc | 32 | 3000 |" in text
    assert "4.29x" in text  # kloop / KServe on the tiny gRPC c=32 row
    # kloop's own graph in process: context beside the target, in the checks and the report
    own = [{"model": "cnn", "batch": 32, "threads": 2, "items_per_s": 500.0, "p50_ms": 64,
            "graph": "onednn"}]
    got = {(c.name, c.cell): c for c in report.checks(runs, baseline, "kloop", own)}
    context = got[("context: share of kloop's own graph in process", "cnn grpc c=32")]
    assert context.ok is None and context.value.startswith("66% (330 of 500")  # 330 / 500
    assert got[("share of in-process batch-32", "cnn grpc c=32")].ok is True  # still 330 / 400
    text = report.markdown(runs, baseline, {"date": "d", "duration_s": 1}, own)
    assert "| cnn | 32 | 2 | onednn | 500 | 64.00 |" in text


def test_a_failed_cell_is_reported_not_hidden(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(_cell("kloop", "tiny", "grpc", 8, 100)) + "\n"
                    + json.dumps({"peer": "kserve", "error": "startup failed: boom"}) + "\n")
    runs = report.load_runs(path)
    assert "startup failed: boom" in report.markdown(runs, [], {})


def test_rounds_make_a_cell_the_mean_of_its_measurements(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in (
        _cell("kloop", "tiny", "grpc", 32, 3000, p99=10),
        _cell("null_grpc", "tiny", "grpc", 32, 4000),
        _cell("kloop", "tiny", "grpc", 32, 2000, p99=14, errors=1),  # round 2: a slower box
        _cell("null_grpc", "tiny", "grpc", 32, 3000),
    )))
    runs = report.load_runs(path)
    kloop = report.by_cell(runs)["kloop"][("tiny", "grpc", 32)]
    assert kloop["rps"] == 2500 and kloop["p99_ms"] == 12 and kloop["errors"] == 1
    assert kloop["rps_rounds"] == [3000, 2000]
    got = {(c.name, c.cell): c for c in report.checks(runs, [])}
    assert got[("share of the trivial gRPC server", "tiny grpc c=32")].value.startswith("71%")
    text = report.markdown(runs, [], {})
    assert "| kloop, 1 process | grpc | 32 | 2500 |" in text and "| 3000 / 2000 |" in text
    merged = report.merge_baselines([
        [{"model": "cnn", "batch": 32, "threads": 2, "items_per_s": 500.0, "p50_ms": 60.0}],
        [{"model": "cnn", "batch": 32, "threads": 2, "items_per_s": 600.0, "p50_ms": 50.0}]])
    assert report.inprocess(merged, "cnn", 32, 2) == 550


def test_kloop_graph_over_rounds_is_the_mean_and_names_every_graph_that_ran() -> None:
    def rec(items: float, graph: str) -> dict[str, object]:
        return {"model": "tiny", "batch": 32, "threads": 2, "items_per_s": items,
                "p50_ms": 0.03, "graph": graph}

    [merged] = report.merge_baselines([[rec(1000.0, "trace")], [rec(3000.0, "onednn")]])
    assert merged["items_per_s"] == 2000.0 and merged["graph"] == "trace / onednn"
    [same] = report.merge_baselines([[rec(1000.0, "onednn")], [rec(1000.0, "onednn")]])
    assert same["graph"] == "onednn"
