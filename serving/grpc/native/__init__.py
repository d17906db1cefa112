"""The server's native (C++) part: gRPC's C++ server (completion-queue API) as the gRPC front end.

``grpc_front`` is the compiled module, or None where it was not built; ``UNAVAILABLE`` then says
why. It is built by ``python -m serving.grpc.native.build`` (``scripts/setup`` runs it where gRPC's
C++ library is installed: Debian/Ubuntu ``libgrpc++-dev``).
"""

from __future__ import annotations

from types import ModuleType

grpc_front: ModuleType | None
try:
    from serving.grpc.native import _grpc_front as grpc_front
    UNAVAILABLE = ""
except ImportError as e:  # not built here, or built against another libgrpc++
    grpc_front = None
    UNAVAILABLE = (f"the native gRPC front end is not built ({e}); "
                   "run: python -m serving.grpc.native.build")
