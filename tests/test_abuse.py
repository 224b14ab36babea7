"""Abuse of the endpoint and the trusted module by one client against others, and the runtime's reliability:
lockout that nobody can turn against an innocent client, sizes checked before any work, bounded queues, an
audit log whose tampering is detected, and a runtime that serves only the manifest its module measured."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tritonclient.utils import InferenceServerException

from sealnet._grpc import enclave_pb2, enclave_pb2_grpc
from sealnet.bundle import MANIFEST, BundleError, owner_key_field, sign_manifest
from sealnet.deployment import LocalDeployment
from sealnet.enclave_sim import service as enclave_service
from sealnet.enclave_sim.policy import AccessPolicy, AuditLog, PolicyConfig, PolicyRefusal
from sealnet.licenses import LicenseError, issue_license, verify_license
from sealnet.runtime import server as runtime_server
from sealnet.runtime.attestation import AttestationError
from sealnet.runtime.batching import BatchingConfig, DynamicBatcher
from sealnet.runtime.errors import ServingError
from sealnet.runtime.pipeline import Request
from tests.conftest import MODEL_ID, OWNER_KEY, kserve_infer

X = np.zeros((1, 1, 8, 8), np.float32)
S = grpc.StatusCode


def _license(artefacts, **kw) -> str:
    args = {"customer_id": "acme", "model_id": MODEL_ID, "serial_number": "SN-1", "valid_seconds": 600} | kw
    return issue_license(artefacts["owner_key"], **args)


def _forged(license_id: str | None = None) -> str:
    """A well-formed license signed by another key; optionally claiming a victim's license id."""
    token = issue_license(Ed25519PrivateKey.generate(), customer_id="mallory", model_id=MODEL_ID,
                          serial_number="SN-X", valid_seconds=600)
    if license_id is None:
        return token
    head, payload, sig = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=="))
    fields["license_id"] = license_id
    payload = base64.urlsafe_b64encode(json.dumps(fields, sort_keys=True).encode()).rstrip(b"=").decode()
    return f"{head}.{payload}.{sig}"


@contextlib.contextmanager
def _stack(artefacts, sock_dir: Path, *, runtime: bool = True,
           batching: BatchingConfig | None = runtime_server.DEFAULT_BATCHING, **options) -> Iterator[SimpleNamespace]:
    """The trusted module (with `options`) on a Unix socket and, if asked, the runtime on all interfaces."""
    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"], runtime=runtime, listen="[::]:0",
                         batching=batching, enclave_options=enclave_service.EnclaveOptions(**options),
                         enclave_address=f"unix:{sock_dir / 'm.sock'}") as d:
        yield SimpleNamespace(addr=d.enclave, module=d.module, service=d.service, port=d.port)


def _open(addr: str, token: str, client: str | None = None):
    channel = grpc.insecure_channel(addr)
    try:
        return enclave_pb2_grpc.TrustedModuleStub(channel).OpenSession(
            enclave_pb2.OpenSessionRequest(license=token), timeout=5,
            metadata=[("sealnet-client", client)] if client else None)
    finally:
        channel.close()


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return S.OK


def _status(fn) -> str:
    try:
        fn()
    except InferenceServerException as exc:
        return exc.status()
    return "OK"


# -- lockout ---------------------------------------------------------------------------------------------------
def test_remote_clients_cannot_lock_out_an_innocent_client(artefacts, short_tmp):
    """Ten end clients x ten forged licenses (as the runtime forwards them) lock out those ten clients only: a
    new client with a valid, never-used license is served, directly and through the runtime."""
    with _stack(artefacts, short_tmp) as s:
        codes = {_code(lambda i=i: _open(s.addr, _forged(), client=f"ipv4:10.0.0.{i}"))
                 for i in range(10) for _ in range(10)}
        assert codes == {S.PERMISSION_DENIED}
        assert _code(lambda: _open(s.addr, _forged(), client="ipv4:10.0.0.3")) == S.RESOURCE_EXHAUSTED
        assert _open(s.addr, _license(artefacts), client="ipv4:10.9.9.9").session_id
        client = triton.InferenceServerClient(f"127.0.0.1:{s.port}")
        try:
            out = kserve_infer(client, MODEL_ID, X, _license(artefacts, customer_id="innocent"))
            assert out.as_numpy("logits").shape == (1, 10)
        finally:
            client.close()


