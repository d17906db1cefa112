"""kloop's model server: Open Inference Protocol v2 over gRPC and HTTP.

By role (the layers are import-linter contracts in pyproject.toml):

* ``serving.core``: protocol-neutral; typed requests, validation, the model repository,
  batching, how models run, the request path (``dataplane``) and the management surface
  (``management``);
* ``serving.grpc`` and ``serving.http``: the two adapters, independent of each other; each
  converts its wire format and delegates to the core (gRPC: ``servicer``, ``converters``, the
  native front end ``native``; HTTP: ``routes``, ``admin_routes``, ``codec``);
* ``serving.errormap`` (the one error table, both protocols' columns) and ``serving.metrics``,
  below the adapters;
* ``serving.app`` wires both adapters onto one event loop; ``serving.cli`` is ``kloop serve``
  and ``python -m serving``; ``serving.client`` holds the clients that deploy, load tests and
  tests use; ``serving.workers`` and ``serving.openmp`` are process-level helpers of the CLI.
"""
