"""The trusted module's gRPC service (proto/enclave.proto).

Start-up: verify the bundle manifest, extend the keystore's chain with this module's code and the manifest,
unseal the secrets (refused if either changed), pin the owner public key from the measured manifest.
Requests: licenses open expiring sessions; sessions may transform batches (transform bundles), stamp them with
the serial number (DSN bundles: only for the student's own customer and serial number) or fetch the passport
layers' gamma/beta (passport bundles, scheme V1). Every refusal is a gRPC status
whose message names the field; no message, log line or audit record ever contains a secret.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sealnet._grpc import enclave_pb2, enclave_pb2_grpc
from sealnet.bundle import CLASSIFY, PARAMS, PREPROCESS, SECRETS, Bundle, core_digest, load_bundle
from sealnet.enclave_sim.keystore import Keystore
from sealnet.enclave_sim.keystore_spec import KeystoreSpec
from sealnet.enclave_sim.measure import measurement_chain
from sealnet.enclave_sim.payload import unpack
from sealnet.enclave_sim.policy import AccessPolicy, AuditLog, PolicyConfig, PolicyRefusal, Revocations
from sealnet.enclave_sim.secrets import SECRETS as SECRETS_BY_METHOD
from sealnet.enclave_sim.secrets import open_secret
from sealnet.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from sealnet.licenses import License, LicenseError, verify_license
from sealnet.rpc import CLIENT_METADATA, MAX_MESSAGE_BYTES, ErrorInterceptor, add_servicer, clip

log = logging.getLogger("sealnet.enclave")

SESSION_SECONDS = 900
_RPC_OF_STEP = {PREPROCESS: "Preprocess", PARAMS: "PassportParams", CLASSIFY: "Classify"}


@dataclass
class _Session:
    license: License
    client: str
    expires_at: float


def caller_identity(context) -> str:
    """Who is calling directly: the mTLS certificate's common name, else the peer address without its port."""
    auth = context.auth_context()
    names = auth.get("x509_common_name")
    if names:
        return "cert:" + names[0].decode(errors="replace")
    peer = context.peer() or "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer.split(":", 1)[0]  # unix sockets: all local callers of this user are one identity


def end_client(context, forwarders: frozenset[str]) -> str:
    """Whom a request counts against for lockout: the client a trusted forwarder (the runtime: a caller on the
    0600 Unix socket, or an mTLS certificate named in `forwarders`) names in `sealnet-client`, as
    'caller>client'; otherwise the direct caller itself, so an untrusted caller cannot dodge the lockout by
    naming a fresh client on every guess."""
    caller = caller_identity(context)
    if caller != "unix" and caller.removeprefix("cert:") not in forwarders:
        return caller
    forwarded = ""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_METADATA:
            forwarded = value[:200]
    return f"{caller}>{forwarded}" if forwarded else caller


