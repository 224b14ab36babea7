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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enclave_sim.keystore import EMBEDDED_QUOTE_CONTEXT, Evidence, KeystoreError
from enclave_sim.measure import MANIFEST_MEASUREMENT, Measurement, chain_of
from sealnet._grpc import enclave_pb2

EXPECTED_FILE = "expected-measurements.json"


class AttestationError(Exception):
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


def _verify_signature(resp: enclave_pb2.AttestResponse, nonce: bytes) -> None:
    if resp.format == "sealnet-ed25519-v1":
        if resp.quoted != EMBEDDED_QUOTE_CONTEXT + nonce + resp.chain:
            raise AttestationError("attestation does not cover this nonce and chain (replayed or forged)")
        try:
            Ed25519PublicKey.from_public_bytes(resp.attestation_public_key).verify(resp.signature, resp.quoted)
        except (InvalidSignature, ValueError):
            raise AttestationError("attestation signature does not verify") from None
    elif resp.format == "tpm2-quote-v1":
        from enclave_sim.tpm import verify_tpm_quote

        evidence = Evidence(resp.format, resp.chain, resp.quoted, resp.signature, resp.attestation_public_key)
        try:
            verify_tpm_quote(evidence, nonce)
        except KeystoreError as exc:
            raise AttestationError(str(exc)) from None
    else:
        raise AttestationError(f"unknown attestation format {resp.format!r}")


def verify_attestation(resp: enclave_pb2.AttestResponse, nonce: bytes, expected: dict[str, Any]) -> None:
    """Raise AttestationError unless `resp` proves the expected trusted module answered this `nonce`."""
    backend = {"sealnet-ed25519-v1": "embedded", "tpm2-quote-v1": "tpm"}.get(resp.format, resp.format)
    if backend != expected["backend"]:
        raise AttestationError(f"keystore backend differs: expected {expected['backend']}, got {backend}")
    if resp.attestation_public_key.hex() != expected["attestation_public_key"]:
        raise AttestationError("attestation key differs from the one pinned at export (another keystore / TPM)")
    _verify_signature(resp, nonce)
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
