"""The control plane: one long-running service (``kloop up``) that owns pipeline runs and local
rollouts, with an HTTP/JSON and a gRPC API (``proto/control.proto``) and a web UI.

Modules, lowest first: ``progress`` (training progress and curves from a run's files) and
``logs`` < ``views`` (the resources as JSON, one shape for both protocols) < ``service``
(``ControlPlane``: runs in threads, the rollout ticker, user operations, recovery after a
restart) < ``metrics`` (its ``/metrics``), ``openapi`` < ``ui`` (server-rendered pages),
``http_api``, ``grpc_api`` < ``server`` (one process, one event loop). ``client`` is the HTTP
client the CLI and the demo use.
"""
