"""The trusted module's gRPC service (proto/enclave.proto).

Start-up: verify the bundle manifest, measure this module's code and the manifest into the chain, unseal
the secrets with the keystore, pin the owner public key from the (measured) manifest. Requests: licenses
open sessions; sessions may transform batches. Every refusal is a gRPC status with a message naming the
field; no message ever contains a secret.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import warnings
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from enclave_sim.keystore import Keystore, KeystoreSpec
from enclave_sim.measure import Measurement, measurement_chain
from enclave_sim.payload import unpack
from protect.transform import transform_from_arrays
from sealnet._grpc import enclave_pb2, enclave_pb2_grpc
from sealnet.bundle import SECRETS, Bundle, core_digest, load_bundle
from sealnet.licenses import License, LicenseError, verify_license

log = logging.getLogger("sealnet.enclave")
# Request tensors are read-only views of the gRPC message (no copy); the transform never writes to them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SESSION_SECONDS = 3600


@dataclass
class _Session:
    license: License
    expires_at: float


class TrustedModule(enclave_pb2_grpc.TrustedModuleServicer):
    """Holds the unsealed transform; answers only sessions opened with a valid license."""

    def __init__(self, bundle: Bundle, keystore: Keystore, *, session_seconds: int = SESSION_SECONDS):
        self.bundle = bundle
        self.model_id = bundle.model_id
        self._owner = bundle.owner_public_key
        self._keystore = keystore
        self.measurements, _ = measurement_chain(core_digest(bundle.manifest))
        self.chain = keystore.extend(self.measurements)
        blob = bundle.path(SECRETS).read_bytes()
        config, arrays = unpack(keystore.unseal(blob, label=bundle.bundle_id))
        self._transform = transform_from_arrays(config, arrays)
        for array in arrays.values():
            array.fill(0)
        self._input_shape = tuple(bundle.manifest["input"]["shape"][1:])
        self._max_batch = int(bundle.manifest.get("max_batch", 1024))
        self._session_seconds = session_seconds
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    # -- rpc ---------------------------------------------------------------------------------------------
    def Health(self, request, context):
        return enclave_pb2.HealthResponse(serving=True, model_id=self.model_id, method=self.bundle.manifest["method"])

    def Attest(self, request, context):
        if not 16 <= len(request.nonce) <= 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "nonce: must be 16-64 bytes of fresh randomness")
        evidence = self._keystore.quote(request.nonce)
        return enclave_pb2.AttestResponse(
            measurements=[enclave_pb2.Measurement(name=m.name, sha256=m.sha256) for m in self.measurements],
            chain=evidence.chain, attestation_public_key=evidence.public_key, signature=evidence.signature,
            format=evidence.format, quoted=evidence.quoted,
        )

    def OpenSession(self, request, context):
        if not request.license:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "license: empty; pass a token from `sealnet license issue`")
        try:
            lic = verify_license(request.license, self._owner, model_id=self.model_id)
        except LicenseError as exc:
            log.info("open_session refused: %s", exc)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"license: {exc}")
        session_id = secrets.token_urlsafe(24)
        expires_at = min(time.time() + self._session_seconds, lic.expires_at)
        with self._lock:
            now = time.time()
            for sid in [s for s, v in self._sessions.items() if v.expires_at <= now]:
                del self._sessions[sid]
            self._sessions[session_id] = _Session(lic, expires_at)
        log.info("session opened for customer %s (license %s)", lic.customer_id, lic.license_id)
        return enclave_pb2.OpenSessionResponse(session_id=session_id, expires_at=int(expires_at),
                                               customer_id=lic.customer_id)

    def Preprocess(self, request, context):
        self._session(request.session_id, context)
        batch = self._tensor(request.input, context)
        with torch.no_grad():
            out = self._transform(torch.from_numpy(batch)).numpy()
        return enclave_pb2.PreprocessResponse(output=enclave_pb2.Tensor(shape=list(out.shape), data=out.tobytes()))

    # -- checks ------------------------------------------------------------------------------------------
    def _session(self, session_id: str, context) -> _Session:
        if not session_id:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "session_id: empty; call OpenSession with a license first")
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= time.time():
                del self._sessions[session_id]
                session = None
        if session is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "session_id: unknown or expired; open a new session")
        return session

    def _tensor(self, tensor, context) -> np.ndarray:
        shape = tuple(tensor.shape)
        if len(shape) != 1 + len(self._input_shape) or shape[1:] != self._input_shape:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input.shape: expected [N, {', '.join(map(str, self._input_shape))}], got {list(shape)}")
        if not 1 <= shape[0] <= self._max_batch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input.shape: batch must be 1..{self._max_batch}")
        expected = int(np.prod(shape)) * 4
        if len(tensor.data) != expected:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input.data: {len(tensor.data)} bytes for shape {list(shape)}, expected {expected} "
                          "(float32)")
        batch = np.frombuffer(tensor.data, dtype="<f4").reshape(shape)
        if not np.isfinite(batch).all():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input.data: contains NaN or infinity")
        return batch


def describe_measurements(measurements: list[Measurement]) -> str:
    return "\n".join(f"{m.sha256.hex()}  {m.name}" for m in measurements)


def serve(bundle_dir: Path, address: str, keystore: KeystoreSpec, *, workers: int = 4,
          ready: threading.Event | None = None) -> tuple[grpc.Server, TrustedModule]:
    """Build and start the server; returns it running. `address` is unix:PATH or HOST:PORT."""
    bundle = load_bundle(bundle_dir)
    store = keystore.open()
    try:
        module = TrustedModule(bundle, store)
    except BaseException:
        store.close()
        raise
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="enclave"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    enclave_pb2_grpc.add_TrustedModuleServicer_to_server(module, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix://").removeprefix("unix:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        old = os.umask(0o177)  # the socket is created 0600: only this user may talk to the module
        try:
            bound = server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(old)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot listen on {address}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("sealnet.enclave.TrustedModule", health_pb2.HealthCheckResponse.SERVING)
    if ready is not None:
        ready.set()
    return server, module
