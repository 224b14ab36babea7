"""The runtime's side of the trusted-module protocol.

Sessions are cached per license (by the token's hash, never the token in logs); every call names the end
client, whose lockout the module checks on each one. Before any input is sent,
the module must pass attestation against the bundle's expected measurements; after any outage it must pass
again, so a module swapped while the runtime ran is caught. The channel reconnects with a short backoff
(100 ms .. 1 s) so service resumes within about a second of the module's return.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sealnet._grpc import enclave_pb2, enclave_pb2_grpc
from sealnet.rpc import CLIENT_METADATA, MAX_MESSAGE_BYTES
from sealnet.runtime.errors import AttestationFailed, EnclaveError

log = logging.getLogger("sealnet.runtime")

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def channel_target(address: str) -> str:
    """Accept unix:PATH, unix:///PATH or HOST:PORT."""
    if address.startswith("unix://"):
        return "unix:" + address.removeprefix("unix://")
    return address


def client_credentials(tls_dir: Path, name: str = "runtime") -> grpc.ChannelCredentials:
    files = {"ca.crt": Path(tls_dir) / "ca.crt", "key": Path(tls_dir) / f"client-{name}.key",
             "crt": Path(tls_dir) / f"client-{name}.crt"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"mTLS files missing: {', '.join(missing)} (create them with `sealnet certs`)")
    return grpc.ssl_channel_credentials(root_certificates=files["ca.crt"].read_bytes(),
                                        private_key=files["key"].read_bytes(),
                                        certificate_chain=files["crt"].read_bytes())


# (rpc name, seconds, status code or None on success): what a metrics exporter needs, never a tensor or a token
CallObserver = Callable[[str, float, grpc.StatusCode | None], None]


