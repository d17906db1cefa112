"""The protocol-neutral core of the model server: no gRPC, no HTTP framework in here."""
