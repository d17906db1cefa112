"""kloop's control plane: the rollout, its controller and backends, the pipeline and the CLI.

Layers, each importing only those below it (import-linter contracts in ``pyproject.toml``)::

    deploy.cli         the ``kloop`` command, one module per command group
    deploy.pipeline    the train-and-promote pipeline, its reports, the demo
    deploy.local       SQLite stores, run records, the local server backend, traffic
     | deploy.cluster  Kubernetes: client wrapper, CR store, reconciler, leader election,
                       training jobs, PromQL, KServe manifests and backend
                       (local and cluster are independent of each other)
    deploy.controller  ``tick`` / ``run_until_done``, written against the ports
    deploy.ports       the seams as Protocols (store, backend, metrics source, clock) + errors
    deploy.rollout     pure: policy, state, decide, transition, analysis, metric samples

Nothing here is imported by ``serving`` or ``trainer``.
"""
