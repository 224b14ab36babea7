"""Protocol attacks of `sealnet attack` against real servers (trusted module on a Unix socket, runtime on
loopback): the suite finds no crash in the hardened services, and does find one in a server that has them."""

from __future__ import annotations

from concurrent import futures
from dataclasses import replace

import grpc
import pytest

from sealnet.attacks.base import BUDGETS, Skip, Target
from sealnet.attacks.registry import get_attack
from sealnet.deployment import LocalDeployment
from sealnet.enclave_sim import service as enclave_service
from sealnet.licenses import issue_license
from tests.conftest import MODEL_ID

BUDGET = replace(BUDGETS["small"], fuzz_requests=300, fuzz_seconds=60, session_guesses=200, dead_requests=5)


@pytest.fixture
def services(artefacts, short_tmp, tmp_path):
    """Trusted module (with a revocation list and persisted lockout state) + runtime, as deployed."""
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("SN-REVOKED\n")
    options = enclave_service.EnclaveOptions(state_dir=tmp_path / "state", revocations=revoked)

    def lic(serial: str) -> str:
        return issue_license(artefacts["owner_key"], customer_id="tester", model_id=MODEL_ID, serial_number=serial,
                             valid_seconds=600)

    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"], enclave_options=options,
                         enclave_address=f"unix:{short_tmp / 'e.sock'}") as d:
        yield Target(artefacts["bundle"], endpoint=d.endpoint, enclave=d.enclave, license=lic("SN-T"),
                     owner_key=artefacts["owner_key"], revoked_license=lic("SN-REVOKED"), kill_enclave=d.kill_enclave)


def _metrics(outcome) -> dict:
    return {m.name: m for m in outcome.metrics}


def test_malformed_requests_get_their_expected_statuses(services, tmp_path):
    out = get_attack("protocol-malformed").run(services, BUDGET, tmp_path)
    wrong = [c for c in out.details["cases"] if not c["as_expected"]]
    assert not wrong, wrong
    assert all(m.passed for m in out.metrics)
    cases = {(c["service"], c["case"]): c["status"] for c in out.details["cases"]}
    assert cases[("runtime", "oversized message (65 MiB)")] == "RESOURCE_EXHAUSTED"
    assert cases[("enclave", "guessed session id")] == "UNAUTHENTICATED"
    assert cases[("runtime", "batch 1024 (max) is served")] == "OK"
    for case in ("60 MB shape of 60,000,000 dimensions", "largest accepted request, all shape (rank check first)",
                 "20,000-character model name", "contents and raw_input_contents both set"):
        assert ("runtime", case) in cases
    assert _metrics(out)["runtime.longest_error_message"].value <= 1024


def test_fuzzing_finds_no_crash_and_both_services_stay_healthy(services, tmp_path):
    out = get_attack("protocol-fuzz").run(services, BUDGET, tmp_path)
    m = _metrics(out)
    for service in ("runtime", "enclave"):
        assert m[f"{service}.requests"].value == BUDGET.fuzz_requests
        for kind in ("crashes", "hangs", "unhandled_errors", "unprotected_answers"):
            assert m[f"{service}.{kind}"].value == 0, out.details[service]["findings"]
        assert m[f"{service}.healthy_after"].value == 1, out.details["health_after"]
        kinds = out.details[service]["kinds"]
        assert kinds.get("ok", 0) > 0 and kinds.get("refused", 0) > 0 and kinds.get("parser", 0) > 0
    assert (tmp_path / "protocol_fuzz.png").exists()


def test_fuzzing_reports_unprotected_answers_and_unhandled_errors_of_a_bad_server(artefacts, tmp_path):
    """A server that answers OK to every call, or raises in its handler: the fuzzer must call both findings."""

    class Careless(grpc.GenericRpcHandler):
        def service(self, details):
            def answer(request, context):
                if len(request) % 2:
                    raise RuntimeError("boom")
                return b""

            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((Careless(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target = Target(artefacts["bundle"], endpoint=f"127.0.0.1:{port}")  # no license: no OK is allowed
        m = _metrics(get_attack("protocol-fuzz").run(target, replace(BUDGET, fuzz_requests=100), tmp_path))
    finally:
        server.stop(0)
    assert m["runtime.unprotected_answers"].value > 0 and m["runtime.unprotected_answers"].passed is False
    assert m["runtime.unhandled_errors"].value > 0 and m["runtime.healthy_after"].passed is False


def test_license_brute_force_is_locked_out_after_ten_failures(services, tmp_path):
    out = get_attack("license-brute-force").run(services, BUDGET, tmp_path)
    m = _metrics(out)
    assert m["enclave.failures_before_lockout"].value == 10
    assert out.details["enclave"] == ["PERMISSION_DENIED"] * 10 + ["RESOURCE_EXHAUSTED"]
    assert out.details["runtime"][-1] == "RESOURCE_EXHAUSTED" and m["runtime.failures_before_lockout"].value == 10
    assert m["enclave.locked_client_valid_license_served"].passed and m["enclave.other_client_unaffected"].passed
    assert m["enclave.locked_client_open_session_served"].passed


def test_bad_licenses_are_refused_replay_is_reported_and_session_ids_are_not_guessable(services, tmp_path):
    out = get_attack("license-checks").run(services, BUDGET, tmp_path)
    m = _metrics(out)
    for name in ("forged (not the owner's key)", "tampered payload", "expired", "not yet valid", "other model",
                 "revoked", "valid license, non-canonical base64 spelling"):
        assert m[f"refused:{name}"].passed, out.details
    replay = m["replay_from_another_client_accepted"]
    assert replay.value == 1 and replay.passed is None
    guesses = _metrics(get_attack("session-guessing").run(services, BUDGET, tmp_path))
    assert guesses["answered_guesses"].value == 0 and guesses["other_statuses"].value == 0


def test_failing_remote_clients_do_not_lock_out_an_innocent_one(services, tmp_path):
    out = get_attack("remote-lockout").run(services, BUDGET, tmp_path)
    m = _metrics(out)
    assert m["failing_clients_locked"].value == 10 and m["innocent_client_served"].passed
    # nothing shared was tripped: the runtime still answers, so the fail-closed probe runs (and holds)
    dead = _metrics(get_attack("fail-closed").run(services, BUDGET, tmp_path))
    assert dead["answers_after_death"].value == 0


def test_a_dead_trusted_module_means_no_answers(services, tmp_path):
    out = get_attack("fail-closed").run(services, BUDGET, tmp_path)
    m = _metrics(out)
    assert out.details["statuses"] == {"UNAVAILABLE": BUDGET.dead_requests}
    assert m["answers_after_death"].value == 0 and m["server_reports_not_ready"].passed


def test_disruptive_attacks_are_skipped_unless_allowed(artefacts, tmp_path):
    target = Target(artefacts["bundle"], endpoint="127.0.0.1:1", enclave="unix:/nonexistent")
    with pytest.raises(Skip, match="kills"):
        get_attack("fail-closed").run(target, BUDGET, tmp_path)
