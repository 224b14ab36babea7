"""The attestation evidence format, shared by the trusted module (which produces it) and the runtime (which
checks it): the measurement chain, the `Evidence` record, and the verification of each quote format.

chain_0 = 32 zero bytes; chain_i = sha256(chain_{i-1} || sha256(item_i)), in a fixed order (= a TPM PCR,
sha256 bank). Secrets are sealed to the final chain value, so a changed measured file yields a different key.
Verification needs only public keys, so the runtime checks evidence without importing the trusted module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealnet.errors import Unauthenticated

EMBEDDED_FORMAT = "sealnet-ed25519-v1"
EMBEDDED_QUOTE_CONTEXT = b"sealnet-attest-v1\x00"
TPM_QUOTE_FORMAT = "tpm2-quote-v1"
PCR_INDEX = 16  # the chain lives in the resettable debug PCR (sha256 bank)
BACKEND_OF_FORMAT = {EMBEDDED_FORMAT: "embedded", TPM_QUOTE_FORMAT: "tpm"}
MANIFEST_MEASUREMENT = "bundle:manifest"  # the name the bundle manifest's core digest is measured under


class EvidenceError(Unauthenticated):
    """The evidence does not prove what it claims (signature, nonce, chain or format); the message says which."""


@dataclass(frozen=True)
class Measurement:
    name: str
    sha256: bytes


@dataclass(frozen=True)
class Evidence:
    """An attestation: the chain, signed over a nonce, in a backend-specific format."""

    format: str  # EMBEDDED_FORMAT or TPM_QUOTE_FORMAT
    chain: bytes
    quoted: bytes  # the signed message (for TPM: the marshalled TPMS_ATTEST)
    signature: bytes
    public_key: bytes  # the attestation key, raw Ed25519 or DER SubjectPublicKeyInfo


def extend(chain: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(chain + digest).digest()


def chain_of(measurements: list[Measurement]) -> bytes:
    """The chain value after extending a zeroed register with each measurement (= a TPM PCR, sha256 bank)."""
    chain = bytes(32)
    for item in measurements:
        chain = extend(chain, item.sha256)
    return chain


def verify_evidence(evidence: Evidence, nonce: bytes) -> bytes:
    """Check `evidence` (either format) against `nonce`; return the attested chain.

    Checks the signature with `evidence.public_key` only: the caller must also compare that key with the
    attestation key it pinned (expected-measurements.json), or anyone's keystore would pass."""
    if evidence.format == EMBEDDED_FORMAT:
        if evidence.quoted != EMBEDDED_QUOTE_CONTEXT + nonce + evidence.chain:
            raise EvidenceError("attestation does not cover this nonce and chain (replayed or forged)")
        try:
            Ed25519PublicKey.from_public_bytes(evidence.public_key).verify(evidence.signature, evidence.quoted)
        except (InvalidSignature, ValueError):
            raise EvidenceError("attestation signature does not verify") from None
        return evidence.chain
    if evidence.format == TPM_QUOTE_FORMAT:
        return verify_tpm_quote(evidence, nonce)
    raise EvidenceError(f"unknown attestation format {evidence.format!r}")


def _only_pcr_sha256(selection) -> bool:
    from tpm2_pytss.constants import TPM2_ALG

    if selection.count != 1:
        return False
    bank = selection.pcrSelections[0]
    mask = bytes(bank.pcrSelect)[: bank.sizeofSelect]
    expected = bytearray(max(bank.sizeofSelect, PCR_INDEX // 8 + 1))
    expected[PCR_INDEX // 8] = 1 << (PCR_INDEX % 8)
    return bank.hash == TPM2_ALG.SHA256 and mask == bytes(expected)


def verify_tpm_quote(evidence: Evidence, nonce: bytes) -> bytes:
    """Check a `tpm2-quote-v1` Evidence against `nonce`; return the attested chain (PCR 16)."""

    def refuse(why: str) -> EvidenceError:
        return EvidenceError(f"attestation refused: {why}")

    try:  # only this format needs tpm2-pytss (to parse TPMS_ATTEST)
        from tpm2_pytss.constants import TPM2_GENERATED, TPM2_ST
        from tpm2_pytss.types import TPMS_ATTEST
    except (ImportError, OSError) as exc:  # OSError: libtss2 missing
        raise refuse(f"checking a TPM quote needs tpm2-pytss ({exc}); pip install tpm2-pytss") from None
    if evidence.format != TPM_QUOTE_FORMAT:
        raise refuse(f"evidence format is {evidence.format!r}, not {TPM_QUOTE_FORMAT!r}")
    try:
        key = serialization.load_der_public_key(evidence.public_key)
    except (ValueError, UnsupportedAlgorithm):
        raise refuse("the attestation public key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise refuse("the attestation key is not an ECC P-256 key")
    try:
        key.verify(evidence.signature, evidence.quoted, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise refuse("the quote signature does not verify with the attestation key") from None
    try:
        attest, used = TPMS_ATTEST.unmarshal(evidence.quoted)
    except (RuntimeError, ValueError, TypeError):
        raise refuse("the quoted data is not a TPMS_ATTEST structure") from None
    if used != len(evidence.quoted) or attest.magic != TPM2_GENERATED.VALUE:
        raise refuse("the quoted data is not a TPM-generated attestation")
    if attest.type != TPM2_ST.ATTEST_QUOTE:
        raise refuse("the attestation is not a quote")
    if bytes(attest.extraData) != nonce:
        raise refuse("the quote is not over this nonce (replayed or for another verifier)")
    if not _only_pcr_sha256(attest.attested.quote.pcrSelect):
        raise refuse(f"the quote does not cover exactly sha256 PCR {PCR_INDEX}")
    if len(evidence.chain) != 32 or bytes(attest.attested.quote.pcrDigest) != hashlib.sha256(evidence.chain).digest():
        raise refuse("the reported chain is not the PCR value the TPM quoted")
    return evidence.chain
