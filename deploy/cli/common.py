"""What several ``kloop`` commands share: the state directory, kubectl's flags, the rollout
policy's flags (every setting of ``deploy.rollout.KNOBS``), finding the local server."""

from __future__ import annotations

import argparse
import math
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.local.home import Home
from deploy.local.server_process import TOKEN_FILE, ServerHandle, discover
from deploy.rollout import KNOBS, AnalysisPolicy, GatePolicy, Knob, MetricThreshold, RolloutPolicy
from serving.cli import TOKEN_ENV

if TYPE_CHECKING:
    from deploy.cluster.kube import Kube

HOME_ENV = "KLOOP_HOME"
HOME_REGISTRY = "$KLOOP_HOME/registry"
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def home(args: argparse.Namespace) -> Home:
    root = args.home or os.environ.get(HOME_ENV) or "~/.kloop"
    return Home(Path(root).expanduser().resolve())


# ---- the cluster: kubectl's habits ------------------------------------------------------------


def add_kube_args(p: argparse.ArgumentParser, *, many_namespaces: bool = False) -> None:
    g = p.add_argument_group("cluster (kubectl's habits)")
    g.add_argument("--kubeconfig", type=Path,
                   help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    g.add_argument("--context", help="kubeconfig context")
    if many_namespaces:
        g.add_argument("-n", "--namespace", action="append", dest="namespaces", default=[],
                       help="namespace whose Rollouts to reconcile; repeat for several "
                            "(default: the context's namespace)")
    else:
        g.add_argument("-n", "--namespace", help="namespace (default: the context's)")


def kube(args: argparse.Namespace, namespace: str | None = None) -> Kube:
    from deploy.cluster.kube import Kube, KubeConfig

    return Kube.connect(KubeConfig(kubeconfig=args.kubeconfig, context=args.context,
                                   namespace=namespace or getattr(args, "namespace", None)))


# ---- the rollout policy: one flag per setting --------------------------------------------------


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """``--steps``, ``--min-requests``, ...: every ``RolloutPolicy`` setting, with its default.
    A renamed setting also answers to its former flag (``--max-accuracy-drop`` is
    ``--gate-tolerance``); a repeated one (``--gate-condition``) takes one item per flag."""
    default = RolloutPolicy().to_dict()
    g = p.add_argument_group("rollout policy (deploy.rollout.RolloutPolicy)")
    for knob in KNOBS:
        value = default[knob.name]
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        alias = f"; alias {', '.join(knob.alias_flags)}" if knob.aliases else ""
        g.add_argument(knob.flag, *knob.alias_flags, dest=_dest(knob), type=_parser(knob),
                       default=None, action="append" if knob.repeated else "store",
                       metavar="METRIC:KEY=VALUE" if knob.repeated else knob.name.upper(),
                       help=f"{knob.help} (default: {shown if shown not in (None, '') else 'none'}"
                            f"{alias})")


def policy(args: argparse.Namespace) -> RolloutPolicy:
    """The policy the flags describe: the defaults, changed where a flag was given."""
    return RolloutPolicy.from_dict(given_policy(args))


def given_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The policy settings given as flags on this command line, by persisted key."""
    given = {knob: getattr(args, _dest(knob)) for knob in KNOBS}
    return {knob.name: knob.dump(tuple(v) if isinstance(v, list) else v)
            for knob, v in given.items() if v is not None}


def _dest(knob: Knob) -> str:
    return "policy_" + knob.name


def _parser(knob: Knob) -> Callable[[str], Any]:
    """How a flag's text becomes the setting's value, from the setting's declared type. A gate
    setting is also checked alone against ``GatePolicy``'s own rules, so a bad value is refused
    naming its flag (the gate has no cross-field rules that another flag could satisfy)."""
    owner = {"rollout": RolloutPolicy, "analysis": AnalysisPolicy, "gate": GatePolicy}
    hint = typing.get_type_hints(owner[knob.section])[knob.field]
    parse = _base_parser(knob, hint)
    if knob.section != "gate":
        return parse

    def checked(text: str) -> Any:
        value = parse(text)
        try:
            fields: dict[str, Any] = {knob.field: (value,) if knob.repeated else value}
            GatePolicy(**fields)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return checked


def _base_parser(knob: Knob, hint: Any) -> Callable[[str], Any]:
    if hint == tuple[int, ...]:
        return _int_list
    if hint == tuple[MetricThreshold, ...]:
        return _condition
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if base is float:
        return finite
    if base in (int, str):
        return typing.cast(Callable[[str], Any], base)
    raise TypeError(f"no flag parser for {knob.name}: {hint}")


def _condition(text: str) -> MetricThreshold:
    """``--gate-condition METRIC:key=value[,key=value]``."""
    try:
        return MetricThreshold.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def finite(text: str) -> float:
    """A float flag: ``inf`` and ``nan`` are refused here, naming the flag (argparse does)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "integers") from e


# ---- the local server -------------------------------------------------------------------------


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="HTTP HOST:PORT of the server (default: the one `kloop serve` "
                                    "recorded)")
    p.add_argument("--grpc-target", help="gRPC HOST:PORT (with --server)")


def server(args: argparse.Namespace, h: Home) -> ServerHandle | None:
    """The server named by ``--server`` (its token from the environment or the home), else the
    one ``kloop serve`` recorded in the home."""
    if getattr(args, "server", None):
        token = os.environ.get(TOKEN_ENV) or _read_token(h)
        if not token:
            raise ValueError(f"--server needs the server's admin token: set {TOKEN_ENV} "
                             f"or put it in {h.root / TOKEN_FILE}")
        host_port = args.server.removeprefix("http://").rstrip("/")
        grpc = args.grpc_target or host_port
        return ServerHandle(http_url=f"http://{host_port}", grpc_target=grpc, token=token)
    return discover(h.root)


def _read_token(h: Home) -> str | None:
    try:
        return (h.root / TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None
