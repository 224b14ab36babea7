"""The runtime's branch of sealnet's exception tree (sealnet/errors.py): every refusal carries the gRPC status
a client gets and a message that names the field or the cause (never a secret). The servers' error interceptor
(sealnet/rpc.py) answers with `status`; `code` is the same status, the name the engines have always used."""

from __future__ import annotations

import grpc

from sealnet.errors import SealnetError


class ServingError(SealnetError):
    """A request the runtime could not serve, with the status to answer with (one class, many statuses)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message, status=code)

    @property
    def code(self) -> grpc.StatusCode:
        return self.status


class RequestError(ServingError):
    """Refused before any work: the request itself is wrong (unknown model, bad tensor, missing license)."""


class EnclaveError(ServingError):
    """The trusted module refused or could not answer (UNAVAILABLE when it is down: the runtime fails closed)."""


class AttestationFailed(EnclaveError):
    """The module answered but is not the one the bundle expects (UNAVAILABLE to clients: fail closed)."""

    status = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class InternalError(ServingError):
    """The runtime itself failed on a batch (e.g. ONNX Runtime); only that batch's requests see it."""

    status = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.INTERNAL, message)