class TrustedModule(enclave_pb2_grpc.TrustedModuleServicer):
    """Holds the unsealed transform (or derived passport parameters); answers only sessions opened with a
    valid license."""

    def __init__(self, bundle: Bundle, keystore: Keystore, *, policy: AccessPolicy | None = None,
                 revocations: Revocations | None = None, audit: AuditLog | None = None,
                 session_seconds: int = SESSION_SECONDS, forwarders: frozenset[str] = frozenset({"runtime"})):
        self.bundle = bundle
        self.model_id = bundle.model_id
        self._owner = bundle.owner_public_key
        self._keystore = keystore
        self.measurements, _ = measurement_chain(core_digest(bundle.manifest))
        self.chain = keystore.extend(self.measurements)
        blob = bundle.path(SECRETS).read_bytes()
        config, arrays = unpack(keystore.unseal(blob, label=bundle.bundle_id))
        self.method = bundle.manifest["method"]
        try:
            self._secret = open_secret(bundle.manifest, config, arrays)
        finally:
            for array in arrays.values():
                array.fill(0)
        self.step = self._secret.step
        self._item_shape = self._secret.item_shape(bundle.manifest)
        self._max_batch = int(bundle.manifest.get("max_batch", 1024))
        self._session_seconds = session_seconds
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self.policy = policy or AccessPolicy(PolicyConfig(), None)
        self.revocations = revocations or Revocations(None)
        self.audit = audit or AuditLog(None)
        self._forwarders = forwarders
        self._last_lockout_audit = 0.0
        self.keystore_backend = keystore.backend

    def close(self) -> None:
        """Drop the secret and forget the keystore. The unsealed arrays were zeroed once the secret held them;
        its own copies are dropped here (best effort: the allocators do not scrub memory)."""
        self._secret.close()
        with self._lock:
            self._sessions.clear()
        self._keystore.close()
        self.policy.close()
        self.audit.close()

    # -- rpc ---------------------------------------------------------------------------------------------
    def Health(self, request, context):
        return enclave_pb2.HealthResponse(serving=True, model_id=self.model_id, method=self.method)

    def Attest(self, request, context):
        if not 16 <= len(request.nonce) <= 64:
            raise InvalidArgument("nonce: must be 16-64 bytes of fresh randomness")
        evidence = self._keystore.quote(request.nonce)
        return enclave_pb2.AttestResponse(
            measurements=[enclave_pb2.Measurement(name=m.name, sha256=m.sha256) for m in self.measurements],
            chain=evidence.chain, attestation_public_key=evidence.public_key, signature=evidence.signature,
            format=evidence.format, quoted=evidence.quoted,
        )

    def OpenSession(self, request, context):
        client = end_client(context, self._forwarders)
        if not request.license:
            raise InvalidArgument("license: empty; pass a token from `sealnet license issue`")
        try:  # the signature first: a license the owner signed is never refused for a client's failures
            lic = verify_license(request.license, self._owner, model_id=self.model_id)
        except LicenseError as exc:
            self._deny(client, exc.license_id, exc)
        self._refuse_if_locked(None, lic.license_id, "open_session")
        try:
            revoked = self.revocations.is_revoked(lic.license_id, lic.serial_number)
        except PolicyRefusal as exc:  # the list is missing: refused, but not counted against the client
            self.audit.write("open_session", client=client, decision=exc.kind, license_id=lic.license_id)
            raise FailedPrecondition(f"revocations: {exc}") from None
        if revoked:
            self._deny(client, lic.license_id, f"license {lic.license_id} (serial {lic.serial_number}) has been "
                       "revoked")
        if reason := self._secret.refusal(lic):
            self._deny(client, lic.license_id, reason)
        session_id = secrets.token_urlsafe(24)
        expires_at = min(time.time() + self._session_seconds, lic.expires_at)
        with self._lock:
            now = time.time()
            for sid in [s for s, v in self._sessions.items() if v.expires_at <= now]:
                del self._sessions[sid]
            self._sessions[session_id] = _Session(lic, client, expires_at)
        self.audit.write("open_session", client=client, decision="granted", license_id=lic.license_id,
                         customer_id=lic.customer_id, serial_number=lic.serial_number)
        return enclave_pb2.OpenSessionResponse(session_id=session_id, expires_at=int(expires_at),
                                               customer_id=lic.customer_id)

    def Preprocess(self, request, context):
        session = self._session(request.session_id)
        self._require_step(PREPROCESS, "Preprocess")
        batch = self._tensor(request.input, self._item_shape, "input")
        self._charge(request.session_id, session, len(batch), "preprocess")
        out = self._secret.preprocess(batch)
        self.audit.write("preprocess", client=session.client, license_id=session.license.license_id, decision="ok",
                         items=len(batch))
        return enclave_pb2.PreprocessResponse(output=enclave_pb2.Tensor(shape=list(out.shape), data=out.tobytes()))

    def PassportParams(self, request, context):
        session = self._session(request.session_id)
        self._require_step(PARAMS, "PassportParams")
        if not 1 <= request.items <= self._max_batch:
            raise InvalidArgument(f"items: must be 1..{self._max_batch} (the batch the parameters are used for)")
        self._charge(request.session_id, session, request.items, "passport_params")
        self.audit.write("passport_params", client=session.client, license_id=session.license.license_id,
                         decision="ok", items=request.items)
        return enclave_pb2.PassportParamsResponse(params=[
            enclave_pb2.NamedTensor(name=name, tensor=enclave_pb2.Tensor(shape=list(v.shape), data=v.tobytes()))
            for name, v in self._secret.params().items()])

    def Classify(self, request, context):
        session = self._session(request.session_id)
        self._require_step(CLASSIFY, "Classify")
        features = self._tensor(request.features, self._item_shape, "features")
        self._charge(request.session_id, session, len(features), "classify")
        answer = self._secret.classify(features)
        self.audit.write("classify", client=session.client, license_id=session.license.license_id, decision="ok",
                         items=len(features))
        return enclave_pb2.ClassifyResponse(outputs=[
            enclave_pb2.NamedTensor(name=name, tensor=enclave_pb2.Tensor(
                shape=list(value.shape), data=value.tobytes(), datatype="INT64" if value.dtype.kind == "i" else "FP32"))
            for name, value in answer.items()])

    # -- checks: each raises the SealnetError the client gets (the server's ErrorInterceptor answers it) ----
    def _require_step(self, step: str, rpc: str) -> None:
        """Each bundle serves one data call; the others are refused naming the one it serves."""
        if self.step != step:
            served = ", ".join(name for name, cls in SECRETS_BY_METHOD.items() if cls.step == step)
            raise FailedPrecondition(f"method: this module serves a {self.method} bundle, whose data call is "
                                     f"{_RPC_OF_STEP[self.step]}; {rpc} is for {served} bundles")

    def _refuse_if_locked(self, client: str | None, license_id: str | None, event: str, *,
                          all_clients: bool = False) -> None:
        try:
            self.policy.check_not_locked(client, license_id, all_clients=all_clients)
        except PolicyRefusal as exc:
            now = time.monotonic()
            if now - self._last_lockout_audit >= 1.0:  # a flood of refused guesses: one record a second
                self._last_lockout_audit = now
                self.audit.write(event, client=client or "", decision="locked_out",
                                 **({"license_id": license_id} if license_id else {}))
            raise ResourceExhausted(f"lockout: {exc}") from None

    def _deny(self, client: str, license_id: str | None, reason: object) -> None:
        """A failed license check: refused RESOURCE_EXHAUSTED while the client, the license (signature verified)
        or all bad attempts together are over their threshold, else counted against them and refused
        PermissionDenied."""
        self._refuse_if_locked(client, license_id, "open_session", all_clients=True)
        self.policy.record_failure(client, license_id)
        self.audit.write("open_session", client=client, decision="denied", reason=str(reason))
        log.info("open_session refused for %s: %s", client, reason)
        raise PermissionDenied(f"license: {reason}") from None

    def _charge(self, session_id: str, session: _Session, items: int, event: str) -> None:
        """Refuse a revoked license (and drop its session) or one over its quota; else count the items."""
        lic = session.license
        try:
            if self.revocations.is_revoked(lic.license_id, lic.serial_number):
                self._drop(session_id)
                raise PolicyRefusal("revoked", f"license {lic.license_id} has been revoked")
            self.policy.charge(lic.license_id, items)
        except PolicyRefusal as exc:
            self.audit.write(event, client=session.client, license_id=lic.license_id, decision=exc.kind, items=items)
            raise PolicyRefusal(exc.kind, f"{exc.kind}: {exc}") from None  # its status follows the kind

    def _drop(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _session(self, session_id: str) -> _Session:
        if not session_id:
            raise Unauthenticated("session_id: empty; call OpenSession with a license first")
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= time.time():
                del self._sessions[session_id]
                session = None
        if session is None:
            raise Unauthenticated("session_id: unknown or expired; open a new session")
        # The license lockout holds on every data call (a session opened before it does not bypass it); a
        # client's failed guesses never refuse a license the owner signed.
        self._refuse_if_locked(None, session.license.license_id, "data_call")
        return session

    def _tensor(self, tensor, item_shape: tuple[int, ...], field: str) -> np.ndarray:
        """A float32 batch [N, *item_shape] from a request Tensor; INVALID_ARGUMENT naming `field` otherwise.
        The rank is checked before the shape is converted, so a huge shape costs nothing."""
        rank = len(tensor.shape)
        if rank != 1 + len(item_shape):
            raise InvalidArgument(f"{field}.shape: expected [N, {', '.join(map(str, item_shape))}], got {rank} "
                                  "dimensions")
        if tuple(tensor.shape[1:]) != item_shape:
            raise InvalidArgument(f"{field}.shape: expected [N, {', '.join(map(str, item_shape))}], got "
                                  f"{list(tensor.shape)}")
        if tensor.datatype not in ("", "FP32"):
            raise InvalidArgument(f"{field}.datatype: expected FP32, got {clip(tensor.datatype)}")
        shape = tuple(tensor.shape)
        if not 1 <= shape[0] <= self._max_batch:
            raise InvalidArgument(f"{field}.shape: batch must be 1..{self._max_batch}")
        expected = int(np.prod(shape)) * 4
        if len(tensor.data) != expected:
            raise InvalidArgument(f"{field}.data: {len(tensor.data)} bytes for shape {list(shape)}, expected "
                                  f"{expected} (float32)")
        batch = np.frombuffer(tensor.data, dtype="<f4").reshape(shape)
        if not np.isfinite(batch).all():
            raise InvalidArgument(f"{field}.data: contains NaN or infinity")
        return batch


@dataclass(frozen=True)
class EnclaveOptions:
    """Operational settings of `sealnet enclave` (all optional)."""

    state_dir: Path | None = None  # lockout counters and quota usage survive restarts here
    revocations: Path | None = None
    audit_log: Path | None = None
    tls_dir: Path | None = None  # required for TCP: server.crt/server.key/ca.crt from `sealnet certs`
    policy: PolicyConfig = PolicyConfig()
    workers: int = 4
    forwarders: tuple[str, ...] = ("runtime",)  # mTLS names trusted to forward end-client identities
    audit_max_bytes: int = 64 << 20  # rotate the audit log past this size (0: never)
    audit_keep: int = 10  # rotated audit files kept


def server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    """mTLS: the module presents server.crt and accepts only clients with a certificate signed by ca.crt."""
    files = {name: Path(tls_dir) / name for name in ("server.key", "server.crt", "ca.crt")}
    missing = [n for n, p in files.items() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{tls_dir}: missing {', '.join(missing)}; create them with `sealnet certs {tls_dir}`")
    return grpc.ssl_server_credentials(
        [(files["server.key"].read_bytes(), files["server.crt"].read_bytes())],
        root_certificates=files["ca.crt"].read_bytes(), require_client_auth=True,
    )


def serve(bundle_dir: Path, address: str, keystore: KeystoreSpec,
          options: EnclaveOptions = EnclaveOptions()) -> tuple[grpc.Server, TrustedModule]:
    """Build and start the server; returns it running. `address` is unix:PATH, or HOST:PORT with mTLS."""
    is_unix = address.startswith("unix:")
    if not is_unix and options.tls_dir is None:
        raise ValueError(f"--listen {address}: TCP requires mTLS; pass --tls-dir (create one with `sealnet certs`) "
                         "or listen on a Unix socket")
    bundle = load_bundle(bundle_dir)
    store = keystore.open()
    state = options.state_dir / "policy-state.json" if options.state_dir else None
    try:
        audit = AuditLog(options.audit_log, max_bytes=options.audit_max_bytes, keep=options.audit_keep)
        module = TrustedModule(bundle, store, policy=AccessPolicy(options.policy, state),
                               revocations=Revocations(options.revocations), audit=audit,
                               forwarders=frozenset(options.forwarders))
    except BaseException:
        store.close()
        raise
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="enclave"),
        interceptors=[ErrorInterceptor()],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    add_servicer(enclave_pb2_grpc.add_TrustedModuleServicer_to_server, module, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if is_unix:
        path = Path(address.removeprefix("unix://").removeprefix("unix:"))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            path.unlink()
        old = os.umask(0o177)  # the socket is created 0600: only this user may talk to the module
        try:
            bound = server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(old)
    else:
        bound = server.add_secure_port(address, server_credentials(options.tls_dir))
    if not bound:
        module.close()
        raise OSError(f"cannot listen on {address}")
    module.port = bound
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("sealnet.enclave.TrustedModule", health_pb2.HealthCheckResponse.SERVING)
    return server, module
