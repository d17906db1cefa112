"""``python -m loadtests.benchmark``: kloop side by side with KServe and TorchServe, one run.

1. the peers' environment (``../shared/bench/peers/setup.sh``: wrk, nginx, Java, a venv with
   KServe 0.21, TorchServe 0.12 and the load generators' libraries) is made if missing;
2. the same models (``tiny`` MLP, ResNet-18-style ``cnn``; the harness's definitions and seed):
   TorchScript files and .mar archives for the peers, a kloop registry (torch.export) for kloop;
   the same request bodies for every server;
3. the in-process limit: the harness's ``baseline.py`` (TorchScript in a loop, no server), and
   beside it kloop's own graph in the same loop (``inprocess.py``: how much of a gap comes from
   the server, how much from the graph);
4. every server in turn, each alone on the box: started, waited for, driven by the same load
   generators (wrk + ``post.lua``; ``grpc_load.py``, one channel, ``raw_input_contents``) at
   each concurrency, stopped by PID (``driver.py`` runs the harness's own ``bench.py``);
5. the report (``report.py``): every cell, the ratios, the verdicts; ``report.md``,
   ``runs.jsonl``, ``baseline.json``, ``kloop_inprocess.json`` and ``meta.json`` in the output
   directory.

The full matrix takes about 25 min at the default 10 s per cell; ``--quick`` is a smoke run.
``--rounds N`` repeats steps 3-4 N times (each round the whole list of servers, one after
another) and reports each cell as the mean of its rounds: on a shared box the figures drift by
10-20 % over minutes, and a ratio between two servers measured minutes apart drifts with them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtests.benchmark import models, report
from loadtests.benchmark.harness import HarnessMissing, peers_dir
from serving.openmp import SPIN_DEFAULT

ROOT = Path(__file__).resolve().parents[2]  # the project: inprocess.py runs as a module there

DEFAULT_PEERS = ("null_grpc,null_grpc_nginx,null_http,kloop,kloop_w2,kserve,torchserve,"
                 "torchserve_batch")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _env(scratch: Path, results: Path) -> dict[str, str]:
    env = dict(os.environ, PEERS_SCRATCH=str(scratch), PEERS_RESULTS=str(results))
    env.setdefault("PEERS_VENV", str(Path.home() / ".cache" / "kloop-peers" / "venv"))
    return env


def _run(cmd: list[str], env: dict[str, str], *, cwd: Path | str | None = None,
         stdout: int | None = None) -> subprocess.CompletedProcess[str]:
    _log("$ " + " ".join(cmd))
    return subprocess.run(cmd, env=env, check=True, text=True, cwd=cwd, stdout=stdout)


def prepare(harness: Path, py: str, env: dict[str, str], scratch: Path, names: list[str],
            baseline: bool) -> Path:
    """Models, payloads and .mar files for the peers (once), and kloop's registry."""
    torchscript = baseline or any(p.startswith(("kserve", "torchserve")) for p in names)
    if torchscript and not all((scratch / "models" / f"{m}.pt").is_file() for m in models.MODELS):
        _run([py, str(harness / "models.py"), str(scratch / "models")], env)
    if not all((scratch / "payloads" / f"{m}.f32").is_file() for m in models.MODELS):
        _run([py, str(harness / "make_payloads.py"), str(scratch / "payloads")], env)
    if any(p.startswith("torchserve") for p in names) and not all(
            (scratch / "ts" / "model_store" / f"{m}.mar").is_file() for m in models.MODELS):
        _run(["bash", str(harness / "torchserve" / "build_mars.sh"), str(scratch / "models"),
              str(scratch / "ts" / "model_store")], env)
    registry = scratch / "kloop-registry"
    _log(f"kloop registry {registry} (torch.export of the same modules, seed 0)")
    models.publish(registry)
    return registry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=DEFAULT_PEERS,
                    help="servers, in order (default: %(default)s)")
    ap.add_argument("--models", default="tiny,cnn")
    ap.add_argument("--conc", default="1,8,32", help="concurrent clients per cell")
    ap.add_argument("--protos", default="grpc,http")
    ap.add_argument("--duration", type=int, default=10, help="seconds per cell (default 10)")
    ap.add_argument("--null-conc", default="1,8,32",
                    help="clients for the ceilings (null_* servers; default: %(default)s)")
    ap.add_argument("--baseline-seconds", type=float, default=3.0,
                    help="seconds per in-process cell; 0 skips it")
    ap.add_argument("--scratch", type=Path,
                    default=Path(os.environ.get("TMPDIR", "/tmp")) / "kloop-bench")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default: SCRATCH/results-<time>)")
    ap.add_argument("--harness-python", default=None,
                    help="python with the harness's libraries (default: the peers' venv)")
    ap.add_argument("--no-setup", action="store_true",
                    help="do not run the harness's setup.sh when the peers' venv is missing")
    ap.add_argument("--kloop-arg", action="append", default=[],
                    help="extra `kloop serve` argument for the kloop server (repeatable)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure everything this many times; cells are the means (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: kloop and the gRPC ceilings, tiny, 8 clients, 2 s")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    if a.quick:
        a.peers, a.models, a.conc, a.duration, a.baseline_seconds = \
            "null_grpc,null_grpc_nginx,kloop", "tiny", "8", 2, 0.0
        a.null_conc = "32"
    try:
        harness = peers_dir()
    except HarnessMissing as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    scratch = a.scratch.resolve()
    out = (a.out or scratch / f"results-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = _env(scratch, out)
    py = a.harness_python or str(Path(env["PEERS_VENV"]) / "bin" / "python")
    if not Path(py).exists():
        if a.no_setup or a.harness_python:
            print(f"benchmark: no harness python at {py}; run {harness}/setup.sh", file=sys.stderr)
            return 2
        _run(["bash", str(harness / "setup.sh")], env)
    if shutil.which("wrk") is None and "http" in a.protos:
        print("benchmark: wrk is not installed (the harness's setup.sh installs it)",
              file=sys.stderr)
        return 2
    names = [p for p in a.peers.split(",") if p]
    registry = prepare(harness, py, env, scratch, names, a.baseline_seconds > 0)
    runs_path = out / "runs.jsonl"  # every round appends its cells
    driver = Path(__file__).with_name("driver.py")
    kloop_args = [f"--kloop-arg={x}" for x in a.kloop_arg]
    baselines: list[list[dict[str, Any]]] = []
    own: list[list[dict[str, Any]]] = []  # kloop's graph in process, each round
    for round_no in range(1, a.rounds + 1):
        if a.rounds > 1:
            _log(f"round {round_no} of {a.rounds}")
        if a.baseline_seconds > 0:
            _log("in-process limit (baseline.py)")
            res = _run([py, str(harness / "baseline.py"), str(scratch / "models"),
                        str(a.baseline_seconds)], env, stdout=subprocess.PIPE)
            baselines.append(json.loads(res.stdout))
            _log("in-process, kloop's graph (inprocess.py)")
            res = _run([sys.executable, "-m", "loadtests.benchmark.inprocess", str(registry),
                        str(a.baseline_seconds)], dict(env, GOMP_SPINCOUNT=SPIN_DEFAULT),
                       stdout=subprocess.PIPE, cwd=ROOT)
            own.append(json.loads(res.stdout))
        _run([py, str(driver), "--harness", str(harness), "--kloop-python", sys.executable,
              "--registry", str(registry), *kloop_args, "--",
              "--peers", ",".join(names), "--models", a.models, "--conc", a.conc,
              "--protos", a.protos, "--duration", str(a.duration), "--null_conc", a.null_conc,
              "--out", str(runs_path)], env)
    baseline = report.merge_baselines(baselines)
    kloop_graph = report.merge_baselines(own)
    if baselines:
        (out / "baseline.json").write_text(json.dumps(baselines, indent=1))  # every round
        (out / "kloop_inprocess.json").write_text(json.dumps(own, indent=1))
    versions = _versions(py, env)
    meta = {"date": stamp, "duration_s": a.duration, "rounds": a.rounds, "peers": names,
            "versions": versions,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    runs = report.load_runs(runs_path)
    text = report.markdown(runs, baseline, meta, kloop_graph)
    (out / "report.md").write_text(text)
    print(text)
    report.print_rich(runs, baseline, kloop_graph)
    _log(f"results in {out}")
    return 0


def _versions(py: str, env: dict[str, str]) -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "grpcio", "aiohttp", "uvloop"):
        try:
            out[f"kloop's {dist}"] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    from serving.grpc.native import grpc_front  # the native gRPC front end, where built

    if grpc_front is not None:
        out["kloop's gRPC C++ (native front end)"] = grpc_front.GRPC_VERSION
    code = (
        "import importlib.metadata as md, json\n"
        "out = {}\n"
        "for p in ('kserve', 'torchserve', 'torch', 'grpcio'):\n"
        "    try: out[p] = md.version(p)\n"
        "    except md.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    try:
        peers = json.loads(subprocess.run([py, "-c", code], env=env, capture_output=True,
                                          text=True, check=True).stdout)
        out.update({f"peers' {k}": v for k, v in peers.items()})
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
