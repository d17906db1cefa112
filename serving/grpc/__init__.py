"""The gRPC adapter: OIP v2's ``GRPCInferenceService``.

``servicer`` (the RPCs on the dataplane, served by grpc.aio), ``converters`` (every protobuf
conversion, server and client side) and ``native`` (the native front end: gRPC's C++ server
with its fast lane, and the Python half that drives it). Independent of ``serving.http``.

Named ``grpc`` after what it adapts (as MLServer's and KServe's are): absolute imports keep
``import grpc`` (grpcio) unshadowed. Only a ``sys.path`` that starts at ``serving/`` itself would
shadow it, as ``python serving`` (the folder run as a script) makes one: use ``python -m
serving``, as everything in kloop does.
"""
