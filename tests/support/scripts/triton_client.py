"""NVIDIA tritonclient against a running kloop server (run in the clients venv).

Usage: triton_client.py {grpc|http} ADDRESS TOKEN. HTTP runs every datatype twice: binary
tensors (tritonclient's default) and JSON (``binary_data=False`` both ways)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from cases import DATATYPES, assert_equal, model_name, run, sample


def make_checks(protocol: str, address: str, token: str) -> list[tuple[str, Callable[[], None]]]:
    import ml_dtypes

    if protocol == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    from tritonclient.utils import InferenceServerException

    client = client_lib.InferenceServerClient(url=address)
    checks: list[tuple[str, Callable[[], None]]] = []

    def health() -> None:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("id-fp32")
        assert not client.is_model_ready("no-such-model")

    def metadata() -> None:
        server = _as_dict(client.get_server_metadata())
        assert server["name"] == "kloop"
        assert {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
        meta = _as_dict(client.get_model_metadata("id-int8"))
        assert meta["platform"] == "pytorch_torch_export" and meta["versions"] == ["1"]
        (inp,) = meta["inputs"]
        assert inp["name"] == "x" and inp["datatype"] == "INT8"
        assert [int(d) for d in inp["shape"]] == [-1, 3]

    def _as_dict(m: object) -> dict:
        if protocol == "http":
            return m  # type: ignore[return-value]
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(m, preserving_proto_field_name=True)

    def infer(datatype: str, binary: bool) -> Callable[[], None]:
        def check() -> None:
            data = sample(datatype, text=not binary)
            # tritonclient >= 2.69 takes BF16 as ml_dtypes.bfloat16 (its own dependency)
            sent = data.astype(ml_dtypes.bfloat16) if datatype == "BF16" else data
            inp = client_lib.InferInput("x", list(data.shape), datatype)
            if protocol == "http":
                inp.set_data_from_numpy(sent, binary_data=binary)
                out = client_lib.InferRequestedOutput("y", binary_data=binary)
            else:
                inp.set_data_from_numpy(sent)
                out = client_lib.InferRequestedOutput("y")
            result = client.infer(model_name(datatype), [inp], outputs=[out], request_id="t1")
            assert_equal(result.as_numpy("y"), data)
            # Without requested outputs tritonclient asks for every output (binary over HTTP).
            assert_equal(client.infer(model_name(datatype), [inp]).as_numpy("y"), data)
        return check

    def wrong_shape_is_invalid() -> None:
        inp = client_lib.InferInput("x", [2, 2], "FP32")
        inp.set_data_from_numpy(sample("FP32")[:, :2].copy())
        try:
            client.infer("id-fp32", [inp])
        except InferenceServerException as e:
            assert "shape" in str(e), e
        else:
            raise AssertionError("a wrong shape was accepted")

    checks += [("health", health), ("metadata", metadata), ("invalid", wrong_shape_is_invalid)]
    for datatype in DATATYPES:
        checks.append((f"infer {datatype} binary", infer(datatype, True)))
        if protocol == "http" and datatype != "BF16":  # BF16 has no JSON form
            checks.append((f"infer {datatype} json", infer(datatype, False)))

    if protocol == "http":
        auth = {"Authorization": f"Bearer {token}"}

        def repository() -> None:
            index = {(m["name"], m.get("version")): m["state"]
                     for m in client.get_model_repository_index()}
            assert index[("id-fp32", "1")] == "READY"
            try:
                client.unload_model("id-fp64")  # no token
            except InferenceServerException as e:
                assert "401" in str(e.status()) or "token" in str(e), e
            else:
                raise AssertionError("unload without a token was accepted")
            client.unload_model("id-fp64", headers=auth)
            assert not client.is_model_ready("id-fp64")
            states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
            assert states["id-fp64"] == "UNAVAILABLE"
            client.load_model("id-fp64", headers=auth)
            assert client.is_model_ready("id-fp64")

        checks.append(("repository extension", repository))
    return checks


def main(protocol: str, address: str, token: str) -> None:
    run(make_checks(protocol, address, token))


if __name__ == "__main__":
    main(*sys.argv[1:4])