def test_untrusted_caller_cannot_dodge_the_lockout_by_naming_fresh_clients(artefacts, tmp_path):
    """Only the runtime (Unix socket, or its mTLS certificate) may name end clients; another certificate's
    forwarded names are ignored, so rotating them does not buy it more guesses."""
    from sealnet.certs import write_certs
    from sealnet.runtime.enclave_client import client_credentials

    write_certs(tmp_path / "tls", clients=("runtime", "tester"))
    server, module = enclave_service.serve(artefacts["bundle"], "127.0.0.1:0", artefacts["keystore"],
                                           enclave_service.EnclaveOptions(tls_dir=tmp_path / "tls"))
    addr = f"localhost:{module.port}"

    def open_as(name: str, token: str, client: str) -> grpc.StatusCode:
        channel = grpc.secure_channel(addr, client_credentials(tmp_path / "tls", name))
        try:
            return _code(lambda: enclave_pb2_grpc.TrustedModuleStub(channel).OpenSession(
                enclave_pb2.OpenSessionRequest(license=token), timeout=5, metadata=[("sealnet-client", client)]))
        finally:
            channel.close()

    try:
        codes = [open_as("tester", _forged(), f"fresh-{i}") for i in range(11)]
        assert codes == [S.PERMISSION_DENIED] * 10 + [S.RESOURCE_EXHAUSTED]
        codes = [open_as("runtime", _forged(), f"fresh-{i}") for i in range(11)]
        assert codes == [S.PERMISSION_DENIED] * 11  # the runtime names its clients: each has its own count
        assert open_as("runtime", _license(artefacts), "fresh-0") == S.OK
    finally:
        server.stop(0)
        module.close()


def test_a_clients_guesses_never_cost_a_valid_license(artefacts, short_tmp):
    """A client that guessed ten times is locked out for guesses (RESOURCE_EXHAUSTED) but still served with a
    license the owner signed, on a session cached before and on a new one; so is every other client."""
    good = _license(artefacts)
    with _stack(artefacts, short_tmp) as s:
        a = triton.InferenceServerClient(f"127.0.0.1:{s.port}")
        b = triton.InferenceServerClient(f"[::1]:{s.port}")
        try:
            assert _status(lambda: kserve_infer(a, MODEL_ID, X, good)) == "OK"  # the session is now cached
            statuses = [_status(lambda: kserve_infer(a, MODEL_ID, X, _forged())) for _ in range(10)]
            assert statuses == ["StatusCode.PERMISSION_DENIED"] * 10
            assert _status(lambda: kserve_infer(a, MODEL_ID, X, _forged())) == "StatusCode.RESOURCE_EXHAUSTED"
            assert _status(lambda: kserve_infer(a, MODEL_ID, X, good)) == "OK"
            assert _status(lambda: kserve_infer(a, MODEL_ID, X, _license(artefacts, customer_id="new"))) == "OK"
            assert _status(lambda: kserve_infer(b, MODEL_ID, X, good)) == "OK"
        finally:
            a.close()
            b.close()


def test_license_lockout_counts_only_licenses_whose_signature_verified(artefacts, short_tmp, tmp_path):
    """A revoked license tried from many clients is locked as a license; forged tokens that claim a victim's
    license id never count against it (anybody can write any id into a token they sign themselves)."""
    revoked = tmp_path / "revoked.txt"
    victim, leaked = _license(artefacts, serial_number="SN-V"), _license(artefacts, serial_number="SN-L")
    victim_id = verify_license(victim, artefacts["owner_key"].public_key(), model_id=MODEL_ID).license_id
    revoked.write_text("SN-L\n")
    with _stack(artefacts, short_tmp, runtime=False, revocations=revoked) as s:
        for i in range(12):
            assert _code(lambda i=i: _open(s.addr, _forged(victim_id), client=f"forger-{i}")) == S.PERMISSION_DENIED
        assert _open(s.addr, victim, client="victim").session_id
        codes = [_code(lambda i=i: _open(s.addr, leaked, client=f"sharer-{i}")) for i in range(11)]
        assert codes == [S.PERMISSION_DENIED] * 10 + [S.RESOURCE_EXHAUSTED]
        revoked.write_text("# nothing revoked\n")
        assert _code(lambda: _open(s.addr, leaked, client="newcomer")) == S.RESOURCE_EXHAUSTED  # until the window


def test_missing_revocation_list_refuses_without_counting_failures(artefacts, short_tmp, tmp_path):
    revoked = tmp_path / "revoked.txt"
    token = _license(artefacts)
    with _stack(artefacts, short_tmp, runtime=False, revocations=revoked) as s:
        codes = {_code(lambda: _open(s.addr, token, client="c1")) for _ in range(12)}
        assert codes == {S.FAILED_PRECONDITION}  # fail closed, and the client is not to blame
        revoked.write_text("")
        assert _open(s.addr, token, client="c1").session_id


