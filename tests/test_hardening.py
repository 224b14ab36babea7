"""Trusted-module hardening: lockout, revocation, quota, audit, mTLS, attestation, fail-closed recovery."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from sealnet._grpc import enclave_pb2, enclave_pb2_grpc
from sealnet.certs import write_certs
from sealnet.deployment import LocalDeployment
from sealnet.enclave_sim import service as enclave_service
from sealnet.enclave_sim.policy import AccessPolicy, PolicyConfig
from sealnet.licenses import issue_license
from sealnet.runtime import server as runtime_server
from sealnet.runtime.attestation import AttestationError
from sealnet.runtime.enclave_client import EnclaveClient, EnclaveError
from tests.conftest import MODEL_ID


def _license(artefacts, **kw) -> str:
    args = {"customer_id": "acme", "model_id": MODEL_ID, "serial_number": "SN-1", "valid_seconds": 600} | kw
    return issue_license(artefacts["owner_key"], **args)


def _bad_license(artefacts) -> str:
    return _license(artefacts, model_id="not-this-model")


@pytest.fixture
def enclave_factory(artefacts, short_tmp):
    """Start trusted modules with given options on a Unix socket; all stopped at teardown."""
    started = []

    def start(name="e.sock", **options):
        addr = f"unix:{short_tmp / name}"
        server, module = enclave_service.serve(artefacts["bundle"], addr, artefacts["keystore"],
                                               enclave_service.EnclaveOptions(**options))
        started.append((server, module))
        return addr, server, module

    yield start
    for server, module in started:
        server.stop(0)
        module.close()


def _open(addr, token, client=None, credentials=None):
    channel = grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr)
    stub = enclave_pb2_grpc.TrustedModuleStub(channel)
    try:
        return stub.OpenSession(enclave_pb2.OpenSessionRequest(license=token), timeout=5,
                                metadata=[("sealnet-client", client)] if client else None)
    finally:
        channel.close()


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


def test_eleventh_bad_license_in_a_minute_is_locked_out_per_client(enclave_factory, artefacts, tmp_path):
    addr, server, _ = enclave_factory(state_dir=tmp_path / "state")
    for _ in range(10):
        assert _code(lambda: _open(addr, _bad_license(artefacts), client="ipv4:10.0.0.1")) == \
            grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _open(addr, _bad_license(artefacts), client="ipv4:10.0.0.1")) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    # the signature is checked first: a license the owner signed is served, from this client and any other
    assert _open(addr, _license(artefacts), client="ipv4:10.0.0.1").session_id
    assert _open(addr, _license(artefacts), client="ipv4:10.0.0.2").session_id
    assert _code(lambda: _open(addr, _bad_license(artefacts), client="ipv4:10.0.0.2")) == \
        grpc.StatusCode.PERMISSION_DENIED  # another client's guesses are its own
    # counters persist across a restart of the trusted module, even a crash: the state is written within a second
    time.sleep(1.1)
    server.stop(0).wait()
    addr2, _, _ = enclave_factory(name="e2.sock", state_dir=tmp_path / "state")
    assert _code(lambda: _open(addr2, _bad_license(artefacts), client="ipv4:10.0.0.1")) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _open(addr2, _license(artefacts), client="ipv4:10.0.0.1").session_id


def test_lockout_through_the_runtime_distinguishes_end_clients(artefacts, short_tmp):
    """Two tritonclients (IPv4 and IPv6 loopback) behind one runtime: only the guessing one is locked out."""
    x = np.zeros((1, 1, 8, 8), np.float32)

    def infer(client, token):
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(MODEL_ID, [inp], headers={"sealnet-license": token})

    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"], listen="[::]:0",
                         enclave_address=f"unix:{short_tmp / 'e.sock'}") as d:
        a = triton.InferenceServerClient(f"127.0.0.1:{d.port}")
        b = triton.InferenceServerClient(f"[::1]:{d.port}")
        try:
            codes = []
            for _ in range(11):
                with pytest.raises(InferenceServerException) as err:
                    infer(a, _bad_license(artefacts))
                codes.append(err.value.status())
            assert codes[:10] == ["StatusCode.PERMISSION_DENIED"] * 10
            assert codes[10] == "StatusCode.RESOURCE_EXHAUSTED"
            assert infer(b, _license(artefacts)).as_numpy("logits").shape == (1, 10)
        finally:
            a.close()
            b.close()


def test_lockout_window_passes_and_no_client_locks_out_another():
    now = [1000.0]
    policy = AccessPolicy(PolicyConfig(max_failures=3, window_s=60), None, clock=lambda: now[0])
    for _ in range(3):
        policy.record_failure("unix>c1")
    with pytest.raises(Exception, match="too many failed"):
        policy.check_not_locked("unix>c1")
    now[0] += 61
    policy.check_not_locked("unix>c1")
    for i in range(30):  # many clients failing behind one caller (the runtime): no shared ceiling trips
        policy.record_failure(f"unix>rotating-{i}")
    policy.check_not_locked("unix>fresh-id")
    policy.check_not_locked("unix")


def test_revocation_quota_and_audit_log(enclave_factory, artefacts, tmp_path):
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# revoked licenses\n")
    audit = tmp_path / "audit.jsonl"
    addr, _, _ = enclave_factory(revocations=revoked, audit_log=audit,
                                 policy=PolicyConfig(quota_items=10, quota_window_s=3600))
    client = EnclaveClient(addr)
    token = _license(artefacts, serial_number="SN-77")
    batch = np.zeros((5, 1, 8, 8), np.float32)
    client.preprocess(token, batch)
    client.preprocess(token, batch)
    with pytest.raises(EnclaveError) as err:
        client.preprocess(token, batch)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in str(err.value)
    # revoking by serial number ends new and existing sessions alike
    other = _license(artefacts, serial_number="SN-88")
    client.preprocess(other, batch[:1])
    time.sleep(0.01)
    revoked.write_text("SN-88\n")
    os.utime(revoked, (time.time() + 5, time.time() + 5))
    with pytest.raises(EnclaveError) as err:
        client.preprocess(other, batch[:1])
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in str(err.value)
    assert _code(lambda: _open(addr, other)) == grpc.StatusCode.PERMISSION_DENIED
    client.close()
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    decisions = {(r["event"], r["decision"]) for r in records}
    assert {("open_session", "granted"), ("preprocess", "ok"), ("preprocess", "quota"),
            ("preprocess", "revoked"), ("open_session", "denied")} <= decisions
    assert all({"time", "client"} <= r.keys() for r in records)
    text = audit.read_text()
    assert token not in text and token.split(".")[2] not in text  # never the bearer token or its signature
    assert (audit.stat().st_mode & 0o777) == 0o600


def test_tcp_requires_mtls_and_identifies_callers_by_certificate(artefacts, tmp_path):
    with pytest.raises(ValueError, match="TCP requires mTLS"):
        enclave_service.serve(artefacts["bundle"], "127.0.0.1:0", artefacts["keystore"])
    write_certs(tmp_path / "tls", clients=("runtime", "tester"))
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    server, module = enclave_service.serve(artefacts["bundle"], "127.0.0.1:0", artefacts["keystore"],
                                           enclave_service.EnclaveOptions(tls_dir=tmp_path / "tls"))
    addr = f"localhost:{module.port}"
    try:
        client = EnclaveClient(addr, tls_dir=tmp_path / "tls")
        assert client.preprocess(_license(artefacts), np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 1, 8, 8)
        client.close()
        # a caller without a client certificate cannot even complete the handshake
        anonymous = grpc.ssl_channel_credentials((tmp_path / "tls" / "ca.crt").read_bytes())
        assert _code(lambda: _open(addr, _license(artefacts), credentials=anonymous)) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError, match="TCP requires mTLS"):
            EnclaveClient(addr)
        # lockout counts the certificate's common name
        from sealnet.runtime.enclave_client import client_credentials

        tester = client_credentials(tmp_path / "tls", "tester")
        for _ in range(10):
            _code(lambda: _open(addr, _bad_license(artefacts), credentials=tester))
        assert _code(lambda: _open(addr, _bad_license(artefacts), credentials=tester)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        runtime_creds = client_credentials(tmp_path / "tls", "runtime")
        assert _code(lambda: _open(addr, _bad_license(artefacts), credentials=runtime_creds)) == \
            grpc.StatusCode.PERMISSION_DENIED  # another certificate: its own count
        assert _open(addr, _license(artefacts), credentials=tester).session_id  # a signed license: served
    finally:
        server.stop(0)
        module.close()


def test_runtime_refuses_to_start_when_a_measurement_differs(enclave_factory, artefacts, tmp_path):
    addr, _, _ = enclave_factory()
    expected = json.loads((artefacts["bundle"] / "expected-measurements.json").read_text())
    target = next(m for m in expected["measurements"] if m["name"] == "code:sealnet/enclave_sim/service.py")
    target["sha256"] = "00" * 32
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    with pytest.raises(AttestationError, match=r"measurement code:sealnet/enclave_sim/service\.py differs"):
        runtime_server.serve(artefacts["bundle"], "127.0.0.1:0", addr, expected_measurements=tmp_path / "expected.json")


def test_runtime_refuses_a_module_with_another_keystore(artefacts, tmp_path, short_tmp):
    """A trusted module over another keystore cannot even unseal; one that fakes answers fails attestation."""
    from sealnet.enclave_sim.keystore import init_keystore
    from sealnet.enclave_sim.keystore_spec import KeystoreSpec

    init_keystore(tmp_path / "other")
    with pytest.raises(Exception, match="unseal refused"):
        enclave_service.serve(artefacts["bundle"], f"unix:{short_tmp / 'x.sock'}",
                              KeystoreSpec("embedded", tmp_path / "other"))
    expected = json.loads((artefacts["bundle"] / "expected-measurements.json").read_text())
    expected["attestation_public_key"] = "11" * 32
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    server, module = enclave_service.serve(artefacts["bundle"], f"unix:{short_tmp / 'y.sock'}", artefacts["keystore"])
    try:
        with pytest.raises(AttestationError, match="attestation key differs"):
            runtime_server.serve(artefacts["bundle"], "127.0.0.1:0", f"unix:{short_tmp / 'y.sock'}",
                                 expected_measurements=tmp_path / "expected.json")
    finally:
        server.stop(0)
        module.close()


def test_runtime_refuses_to_start_without_a_trusted_module(artefacts, short_tmp):
    with pytest.raises(AttestationError, match="did not answer"):
        runtime_server.serve(artefacts["bundle"], "127.0.0.1:0", f"unix:{short_tmp / 'none.sock'}",
                             attest_timeout=0.5)


def test_attest_command(enclave_factory, artefacts, capsys):
    from sealnet.cli import main

    addr, _, _ = enclave_factory()
    assert main(["attest", addr, "--bundle", str(artefacts["bundle"])]) == 0
    out = capsys.readouterr().out
    assert "attestation OK" in out and "code:sealnet/enclave_sim/service.py" in out


def _start_enclave_process(artefacts, sock):
    proc = subprocess.Popen([sys.executable, "-m", "sealnet", "enclave", "--bundle", str(artefacts["bundle"]),
                             "--keystore-dir", str(artefacts["keystore"].directory), "--listen", f"unix:{sock}",
                             "--state-dir", str(sock.parent / "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "trusted module serving" in line, line + proc.stdout.read()
    return proc, time.monotonic()


def test_kill_and_restart_under_load_is_fail_closed_and_recovers(artefacts, digits, short_tmp):
    sock = short_tmp / "e.sock"
    proc, _ = _start_enclave_process(artefacts, sock)
    server, service = runtime_server.serve(artefacts["bundle"], "127.0.0.1:0", f"unix:{sock}")
    ckpt = artefacts["checkpoint"]
    model, transform = ckpt.build_public_model(), ckpt.build_transform()
    x = digits.x_test[:4]
    with torch.no_grad():
        authorized = model(transform(torch.from_numpy(x))).numpy()
        unprotected = model(torch.from_numpy(x)).numpy()
    token = _license(artefacts)
    results: list[tuple[float, str, np.ndarray | None]] = []
    stop = threading.Event()

    def load():
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
        while not stop.is_set():
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                out = client.infer(MODEL_ID, [inp], headers={"sealnet-license": token}).as_numpy("logits")
                results.append((time.monotonic(), "OK", out))
            except InferenceServerException as exc:
                results.append((time.monotonic(), exc.status(), None))
                time.sleep(0.02)
        client.close()

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = time.monotonic()
        time.sleep(1.5)
        proc, ready_at = _start_enclave_process(artefacts, sock)
        deadline = ready_at + 10
        while time.monotonic() < deadline and not any(s == "OK" and t > ready_at for t, s, _ in results):
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop(0)
        proc.terminate()
        proc.wait()
    ok = [(t, out) for t, s, out in results if s == "OK"]
    failures = {s for _, s, _ in results if s != "OK"}
    assert ok and failures == {"StatusCode.UNAVAILABLE"}, failures
    # zero answers computed without the trusted module: every answer is the authorized one
    for _, out in ok:
        assert np.abs(out - authorized).max() < 1e-3 and np.abs(out - unprotected).max() > 1e-2
    outage = [t for t, s, _ in results if s != "OK"]
    assert min(outage) >= killed_at - 0.5
    first_after = min(t for t, _ in ok if t > ready_at)
    assert first_after - ready_at <= 5.0, f"recovered after {first_after - ready_at:.2f} s"


def test_sealed_secrets_never_reach_runtime_files_logs_or_errors(tmp_path, artefacts, short_tmp):
    """Run a full enclave + runtime session with refusals, then grep everything produced for secret bytes."""
    workdir = tmp_path / "edge"
    shutil.copytree(artefacts["bundle"], workdir / "bundle")
    log = workdir / "enclave.log"
    audit = workdir / "audit.jsonl"
    sock = short_tmp / "s.sock"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sealnet", "-v", "enclave", "--bundle",
                                 str(workdir / "bundle"), "--keystore-dir", str(artefacts["keystore"].directory),
                                 "--listen", f"unix:{sock}", "--state-dir", str(workdir / "state"),
                                 "--audit-log", str(audit)], stdout=f, stderr=subprocess.STDOUT)
    errors = []
    try:
        client = EnclaveClient(f"unix:{sock}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client.health()
                break
            except EnclaveError:
                time.sleep(0.2)
        client.preprocess(_license(artefacts), np.zeros((2, 1, 8, 8), np.float32))
        for bad in (_bad_license(artefacts), "garbage", _license(artefacts, not_before=1)):
            try:
                client.preprocess(bad, np.zeros((1, 1, 8, 8), np.float32))
            except EnclaveError as exc:
                errors.append(str(exc))
        client.close()
    finally:
        proc.terminate()
        proc.wait()
    secret = artefacts["checkpoint"].secret["state"]
    needles = [t.numpy().astype("<f4").tobytes() for t in secret.values()]
    needles = [n[i : i + 16] for n in needles for i in range(0, len(n) - 16, 64)]
    needles.append((artefacts["keystore"].directory / "root.key").read_bytes())
    needles.append((artefacts["keystore"].directory / "root.key").read_bytes().hex().encode())
    haystacks = {p.name: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    haystacks["errors"] = "\n".join(errors).encode()
    assert len(errors) == 3 and log.stat().st_size > 0 and audit.stat().st_size > 0
    for name, data in haystacks.items():
        for needle in needles:
            assert needle not in data, f"secret bytes found in {name}"
