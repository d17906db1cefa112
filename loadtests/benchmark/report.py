"""The benchmark's tables and verdicts, from one run's ``runs.jsonl`` and in-process baseline.

Absolute numbers move with the machine (a shared 2-core box gives different figures from hour
to hour), so every verdict is a ratio between servers measured in the same run:

* ``best peer``: per cell (model, protocol, clients), kloop's req/s against the best of the real
  servers (KServe, TorchServe default and batching), and its p99 against that peer's p99;
* ``4x KServe``: the tiny model at 8 and 32 clients, kloop's req/s over KServe's; next to it,
  for context, what the load generator reaches against nginx answering a fixed reply (no
  server can beat that; on a 2-core box it bounds every ratio);
* ``gRPC ceiling``: tiny model, gRPC, 32 clients: kloop's req/s over the trivial grpc.aio
  server's (a fixed reply, no model: what one Python process and this load generator reach);
* ``in-process limit``: CNN at 32 clients, kloop's req/s (batch-1 requests = items/s) over
  the harness's in-process TorchScript loop at batch 32 with 2 threads;
* ``no collapse``: CNN, kloop's req/s at 32 clients is at least 90 % of its req/s at 8;
* ``lone client``: batch-1 latency at 1 client, kloop's p50 no worse than KServe's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

PEER_LABELS = {
    "kloop": "kloop, 1 process",
    "kloop_w2": "kloop, --workers 2",
    "kloop_aio": "kloop, 1 process, grpc.aio",
    "kloop_nolane": "kloop, 1 process, no fast lane",
    "kserve": "KServe 0.21 ModelServer",
    "torchserve": "TorchServe 0.12, default",
    "torchserve_batch": "TorchServe 0.12, batch 8 / 5 ms",
    "null_grpc": "ceiling: trivial grpc.aio server",
    "null_http": "ceiling: nginx return 200",
    "null_grpc_nginx": "ceiling: nginx, fixed gRPC reply",
}
REAL_PEERS = ("kserve", "torchserve", "torchserve_batch")
# Per protocol, the load generator's own ceiling: nginx answering a fixed reply.
NGINX_CEILING = {"http": "null_http", "grpc": "null_grpc_nginx"}
KEY = tuple[str, str, int]  # (model, proto, conc)

# The serving targets, as ratios (see the module docstring).
KSERVE_FACTOR = 4.0
GRPC_CEILING_SHARE = 0.70
INPROCESS_SHARE = 0.80
NO_COLLAPSE_SHARE = 0.90


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    cell: str
    value: str
    target: str
    ok: bool | None  # None: could not be measured in this run


_MEAN_FIELDS = ("rps", "p50_ms", "p90_ms", "p99_ms", "server_cpu_pct", "loadgen_cpu_pct")
_SUM_FIELDS = ("requests", "errors")


def load_runs(path: Path) -> list[dict[str, Any]]:
    """The run's cells. A cell measured more than once (``--rounds``) becomes the mean of its
    measurements (req/s, p50, p90, p99, CPU), with errors and requests summed, the worst max
    latency, and every round's req/s in ``rps_rounds``."""
    cells: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    failed: dict[tuple[Any, ...], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "proto" not in rec or rec.get("failed"):  # a server that failed: kept as an error
            failed[tuple(rec.get(k) for k in ("peer", "model", "proto", "conc"))] = rec
            continue
        cells.setdefault((rec["peer"], rec["model"], rec["proto"], int(rec["conc"])), []).append(rec)
    return [*(merge_rounds(recs) for recs in cells.values()), *failed.values()]


def _mean_of(recs: list[dict[str, Any]], fields: Iterable[str]) -> dict[str, Any]:
    """The last record, with each of ``fields`` the mean over the records that have it."""
    out = dict(recs[-1])
    for field in fields:
        values = [float(r[field]) for r in recs if isinstance(r.get(field), int | float)]
        if values:
            out[field] = sum(values) / len(values)
    return out


def merge_rounds(recs: list[dict[str, Any]]) -> dict[str, Any]:
    out = _mean_of(recs, _MEAN_FIELDS)
    for field in _SUM_FIELDS:
        out[field] = sum(int(r.get(field) or 0) for r in recs)
    if any("max_ms" in r for r in recs):
        out["max_ms"] = max(float(r.get("max_ms") or 0) for r in recs)
    out["rps_rounds"] = [float(r["rps"]) for r in recs]
    return out


def merge_baselines(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The in-process limit over rounds: the mean items/s and p50 per (model, batch, threads)."""
    groups: dict[tuple[Any, Any, Any], list[dict[str, Any]]] = {}
    for baseline in rounds:
        for r in baseline:
            groups.setdefault((r["model"], r["batch"], r["threads"]), []).append(r)
    merged = []
    for recs in groups.values():
        out = _mean_of(recs, ("items_per_s", "p50_ms"))
        graphs = list(dict.fromkeys(str(r["graph"]) for r in recs if "graph" in r))
        if graphs:  # kloop's graph may differ between rounds (chosen at each load)
            out["graph"] = " / ".join(graphs)
        merged.append(out)
    return merged


def by_cell(runs: Iterable[Mapping[str, Any]]) -> dict[str, dict[KEY, Mapping[str, Any]]]:
    out: dict[str, dict[KEY, Mapping[str, Any]]] = {}
    for r in runs:
        if "proto" in r and not r.get("failed"):
            out.setdefault(r["peer"], {})[(r["model"], r["proto"], int(r["conc"]))] = r
    return out


def inprocess(baseline: Sequence[Mapping[str, Any]], model: str, batch: int, threads: int) -> float | None:
    for r in baseline:
        if r["model"] == model and r["batch"] == batch and r["threads"] == threads:
            return float(r["items_per_s"])
    return None


def kloop_variants(runs: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted({r["peer"] for r in runs if str(r.get("peer", "")).startswith("kloop")})


def checks(runs: list[dict[str, Any]], baseline: Sequence[Mapping[str, Any]],
           variant: str = "kloop", kloop_graph: Sequence[Mapping[str, Any]] = ()) -> list[Check]:
    """The targets, for one kloop configuration (a peer name starting with ``kloop``);
    ``kloop_graph``: kloop's own graph in process (``inprocess.py``), context beside the
    in-process target."""
    cells = by_cell(runs)
    kloop = cells.get(variant, {})
    out: list[Check] = []
    for (model, proto, conc), k in sorted(kloop.items()):
        peers = [(p, cells[p][(model, proto, conc)]) for p in REAL_PEERS
                 if (model, proto, conc) in cells.get(p, {})]
        name = f"{model} {proto} c={conc}"
        if peers:
            best_name, best = max(peers, key=lambda pr: pr[1]["rps"])
            ok = k["rps"] >= best["rps"] and k["p99_ms"] <= best["p99_ms"] and not k["errors"]
            out.append(Check(
                "ahead of the best peer", name,
                f"{k['rps']:.0f} req/s, p99 {k['p99_ms']:.1f} ms ({k['rps'] / best['rps']:.2f}x)",
                f">= {PEER_LABELS[best_name]}: {best['rps']:.0f} req/s, p99 {best['p99_ms']:.1f} ms",
                ok))
        ks = cells.get("kserve", {}).get((model, proto, conc))
        if model == "tiny" and conc >= 8 and ks:
            ratio = k["rps"] / ks["rps"]
            out.append(Check("4x KServe", name, f"{ratio:.2f}x", f">= {KSERVE_FACTOR:.0f}x",
                             ratio >= KSERVE_FACTOR))
            # What no server can beat: the load generator against nginx's fixed reply.
            ceiling = cells.get(NGINX_CEILING[proto], {}).get((model, proto, conc))
            if ceiling:
                out.append(Check(
                    "context: load generator's ceiling", name,
                    f"nginx {ceiling['rps']:.0f} req/s = {ceiling['rps'] / ks['rps']:.1f}x KServe",
                    "(no Python server; not a target)", None))
        if conc == 1 and ks:
            out.append(Check("lone client no slower than KServe", name,
                             f"p50 {k['p50_ms']:.2f} ms", f"<= KServe p50 {ks['p50_ms']:.2f} ms",
                             k["p50_ms"] <= ks["p50_ms"]))
    tiny = kloop.get(("tiny", "grpc", 32))
    null = cells.get("null_grpc", {}).get(("tiny", "grpc", 32))
    if tiny:
        share = tiny["rps"] / null["rps"] if null else None
        out.append(Check(
            "share of the trivial gRPC server", "tiny grpc c=32",
            f"{share:.0%} ({tiny['rps']:.0f} of {null['rps']:.0f} req/s)" if null else "-",
            f">= {GRPC_CEILING_SHARE:.0%}", None if share is None else share >= GRPC_CEILING_SHARE))
    limit = inprocess(baseline, "cnn", 32, 2)
    own = inprocess(list(kloop_graph), "cnn", 32, 2)
    for proto in ("grpc", "http"):
        cnn32 = kloop.get(("cnn", proto, 32))
        cnn8 = kloop.get(("cnn", proto, 8))
        if cnn32:
            share = cnn32["rps"] / limit if limit else None
            out.append(Check(
                "share of in-process batch-32", f"cnn {proto} c=32",
                f"{share:.0%} ({cnn32['rps']:.0f} of {limit:.0f} items/s)" if limit else "-",
                f">= {INPROCESS_SHARE:.0%}", None if share is None else share >= INPROCESS_SHARE))
            if own:
                graph = next(str(r.get("graph", "?")) for r in kloop_graph
                             if r["model"] == "cnn" and r["batch"] == 32)
                out.append(Check(
                    "context: share of kloop's own graph in process", f"cnn {proto} c=32",
                    f"{cnn32['rps'] / own:.0%} ({cnn32['rps']:.0f} of {own:.0f} items/s, "
                    f"{graph} graph)", "(the server's own overhead; not a target)", None))
        if cnn32 and cnn8:
            share = cnn32["rps"] / cnn8["rps"]
            out.append(Check("no collapse from 8 to 32 clients", f"cnn {proto}",
                             f"c=32 / c=8 = {share:.2f}", f">= {NO_COLLAPSE_SHARE:.2f}",
                             share >= NO_COLLAPSE_SHARE))
    return out


def _pct(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) else ""


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def markdown(runs: list[dict[str, Any]], baseline: Sequence[Mapping[str, Any]],
             meta: Mapping[str, Any], kloop_graph: Sequence[Mapping[str, Any]] = ()) -> str:
    """The whole report: the cells, the in-process limit, the ratios and the verdicts."""
    lines = [f"Run: {meta.get('date', '?')}, {meta.get('duration_s', '?')} s per cell after a "
             f"2 s warm-up, closed loop. {meta.get('machine', '')}", ""]
    if meta.get("versions"):
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    failed = [r for r in runs if "proto" not in r or r.get("failed")]
    cells = by_cell(runs)
    rounds = max((len(r.get("rps_rounds", ())) for r in runs), default=1)
    if rounds > 1:
        lines += [f"Every server ran {rounds} rounds (one after another, each round the whole "
                  "list of servers): a cell is the mean of its rounds; each round's req/s is in "
                  "the last column.", ""]
    for model in ("tiny", "cnn"):
        if not any(m == model for peer in cells.values() for (m, _, _) in peer):
            continue
        lines += [f"### {model}", "",
                  "| server | proto | clients | req/s | p50 ms | p99 ms | errors | server CPU % "
                  "| loadgen CPU % | kloop (1 process) / this |"
                  + (" req/s per round |" if rounds > 1 else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
                  + ("---:|" if rounds > 1 else "")]
        kloop = cells.get("kloop", {})
        order = [*kloop_variants(runs), *REAL_PEERS, "null_grpc", "null_grpc_nginx", "null_http"]
        for proto in ("grpc", "http"):
            for peer in order:
                for (m, p, conc), r in sorted(cells.get(peer, {}).items()):
                    if m != model or p != proto:
                        continue
                    k = kloop.get((m, p, conc))
                    ratio = (f"{k['rps'] / r['rps']:.2f}x"
                             if k and not peer.startswith("kloop") else "")
                    per_round = (" " + " / ".join(f"{x:.0f}" for x in r.get("rps_rounds", ()))
                                 + " |" if rounds > 1 else "")
                    lines.append(
                        f"| {PEER_LABELS.get(peer, peer)} | {p} | {conc} | {r['rps']:.0f} | "
                        f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | "
                        f"{_pct(r.get('server_cpu_pct'))} | {_pct(r.get('loadgen_cpu_pct'))} | "
                        f"{ratio} |{per_round}")
        lines.append("")
    if baseline:
        lines += ["### in-process limit (TorchScript, no server; the harness's baseline.py)", "",
                  "| model | batch | torch threads | items/s | p50 ms per call |",
                  "|---|---:|---:|---:|---:|"]
        for r in baseline:
            lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | "
                         f"{r['items_per_s']:.0f} | {r['p50_ms']:.2f} |")
        lines.append("")
    if kloop_graph:
        lines += ["### in-process, kloop's graph (loaded as `kloop serve` loads it, no server; "
                  "inprocess.py)", "",
                  "| model | batch | torch threads | graph | items/s | p50 ms per call |",
                  "|---|---:|---:|---|---:|---:|"]
        for r in kloop_graph:
            lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r.get('graph', '')} "
                         f"| {r['items_per_s']:.0f} | {r['p50_ms']:.2f} |")
        lines.append("")
    for variant in kloop_variants(runs):
        lines += [f"### targets: {PEER_LABELS.get(variant, variant)}", "",
                  "| check | cell | kloop | target | met |", "|---|---|---|---|---|"]
        for c in checks(runs, baseline, variant, kloop_graph):
            lines.append(f"| {c.name} | {c.cell} | {c.value} | {c.target} | {_mark(c.ok)} |")
        lines.append("")
    if failed:
        lines += ["", "Cells or servers that failed:", ""]
        lines += [f"- {r.get('peer')}: {r.get('error') or r.get('stderr', '')[:200]}" for r in failed]
    return "\n".join(lines) + "\n"


def print_rich(runs: list[dict[str, Any]], baseline: Sequence[Mapping[str, Any]],
               kloop_graph: Sequence[Mapping[str, Any]] = ()) -> None:
    """The verdicts as a terminal table."""
    from rich.console import Console
    from rich.table import Table

    for variant in kloop_variants(runs):
        table = Table(title=f"{PEER_LABELS.get(variant, variant)} against the peers "
                            "(ratios from this run)")
        for col in ("check", "cell", "kloop", "target", "met"):
            table.add_column(col)
        for c in checks(runs, baseline, variant, kloop_graph):
            met = "-" if c.ok is None else ("[green]yes" if c.ok else "[red]no")
            table.add_row(c.name, c.cell, c.value, c.target, met)
        Console().print(table)