def test_lockout_state_is_bounded_pruned_and_written_at_most_once_a_second(tmp_path):
    now = [1000.0]
    path = tmp_path / "state.json"
    policy = AccessPolicy(PolicyConfig(max_failures=3, window_s=60), path, clock=lambda: now[0])
    for i in range(200):
        for _ in range(5):
            policy.record_failure(f"client-{i}", "lic-1")
    assert policy.saves == 1  # 1,000 failures in well under a second: one write, the rest pending
    with pytest.raises(PolicyRefusal, match="client 'client-7'"):
        policy.check_not_locked("client-7")
    with pytest.raises(PolicyRefusal, match="license 'lic-1'"):
        policy.check_not_locked("client-new", "lic-1")
    policy.check_not_locked("client-new", "lic-2")
    policy.close()
    state = json.loads(path.read_text())
    assert len(state["failures"]) == 201 and max(len(v) for v in state["failures"].values()) == 3
    now[0] += 61  # the window has passed: a restarted module drops every stale client
    reloaded = AccessPolicy(PolicyConfig(max_failures=3, window_s=60), path, clock=lambda: now[0])
    reloaded.check_not_locked("client-7", "lic-1")
    reloaded.record_failure("client-0")
    reloaded.close()
    assert list(json.loads(path.read_text())["failures"]) == ["client:client-0"]


# -- licenses ----------------------------------------------------------------------------------------------------
def test_a_token_has_one_spelling(artefacts):
    """The signature's 64 bytes take 86 base64url characters; the last one carries 4 unused bits. Setting one of
    them decodes to the same bytes, but is refused: anything keyed on the token string sees one license."""
    token = _license(artefacts)
    head, payload, sig = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    respelled = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]
    assert base64.urlsafe_b64decode(respelled + "==") == base64.urlsafe_b64decode(sig + "==")
    owner = artefacts["owner_key"].public_key()
    assert verify_license(token, owner, model_id=MODEL_ID)
    with pytest.raises(LicenseError, match="not canonical"):
        verify_license(f"{head}.{payload}.{respelled}", owner, model_id=MODEL_ID)


# -- the endpoint ---------------------------------------------------------------------------------------------
def test_huge_requests_are_refused_fast_and_do_not_delay_licensed_clients(artefacts, short_tmp):
    from sealnet.attacks.wire import Wire, huge_shape_request, license_md, method

    token = _license(artefacts)
    infer = method("inference.GRPCInferenceService", "ModelInfer")
    with _stack(artefacts, short_tmp) as s:
        limit = s.service.max_request_bytes
        assert limit < 1 << 20  # 1,024 items of 8x8 FP32 plus slack, not 64 MiB
        wire = Wire(f"127.0.0.1:{s.port}")
        client = triton.InferenceServerClient(f"127.0.0.1:{s.port}")
        try:
            # the largest request the server accepts, all of it shape: refused by rank, in microseconds of work
            biggest = huge_shape_request(MODEL_ID, limit - 200)
            started = time.monotonic()
            reply = wire.call(infer, biggest, license_md(token))
            assert reply.code == S.INVALID_ARGUMENT and "dimensions" in reply.details, reply
            assert len(reply.details) < 300 and time.monotonic() - started < 0.5
            hostile = huge_shape_request(MODEL_ID, 60_000_000)
            kserve_infer(client, MODEL_ID, X, token)  # warm: session open, connections up
            latencies: list[float] = []
            codes: list[grpc.StatusCode] = []
            done = threading.Event()

            def attack():
                for _ in range(3):
                    codes.append(wire.call(infer, hostile, license_md(token)).code)
                done.set()

            thread = threading.Thread(target=attack)
            thread.start()
            while not done.is_set():
                t0 = time.monotonic()
                kserve_infer(client, MODEL_ID, X, token)
                latencies.append(time.monotonic() - t0)
            thread.join()
        finally:
            wire.close()
            client.close()
    assert codes == [S.RESOURCE_EXHAUSTED] * 3
    assert latencies and max(latencies) < 0.5, f"licensed requests took up to {max(latencies):.2f} s"


