"""kloop's control plane: rollouts (state machine, analysis, store, backends), KServe manifests.

Public modules: ``deploy.rollout`` (the rollout as data, ``decide``), ``deploy.analysis``
(gate and live verdicts), ``deploy.metrics`` (Prometheus samples), ``deploy.store`` (SQLite),
``deploy.backends`` (the backend protocol; ``deploy.backends.local``), ``deploy.controller``
(``tick``), ``deploy.kserve`` (manifests). Nothing here is imported by ``serving``/``trainer``.
"""
