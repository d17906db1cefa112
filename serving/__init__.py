"""kloop's model server: Open Inference Protocol v2 over gRPC and HTTP.

Layers (enforced by import-linter in pyproject.toml): ``serving.core`` is protocol-neutral
(typed requests, validation, model repository, dataplane); ``serving.grpc.servicer`` and
``serving.http.routes`` only convert and delegate; ``serving.app`` wires both onto one event loop;
``serving.client`` holds the clients that deploy, load tests and tests use.
"""