def test_client_strings_are_clipped_in_error_messages(artefacts, short_tmp):
    """A 20,000-character model name, tensor name or datatype is answered with its own status and a short
    message (unclipped, stock clients got 'received metadata size exceeds hard limit')."""
    from sealnet.attacks.wire import Wire, infer_request, license_md, method

    token = _license(artefacts)
    long = "x" * 20_000
    infer = method("inference.GRPCInferenceService", "ModelInfer")
    cases = [(infer_request(long, X), S.NOT_FOUND), (infer_request(MODEL_ID, X, name=long), S.INVALID_ARGUMENT),
             (infer_request(MODEL_ID, X, datatype=long), S.INVALID_ARGUMENT)]
    version = infer_request(MODEL_ID, X)
    version.model_version = long
    cases.append((version, S.NOT_FOUND))
    with _stack(artefacts, short_tmp) as s:
        wire = Wire(f"127.0.0.1:{s.port}")
        try:
            for request, code in cases:
                reply = wire.call(infer, request.SerializeToString(), license_md(token))
                assert reply.code == code and len(reply.details) < 400 and "20000 characters" in reply.details
        finally:
            wire.close()


def test_contents_and_raw_input_contents_together_are_refused(artefacts, short_tmp):
    from sealnet.attacks.wire import Wire, infer_request, license_md, method

    request = infer_request(MODEL_ID, X)
    request.inputs[0].contents.fp32_contents.extend(X.ravel().tolist())
    with _stack(artefacts, short_tmp) as s:
        wire = Wire(f"127.0.0.1:{s.port}")
        try:
            reply = wire.call(method("inference.GRPCInferenceService", "ModelInfer"), request.SerializeToString(),
                              license_md(_license(artefacts)))
        finally:
            wire.close()
    assert reply.code == S.INVALID_ARGUMENT and "raw_input_contents" in reply.details


@pytest.mark.parametrize(("peer", "identity"), [
    ("ipv4:10.1.2.3:5555", "ipv4:10.1.2.3"),
    ("ipv6:[2001:db8:1:2:aaaa::1]:5555", "ipv6:2001:db8:1:2::/64"),
    ("ipv6:[2001:db8:1:2:bbbb::7]:6666", "ipv6:2001:db8:1:2::/64"),
    ("ipv6:[::ffff:10.1.2.3]:5555", "ipv4:10.1.2.3"),
    ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
])
def test_end_client_identity_groups_an_ipv6_subscriber(peer, identity):
    assert runtime_server.client_identity(SimpleNamespace(peer=lambda: peer)) == identity


def test_forwarded_for_counts_only_from_a_trusted_proxy():
    from sealnet.runtime.identity import TrustedProxies

    def who(peer: str, forwarded: str, proxies: TrustedProxies | None = None) -> str:
        return runtime_server.client_identity(SimpleNamespace(peer=lambda: peer), proxies, forwarded)

    proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8"])
    assert who("ipv4:203.0.113.5:4000", "198.51.100.1") == "ipv4:203.0.113.5"  # no proxies: the peer, always
    assert who("ipv4:203.0.113.5:4000", "198.51.100.1", proxies) == "ipv4:203.0.113.5"  # an untrusted peer
    # a trusted proxy (chain of two): the right-most entry that is not a proxy; the client's own entries, left
    # of it, are ignored
    assert who("ipv4:10.1.2.3:4000", "1.1.1.1, 198.51.100.1, 10.9.9.9", proxies) == "ipv4:198.51.100.1"
    assert who("ipv6:[fd00::5]:4000", "2001:db8:1:2::9", proxies) == "ipv6:2001:db8:1:2::/64"
    assert who("ipv4:10.1.2.3:4000", "", proxies) == "ipv4:10.1.2.3"  # a proxy that forwarded nobody
    with pytest.raises(ValueError, match="--trusted-proxy"):
        TrustedProxies(["not-a-network"])


def test_a_trusted_proxys_forwarded_clients_are_counted_apart_through_the_endpoint(artefacts, short_tmp):
    """The endpoint behind a trusted proxy (loopback here): each forwarded client has its own count; the same
    header from an untrusted peer would change nothing (the unit test above)."""
    from sealnet.runtime.identity import TrustedProxies

    with _stack(artefacts, short_tmp, runtime=False) as s:
        server, service = runtime_server.serve(artefacts["bundle"], "127.0.0.1:0", s.addr,
                                               trusted_proxies=TrustedProxies(["127.0.0.0/8"]))
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")

        def infer(token: str, forwarded: str) -> str:
            inp = triton.InferInput("input", list(X.shape), "FP32")
            inp.set_data_from_numpy(X)
            return _status(lambda: client.infer(MODEL_ID, [inp], headers={"sealnet-license": token,
                                                                          "x-forwarded-for": forwarded}))
        try:
            codes = [infer(_forged(), "198.51.100.1") for _ in range(11)]
            assert codes == ["StatusCode.PERMISSION_DENIED"] * 10 + ["StatusCode.RESOURCE_EXHAUSTED"]
            assert infer(_forged(), "198.51.100.2") == "StatusCode.PERMISSION_DENIED"  # another client's count
            assert infer(_license(artefacts), "198.51.100.1") == "OK"
        finally:
            client.close()
            server.stop(0)


