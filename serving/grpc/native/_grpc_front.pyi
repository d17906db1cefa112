# The Python-visible API of the compiled native gRPC front end (grpc_front.cpp, its
# PYBIND11_MODULE block), for the type checker: keep the two in step.
from typing import Any

import numpy as np

GRPC_VERSION: str

# (input name, datatype, dims after the batch dimension, bytes of one row)
InputRoute = tuple[str, str, list[int], int]
# (model, version or '' for unversioned, route id = position in the list, most rows of a group,
#  inputs, the answer's model, the answer's version, [(output name, datatype)])
Route = tuple[str, str, int, int, list[InputRoute], str, str, list[tuple[str, str]]]
# (handle, method path, request bytes, seconds left or None without a deadline)
Call = tuple[int, str, bytes, float | None]

class Group:
    """Fast-lane calls of one route, in arrival order."""

    @property
    def route(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def member_rows(self) -> list[int]: ...
    @property
    def inputs(self) -> list[bytearray]: ...  # per input: the members' rows, concatenated
    @property
    def seconds_left(self) -> list[float | None]: ...  # per member
    @property
    def ages(self) -> list[float]: ...  # per member: seconds since its request arrived
    @property
    def handles(self) -> list[int]: ...
    def requests(self) -> list[tuple[int, bytes, float | None]]: ...
    def __len__(self) -> int: ...

class Front:
    def __init__(self, address: str, reuse_port: bool = False,
                 max_receive_bytes: int = ..., max_send_bytes: int = ...) -> None: ...
    @property
    def port(self) -> int: ...
    @property
    def fd(self) -> int: ...  # eventfd: readable when calls have arrived
    @property
    def held(self) -> int: ...  # calls arrived and not yet answered
    def poll(self) -> list[Call]: ...
    def respond(self, handle: int, code: int, details: str, payload: bytes) -> bool: ...
    def stop(self, grace: float = 0.0) -> None: ...
    def set_routes(self, generation: int, routes: list[Route]) -> None: ...
    def poll_groups(self) -> list[Group]: ...
    def respond_group(self, group: Group, outputs: list[np.ndarray[Any, Any]]) -> int: ...
    def fail_group(self, group: Group, code: int, details: str) -> int: ...
