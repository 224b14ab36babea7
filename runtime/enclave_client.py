"""The runtime's side of the trusted-module protocol: sessions cached per license, raw-bytes tensors."""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import numpy as np

from sealnet._grpc import enclave_pb2, enclave_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class EnclaveError(Exception):
    """The trusted module refused or could not answer; `code` is the gRPC status to pass on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def channel_target(address: str) -> str:
    """Accept unix:PATH, unix:///PATH or HOST:PORT."""
    if address.startswith("unix://"):
        return "unix:" + address.removeprefix("unix://")
    return address


class EnclaveClient:
    def __init__(self, address: str, *, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            channel_target(address),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        self._stub = enclave_pb2_grpc.TrustedModuleStub(self._channel)
        self._sessions: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise EnclaveError(grpc.StatusCode.UNAVAILABLE,
                                   "trusted module unavailable; no result computed without it") from None
            raise EnclaveError(code, exc.details() or code.name) from None

    def health(self) -> enclave_pb2.HealthResponse:
        return self._call(self._stub.Health, enclave_pb2.HealthRequest())

    def attest(self, nonce: bytes) -> enclave_pb2.AttestResponse:
        return self._call(self._stub.Attest, enclave_pb2.AttestRequest(nonce=nonce))

    def session_for(self, license_token: str) -> str:
        """A live session id for this license, opening one if needed (cached by the token's hash)."""
        key = hashlib.sha256(license_token.encode()).hexdigest()
        with self._lock:
            cached = self._sessions.get(key)
        if cached and cached[1] > time.time() + 5:
            return cached[0]
        reply = self._call(self._stub.OpenSession, enclave_pb2.OpenSessionRequest(license=license_token))
        with self._lock:
            self._sessions[key] = (reply.session_id, float(reply.expires_at))
        return reply.session_id

    def preprocess(self, license_token: str, batch: np.ndarray) -> np.ndarray:
        """Send a raw float32 batch through the trusted module; reopen the session once if it expired."""
        batch = np.ascontiguousarray(batch, dtype="<f4")
        tensor = enclave_pb2.Tensor(shape=list(batch.shape), data=batch.tobytes())
        for attempt in range(2):
            session_id = self.session_for(license_token)
            try:
                reply = self._call(self._stub.Preprocess,
                                   enclave_pb2.PreprocessRequest(session_id=session_id, input=tensor))
                break
            except EnclaveError as exc:
                if exc.code != grpc.StatusCode.UNAUTHENTICATED or attempt:
                    raise
                with self._lock:
                    self._sessions.pop(hashlib.sha256(license_token.encode()).hexdigest(), None)
        out = np.frombuffer(reply.output.data, dtype="<f4")
        if out.size != batch.size or tuple(reply.output.shape) != batch.shape:
            raise EnclaveError(grpc.StatusCode.INTERNAL, "trusted module returned a tensor of the wrong shape")
        return out.reshape(batch.shape)
