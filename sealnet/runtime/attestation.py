"""Check the trusted module before trusting it with inputs: attestation against expected measurements.

export writes expected-measurements.json into the bundle (listed in the signed manifest): the keystore
backend, the pinned attestation public key, the chain and each measurement. The runtime sends a fresh nonce
and refuses to serve unless the evidence is signed by the pinned key over that nonce and every measurement
matches; the error names each measurement that differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sealnet._grpc import enclave_pb2
from sealnet.errors import FailedPrecondition
from sealnet.evidence import (
    BACKEND_OF_FORMAT,
    MANIFEST_MEASUREMENT,
    Evidence,
    EvidenceError,
    Measurement,
    chain_of,
    verify_evidence,
)


class AttestationError(FailedPrecondition):
    """The trusted module is not the one the bundle was sealed for; the message says what differs."""


def load_expected(path: Path) -> dict[str, Any]:
    try:
        expected = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise AttestationError(f"cannot read expected measurements {path}: {exc}") from None
    for key in ("backend", "attestation_public_key", "chain", "measurements"):
        if key not in expected:
            raise AttestationError(f"{path}: field {key!r} missing")
    return expected


def check_manifest_measured(expected: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Refuse unless the manifest the runtime serves is the one the trusted module measures: attestation checks
    the module against `expected`, so this binds the runtime's own manifest (its owner key, public network and
    input spec) to the module's. A manifest re-signed by another key has another digest and is refused."""
    from sealnet.bundle import core_digest

    want = {m["name"]: m["sha256"] for m in expected["measurements"]}.get(MANIFEST_MEASUREMENT)
    if want != core_digest(manifest).hex():
        raise AttestationError("refusing to serve: this bundle's manifest is not the one the trusted module was "
                               "sealed to (re-signed or edited; compare its owner key with the owner's)")


def verify_attestation(resp: enclave_pb2.AttestResponse, nonce: bytes, expected: dict[str, Any]) -> None:
    """Raise AttestationError unless `resp` proves the expected trusted module answered this `nonce`."""
    backend = BACKEND_OF_FORMAT.get(resp.format, resp.format)
    if backend != expected["backend"]:
        raise AttestationError(f"keystore backend differs: expected {expected['backend']}, got {backend}")
    if resp.attestation_public_key.hex() != expected["attestation_public_key"]:
        raise AttestationError("attestation key differs from the one pinned at export (another keystore / TPM)")
    evidence = Evidence(resp.format, resp.chain, resp.quoted, resp.signature, resp.attestation_public_key)
    try:
        verify_evidence(evidence, nonce)
    except EvidenceError as exc:
        raise AttestationError(str(exc)) from None
    got = [Measurement(m.name, m.sha256) for m in resp.measurements]
    if chain_of(got) != resp.chain:
        raise AttestationError("the listed measurements do not produce the attested chain")
    want = {m["name"]: m["sha256"] for m in expected["measurements"]}
    have = {m.name: m.sha256.hex() for m in got}
    problems = [f"measurement {name} differs: expected {want[name][:16]}..., got {have[name][:16]}..."
                for name in want if name in have and have[name] != want[name]]
    problems += [f"measurement {name} missing" for name in want if name not in have]
    problems += [f"unexpected measurement {name}" for name in have if name not in want]
    if problems or resp.chain.hex() != expected["chain"]:
        raise AttestationError("; ".join(problems) or "measurement order differs (chain mismatch)")


def attest(client, expected: dict[str, Any]) -> enclave_pb2.AttestResponse:
    """Challenge the module behind `client` (an EnclaveClient) with a fresh nonce and verify the answer."""
    nonce = os.urandom(32)
    resp = client.attest(nonce)
    verify_attestation(resp, nonce, expected)
    return resp