# -- reliability --------------------------------------------------------------------------------------------
def test_internal_errors_fail_their_own_requests_and_never_a_worker(artefacts, short_tmp, monkeypatch):
    """More internal failures than batch workers (e.g. ONNX Runtime failing in the pipeline): each fails its own
    request with INTERNAL, and the endpoint keeps answering."""
    token = _license(artefacts)
    with _stack(artefacts, short_tmp, batching=BatchingConfig(workers=2)) as s:
        enclave = s.service.pipeline.enclave
        real = enclave.preprocess
        broken = threading.Event()

        def preprocess(*args, **kwargs):
            if broken.is_set():
                raise RuntimeError("simulated failure inside the pipeline")
            return real(*args, **kwargs)

        monkeypatch.setattr(enclave, "preprocess", preprocess)
        client = triton.InferenceServerClient(f"127.0.0.1:{s.port}")
        try:
            broken.set()
            assert [_status(lambda: kserve_infer(client, MODEL_ID, X, token)) for _ in range(5)] == \
                ["StatusCode.INTERNAL"] * 5
            broken.clear()
            assert _status(lambda: kserve_infer(client, MODEL_ID, X, token)) == "OK"
        finally:
            client.close()


def test_full_queue_refuses_and_callers_gone_never_reach_the_module():
    """Backpressure: past `max_queued_items` a request is refused at once; a cancelled request or one past its
    deadline is dropped from the queue before the pipeline (and so the trusted module) sees it."""
    seen: list[str] = []
    release = threading.Event()

    def serve(requests: list[Request]):
        seen.extend(r.token for r in requests)
        release.wait(5)
        return [({"y": r.batch}, None) for r in requests]

    async def main():
        batcher = DynamicBatcher(serve, BatchingConfig(max_batch=1, workers=1, max_queued_items=3))
        one = np.zeros((1, 2), np.float32)
        first = asyncio.create_task(batcher.submit("first", "c", one))
        await asyncio.sleep(0.1)  # the worker holds "first"; the rest queue behind it
        cancelled = asyncio.create_task(batcher.submit("cancelled", "c", one))
        expired = asyncio.create_task(batcher.submit("expired", "c", one, timeout=0.05))
        kept = asyncio.create_task(batcher.submit("kept", "c", one))
        await asyncio.sleep(0.1)
        with pytest.raises(ServingError, match="queue is full") as err:
            await batcher.submit("refused", "c", one)
        assert err.value.code == S.RESOURCE_EXHAUSTED
        cancelled.cancel()
        release.set()
        await first
        await kept
        with pytest.raises(ServingError, match="deadline") as err:
            await expired
        assert err.value.code == S.DEADLINE_EXCEEDED
        await batcher.close()

    asyncio.run(main())
    assert seen == ["first", "kept"]


# -- audit log ----------------------------------------------------------------------------------------------------
def test_audit_log_rotates_and_its_hash_chain_detects_deleted_and_edited_records(tmp_path, capsys):
    from sealnet.cli import main

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2000, keep=20)
    for i in range(30):
        log.write("open_session", client=f"c{i}", decision="granted", license_id=f"{i:032x}")
    log.close()
    log = AuditLog(path, max_bytes=2000, keep=20)  # a restart continues the chain
    log.write("open_session", client="after-restart", decision="denied")
    path.rename(tmp_path / "audit.jsonl.ext")  # an external logrotate, then SIGHUP
    log.reopen()
    log.write("open_session", client="after-reopen", decision="denied")
    log.close()
    rotated = sorted(tmp_path.glob("audit.jsonl.[0-9]*"), key=lambda p: -int(p.suffix[1:]))
    files = [*rotated, tmp_path / "audit.jsonl.ext", path]
    assert len(rotated) >= 2 and all(f.stat().st_size < 2300 for f in files)
    args = ["audit", "verify", *map(str, files)]
    assert main(args) == 0 and "32 records" in capsys.readouterr().out
    assert main(["audit", "verify", *map(str, files[1:])]) == 0  # the oldest file gone: the rest still links
    capsys.readouterr()
    lines = files[1].read_text().splitlines(keepends=True)
    files[1].write_text("".join(lines[:1] + lines[2:]))  # delete a record
    assert main(args) == 2 and f"{files[1]}:2:" in capsys.readouterr().err
    files[1].write_text("".join(lines))
    assert main(args) == 0
    capsys.readouterr()
    files[0].write_text(files[0].read_text().replace('"decision": "granted"', '"decision": "denied"', 1))
    assert main(args) == 2 and f"{files[0]}:2:" in capsys.readouterr().err  # edited line 1: line 2 breaks


