"""The one table from the core's error tree to each protocol's status.

Kept outside ``serving.core`` because status codes are transport facts, and kept as names
(not ``grpc.StatusCode`` members) so the metrics module can use the HTTP column without
importing gRPC. The first matching class in MRO order wins, so subclasses inherit a mapping.
"""

from __future__ import annotations

from serving.core.errors import (
    ArtifactRejected,
    Conflict,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServingError,
    Unauthorized,
)

# error class -> (HTTP status, gRPC status code name)
_TABLE: dict[type, tuple[int, str]] = {
    ModelNotFound: (404, "NOT_FOUND"),
    ModelNotReady: (503, "UNAVAILABLE"),
    InvalidInput: (400, "INVALID_ARGUMENT"),
    Unauthorized: (401, "UNAUTHENTICATED"),
    Overloaded: (503, "RESOURCE_EXHAUSTED"),
    InferenceFailed: (500, "INTERNAL"),
    DeadlineExceeded: (504, "DEADLINE_EXCEEDED"),
    Conflict: (409, "FAILED_PRECONDITION"),
    ArtifactRejected: (422, "FAILED_PRECONDITION"),
    ServingError: (500, "INTERNAL"),
}


def _row(exc: BaseException) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    return 500, "INTERNAL"  # not a ServingError: a bug; never leak its text as a status


def http_status(exc: BaseException) -> int:
    return _row(exc)[0]


def grpc_code_name(exc: BaseException) -> str:
    return _row(exc)[1]