class EnclaveClient:
    def __init__(self, address: str, *, timeout: float = 10.0, tls_dir: Path | None = None,
                 tls_name: str = "runtime", expected: dict[str, Any] | None = None,
                 observer: CallObserver | None = None):
        self.address = address
        self.observer = observer
        self.timeout = timeout
        self.expected = expected
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        target = channel_target(address)
        if tls_dir is not None:
            self._channel = grpc.secure_channel(target, client_credentials(tls_dir, tls_name), options=options)
        else:
            if not target.startswith("unix:"):
                raise ValueError(f"trusted module at {address}: TCP requires mTLS; pass its --tls-dir")
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = enclave_pb2_grpc.TrustedModuleStub(self._channel)
        self._sessions: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._attested = expected is None
        self._attest_lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, metadata=None):
        started = time.perf_counter()
        try:
            reply = method(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            self._observe(request, started, code)
            if code in _UNREACHABLE:
                if self.expected is not None:
                    self._attested = False  # whoever answers next must prove itself again
                raise EnclaveError(grpc.StatusCode.UNAVAILABLE,
                                   "trusted module unavailable; no result computed without it") from None
            raise EnclaveError(code, exc.details() or code.name) from None
        self._observe(request, started, None)
        return reply

    def _observe(self, request, started: float, code: grpc.StatusCode | None) -> None:
        if self.observer is not None:
            self.observer(type(request).__name__.removesuffix("Request"), time.perf_counter() - started, code)

    def health(self) -> enclave_pb2.HealthResponse:
        return self._call(self._stub.Health, enclave_pb2.HealthRequest())

    def attest(self, nonce: bytes) -> enclave_pb2.AttestResponse:
        return self._call(self._stub.Attest, enclave_pb2.AttestRequest(nonce=nonce))

    def ensure_attested(self) -> None:
        """Verify the module (once, and again after every outage); AttestationFailed if it is not the expected one."""
        if self._attested:
            return
        from sealnet.runtime.attestation import AttestationError, attest

        with self._attest_lock:
            if self._attested:
                return
            try:
                attest(self, self.expected)
            except AttestationError as exc:
                log.error("trusted module at %s failed attestation: %s", self.address, exc)
                raise AttestationFailed(f"trusted module failed attestation: {exc}") from None
            with self._lock:
                self._sessions.clear()  # sessions of a previous module instance are void
            self._attested = True

    def session_for(self, license_token: str, client: str = "") -> str:
        """A live session id for this license, opening one if needed (cached by the token's hash)."""
        key = hashlib.sha256(license_token.encode()).hexdigest()
        with self._lock:
            cached = self._sessions.get(key)
        if cached and cached[1] > time.time() + 5:
            return cached[0]
        metadata = [(CLIENT_METADATA, client)] if client else None
        reply = self._call(self._stub.OpenSession, enclave_pb2.OpenSessionRequest(license=license_token), metadata)
        with self._lock:
            self._sessions[key] = (reply.session_id, float(reply.expires_at))
        return reply.session_id

    def _with_session(self, license_token: str, client: str, call):
        """call(session_id, metadata) with this license's session; reopen it once if the module forgot it
        (expiry). The metadata names the end client: the module checks its lockout on every call, so a client
        locked out after the session was opened is refused although the session is cached here."""
        self.ensure_attested()
        metadata = [(CLIENT_METADATA, client)] if client else None
        for attempt in range(2):
            session_id = self.session_for(license_token, client)
            try:
                return call(session_id, metadata)
            except EnclaveError as exc:
                if exc.code != grpc.StatusCode.UNAUTHENTICATED or attempt:
                    raise
                with self._lock:
                    self._sessions.pop(hashlib.sha256(license_token.encode()).hexdigest(), None)
        raise AssertionError("unreachable")

    def preprocess(self, license_token: str, batch: np.ndarray, client: str = "") -> np.ndarray:
        """Send a raw float32 batch through the trusted module."""
        batch = np.ascontiguousarray(batch, dtype="<f4")
        tensor = enclave_pb2.Tensor(shape=list(batch.shape), data=batch.tobytes())
        reply = self._with_session(license_token, client, lambda sid, md: self._call(
            self._stub.Preprocess, enclave_pb2.PreprocessRequest(session_id=sid, input=tensor), md))
        out = np.frombuffer(reply.output.data, dtype="<f4")
        if out.size != batch.size or tuple(reply.output.shape) != batch.shape:
            raise EnclaveError(grpc.StatusCode.INTERNAL, "trusted module returned a tensor of the wrong shape")
        return out.reshape(batch.shape)

    def passport_params(self, license_token: str, items: int, client: str = "") -> dict[str, np.ndarray]:
        """The passport layers' gamma/beta for a batch of `items` inputs (passport bundles)."""
        reply = self._with_session(license_token, client, lambda sid, md: self._call(
            self._stub.PassportParams, enclave_pb2.PassportParamsRequest(session_id=sid, items=items), md))
        params = {}
        for named in reply.params:
            value = np.frombuffer(named.tensor.data, dtype="<f4")
            if value.size != int(np.prod(named.tensor.shape)):
                raise EnclaveError(grpc.StatusCode.INTERNAL, f"trusted module returned a malformed {named.name}")
            params[named.name] = value.reshape(tuple(named.tensor.shape))
        return params

    def classify(self, license_token: str, features: np.ndarray, outputs: list[dict[str, Any]],
                 client: str = "") -> dict[str, np.ndarray]:
        """Sealed-head bundles: the answer for a batch of backbone features, as the module's output policy
        shapes it; checked against the manifest's `outputs` (names, datatypes, trailing dims)."""
        features = np.ascontiguousarray(features, dtype="<f4")
        tensor = enclave_pb2.Tensor(shape=list(features.shape), data=features.tobytes())
        reply = self._with_session(license_token, client, lambda sid, md: self._call(
            self._stub.Classify, enclave_pb2.ClassifyRequest(session_id=sid, features=tensor), md))
        if [named.name for named in reply.outputs] != [spec["name"] for spec in outputs]:
            raise EnclaveError(grpc.StatusCode.INTERNAL, "trusted module returned outputs that do not match this "
                               "bundle's manifest")
        answer = {}
        for named, spec in zip(reply.outputs, outputs, strict=True):
            value = decode_tensor(named.tensor, spec["datatype"])
            if value is None or value.shape != (len(features), *spec["shape"][1:]):
                raise EnclaveError(grpc.StatusCode.INTERNAL, f"trusted module returned a malformed {spec['name']}")
            answer[spec["name"]] = value
        return answer


_DTYPES = {"FP32": "<f4", "INT64": "<i8"}


def decode_tensor(tensor: enclave_pb2.Tensor, datatype: str) -> np.ndarray | None:
    """The array a module Tensor holds, or None when its datatype, size or shape is inconsistent."""
    if (tensor.datatype or "FP32") != datatype:
        return None
    dtype = np.dtype(_DTYPES[datatype])
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape) or len(tensor.data) != int(np.prod(shape)) * dtype.itemsize:
        return None
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
