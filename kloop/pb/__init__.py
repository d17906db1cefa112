"""Generated Open Inference Protocol v2 stubs (``python proto/generate.py``; do not edit).

The messages live under the protobuf package ``kloop.inference`` so they can share a process
with ``kserve`` or ``tritonclient``; the gRPC service keeps the standard name
``inference.GRPCInferenceService``, so the method paths on the wire are the ones Triton and
KServe clients call.
"""