def test_enclave_command_reopens_its_audit_log_on_sighup(artefacts, short_tmp, tmp_path, capsys):
    import signal
    import subprocess
    import sys

    from sealnet.cli import main

    log, sock = tmp_path / "audit.jsonl", short_tmp / "h.sock"
    proc = subprocess.Popen([sys.executable, "-m", "sealnet", "enclave", "--bundle", str(artefacts["bundle"]),
                             "--keystore-dir", str(artefacts["keystore"].directory), "--listen", f"unix:{sock}",
                             "--state-dir", str(tmp_path / "state"), "--audit-log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "trusted module serving" in proc.stdout.readline()
        _open(f"unix:{sock}", _license(artefacts), client="before")
        log.rename(tmp_path / "audit.jsonl.1")  # what logrotate does, then it signals the module
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            _open(f"unix:{sock}", _license(artefacts), client="after")
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait()
    assert proc.returncode == 0 and log.exists()
    assert main(["audit", "verify", str(tmp_path / "audit.jsonl.1"), str(log)]) == 0
    assert "from the first record" in capsys.readouterr().out


# -- the runtime serves what the module measured ---------------------------------------------------------------
def test_serve_refuses_a_manifest_resigned_by_another_key(artefacts, short_tmp, tmp_path):
    """The module runs the owner's bundle; the runtime is given a copy whose manifest someone re-signed with
    their own key. It must not start (before, it did: only the module refused such a manifest)."""
    copy = tmp_path / "bundle"
    shutil.copytree(artefacts["bundle"], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    other = Ed25519PrivateKey.generate()
    manifest["owner_public_key"] = owner_key_field(other)
    (copy / MANIFEST).write_text(json.dumps(sign_manifest(manifest, other), indent=2, sort_keys=True))
    with _stack(artefacts, short_tmp, runtime=False) as s:
        with pytest.raises(AttestationError, match="not the one the trusted module was sealed to"):
            runtime_server.serve(copy, "127.0.0.1:0", s.addr)
        with pytest.raises(BundleError, match="different owner key"):
            runtime_server.serve(copy, "127.0.0.1:0", s.addr, owner_public_key=OWNER_KEY.public_key())
        server, _ = runtime_server.serve(artefacts["bundle"], "127.0.0.1:0", s.addr,
                                         owner_public_key=OWNER_KEY.public_key())
        server.stop(0)


def test_build_engine_script_reports_a_missing_keystore_or_owner_key(artefacts, tmp_path, capsys):
    from sealnet.export.build_engine import main

    base = [str(artefacts["checkpoint_path"]), str(tmp_path / "out")]
    assert main([*base, "--owner-key", str(artefacts["owner_key_path"]), "--keystore-dir",
                 str(tmp_path / "no-keystore")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "not-a-key").write_text("not a key")
    assert main([*base, "--owner-key", str(tmp_path / "not-a-key"), "--keystore-dir",
                 str(artefacts["keystore"].directory)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_bad_attempts_are_limited_globally_without_refusing_valid_licenses(artefacts, short_tmp):
    """Past the global ceiling every bad attempt is refused at once (RESOURCE_EXHAUSTED, audited once a second),
    whatever client it claims; a valid license is still served."""
    from sealnet.enclave_sim.policy import PolicyConfig

    policy = PolicyConfig(max_failures=1000, max_bad_attempts=20)
    with _stack(artefacts, short_tmp, runtime=False, policy=policy) as s:
        codes = [_code(lambda i=i: _open(s.addr, _forged(), client=f"ipv4:10.1.0.{i}")) for i in range(25)]
        assert codes == [S.PERMISSION_DENIED] * 20 + [S.RESOURCE_EXHAUSTED] * 5
        assert _open(s.addr, _license(artefacts), client="ipv4:10.1.0.99").session_id
