"""The metrics contract between the model server (which exports) and the rollout analysis
(which reads, from ``/metrics`` or through PromQL): names and labels, defined once.

Per model version, labelled ``model`` and ``version`` (the registry's version number, as text):

* ``REQUESTS`` (counter, also ``protocol``): every inference request routed to the version;
* ``ERRORS`` (counter, also ``protocol`` and ``code``): of those, the failed ones; ``code`` is
  the HTTP status the error maps to (gRPC errors too), so ``code >= 500`` are server errors
  and the rest the client's;
* ``DURATION`` (histogram, seconds, also ``protocol``): request latency;
* ``WEIGHT`` (gauge, percent): the share of unpinned traffic the version receives.

The server exports more (queue and compute time, batch sizes, in-flight requests: see
``serving.metrics``); these four are what a canary is judged on, so they are the contract.
"""

from __future__ import annotations

REQUESTS = "kloop_inference_requests_total"
ERRORS = "kloop_inference_errors_total"
DURATION = "kloop_inference_request_duration_seconds"
WEIGHT = "kloop_model_traffic_weight"

MODEL_LABEL = "model"
VERSION_LABEL = "version"
PROTOCOL_LABEL = "protocol"
CODE_LABEL = "code"
