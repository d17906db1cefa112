"""The server's one error tree. Adapters map it once per protocol (``serving.errormap``).

::

    ServingError
    ├── ModelNotFound      no such model, or that version is not loaded    -> 404 / NOT_FOUND
    ├── ModelNotReady      known but cannot serve now (shutting down, ...)  -> 503 / UNAVAILABLE
    ├── InvalidInput       the request does not fit the model's signature  -> 400 / INVALID_ARGUMENT
    ├── Unauthorized       management call without the right token         -> 401 / UNAUTHENTICATED
    ├── Overloaded         no capacity for this request now                -> 503 / RESOURCE_EXHAUSTED
    ├── InferenceFailed    the model (or an injected fault) failed          -> 500 / INTERNAL
    ├── DeadlineExceeded   the request's deadline passed before it ran      -> 504 / DEADLINE_EXCEEDED
    ├── Conflict           management change refused by the current state   -> 409 / FAILED_PRECONDITION
    └── ArtifactRejected   a version failed its hash check or has a format
                           this server will not load                        -> 422 / FAILED_PRECONDITION

The tables live in ``serving.errormap`` (outside the core: status codes are transport facts).
Library errors (torch, numpy, the registry) are translated where they happen, with the cause
chained, so no adapter ever sees them.
"""

from __future__ import annotations


class ServingError(Exception):
    """Root of every error the server reports to a client."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class ModelNotFound(ServingError):
    pass


class ModelNotReady(ServingError):
    pass


class InvalidInput(ServingError):
    pass


class Unauthorized(ServingError):
    pass


class Overloaded(ServingError):
    pass


class InferenceFailed(ServingError):
    pass


class DeadlineExceeded(ServingError):
    """The client's deadline (gRPC deadline, HTTP timeout header, ``timeout`` parameter)
    passed while the request waited; it is dropped before the model runs."""


class Conflict(ServingError):
    """E.g. unloading a version that still carries traffic."""


class ArtifactRejected(ServingError):
    """The registry holds the version, but it is corrupt or not in a loadable format."""
