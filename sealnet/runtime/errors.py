"""The runtime's one exception tree: every refusal carries the gRPC status a client gets and a message that
names the field or the cause (never a secret). The servers map `ServingError.code` to the RPC status."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request the runtime could not serve; `code` is the status to answer with."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class RequestError(ServingError):
    """Refused before any work: the request itself is wrong (unknown model, bad tensor, missing license)."""


class EnclaveError(ServingError):
    """The trusted module refused or could not answer (UNAVAILABLE when it is down: the runtime fails closed)."""


class AttestationFailed(EnclaveError):
    """The module answered but is not the one the bundle expects (UNAVAILABLE to clients: fail closed)."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class InternalError(ServingError):
    """The runtime itself failed on a batch (e.g. ONNX Runtime); only that batch's requests see it."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.INTERNAL, message)
