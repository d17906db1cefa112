"""The gRPC adapter: OIP v2's ``GRPCInferenceService``.

``servicer`` (the RPCs on the dataplane, served by grpc.aio), ``converters`` (every protobuf
conversion, server and client side) and ``native`` (the native front end: gRPC's C++ server
with its fast lane, and the Python half that drives it). Independent of ``serving.http``.

Named ``grpc`` after what it adapts; absolute imports keep ``import grpc`` (grpcio) unshadowed
inside it, and nothing runs a file of this folder as a script.
"""
