"""The `tpm` keystore: the `Keystore` interface on a real TPM 2.0 (or swtpm) through tpm2-pytss ESAPI.

The chain lives in PCR 16 (the resettable debug PCR, sha256 bank): `extend` resets it and extends each
measurement, so it then holds exactly `chain_of(measurements)`. A TPM seals only a few bytes, so `seal` makes
a random 32-byte data key, seals it in the TPM as a keyedhash object whose only authorization is
PolicyPCR(sha256:16 = chain), and encrypts the payload with AES-256-GCM under that key. Both keys the TPM
uses are primaries re-derived from fixed templates on every call (nothing persistent to provision):
a storage key in the owner hierarchy (parent of sealed objects) and a restricted ECDSA P-256 attestation key
in the endorsement hierarchy (stable for a given TPM). Every transient handle and session is flushed
before a call returns, so calls never exhaust the TPM's few object slots.

Sealed blob (all lengths big-endian):
    b"SNTPM01\\0" | u16 n | TPM2B_PRIVATE (n bytes) | u16 m | TPM2B_PUBLIC (m bytes) | nonce (12) | AES-GCM ct+tag
with associated data = everything before the nonce | b"|" | label | b"|" | chain.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealnet.enclave_sim.keystore import Keystore, KeystoreError
from sealnet.evidence import PCR_INDEX, TPM_QUOTE_FORMAT, Evidence, Measurement, chain_of

# ESAPI logs an ERROR line to stderr for every failed TPM command, refused unseals included; the
# KeystoreError already says what happened. An explicit $TSS2_LOG still wins.
os.environ.setdefault("TSS2_LOG", "all+NONE")

try:
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_RC,
        TPM2_SE,
        TPMA_SESSION,
    )
    from tpm2_pytss.types import (
        TPM2B_PRIVATE,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPML_DIGEST_VALUES,
        TPML_PCR_SELECTION,
        TPMS_ATTEST,
        TPMS_SENSITIVE_CREATE,
        TPMT_HA,
        TPMT_PUBLIC,
        TPMU_HA,
    )
except (ImportError, OSError) as exc:  # OSError: libtss2 missing. Only this backend needs it: say so when opened.
    _IMPORT_ERROR: BaseException | None = exc
else:
    _IMPORT_ERROR = None

MAGIC = b"SNTPM01\x00"
_NONCE = 12
_TAG = 16
_DATA_KEY = 32
_MAX_QUALIFYING_DATA = 64  # TPM2B_DATA holds at most a TPMT_HA


def _require_tpm2_pytss() -> None:
    if _IMPORT_ERROR is not None:
        raise KeystoreError(
            f"the tpm keystore needs tpm2-pytss ({_IMPORT_ERROR}); pip install tpm2-pytss (needs libtss2-dev)"
        )


def _pcr_selection() -> TPML_PCR_SELECTION:
    return TPML_PCR_SELECTION.parse(f"sha256:{PCR_INDEX}")


def _storage_template() -> TPM2B_PUBLIC:
    """The parent of sealed objects: an ECC P-256 restricted decryption key (the usual SRK shape)."""
    attrs = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda"
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attrs))


def _attestation_template() -> TPM2B_PUBLIC:
    """A restricted ECDSA-P256-SHA256 signing key: it signs only TPM-generated structures such as quotes."""
    attrs = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
    area = TPMT_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=attrs)
    area.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL  # a signing key has no symmetric part
    return TPM2B_PUBLIC(publicArea=area)


def _sealed_template(policy: bytes) -> TPM2B_PUBLIC:
    """A sealed data object: no userWithAuth, so only a policy session (the PCR policy) can unseal it."""
    area = TPMT_PUBLIC.parse("keyedhash", objectAttributes="fixedtpm|fixedparent|noda", authPolicy=policy)
    return TPM2B_PUBLIC(publicArea=area)


def _spki(public: TPM2B_PUBLIC) -> bytes:
    """DER SubjectPublicKeyInfo of a TPM ECC P-256 public area."""
    point = public.publicArea.unique.ecc
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(bytes(point.x), "big"), int.from_bytes(bytes(point.y), "big"), ec.SECP256R1()
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _aad(sealed_object: bytes, label: str, chain: bytes) -> bytes:
    return sealed_object + b"|" + label.encode() + b"|" + chain


def _parse_blob(blob: bytes) -> tuple[bytes, TPM2B_PRIVATE, TPM2B_PUBLIC, bytes, bytes]:
    """Split a sealed blob into (header incl. sealed object, private, public, nonce, ciphertext)."""
    bad = KeystoreError("unseal refused: not a sealnet TPM-sealed blob (bad header or truncated)")
    if not blob.startswith(MAGIC):
        raise bad
    parts = []
    offset = len(MAGIC)
    for kind in (TPM2B_PRIVATE, TPM2B_PUBLIC):
        if len(blob) < offset + 2:
            raise bad
        (size,) = struct.unpack_from(">H", blob, offset)
        offset += 2
        raw = blob[offset : offset + size]
        if len(raw) != size:
            raise bad
        try:
            obj, used = kind.unmarshal(raw)
        except (RuntimeError, ValueError, TypeError):  # TSS2_Exception is a RuntimeError
            raise bad from None
        if used != size:
            raise bad
        parts.append(obj)
        offset += size
    if len(blob) < offset + _NONCE + _TAG:
        raise bad
    return blob[:offset], parts[0], parts[1], blob[offset : offset + _NONCE], blob[offset + _NONCE :]


class TpmKeystore(Keystore):
    """Keystore on a TPM 2.0 reached through a TCTI string, e.g. "swtpm:host=127.0.0.1,port=2321"."""

    backend = "tpm"

    def __init__(self, tcti: str):
        _require_tpm2_pytss()
        self.tcti = tcti
        try:
            self._ectx = ESAPI(tcti)
        except Exception as exc:  # TSS2_Exception, or RuntimeError/ValueError for a malformed TCTI string
            raise KeystoreError(
                f"cannot open the TPM at {tcti!r} ({exc}); start a software TPM with "
                "`python -m sealnet.enclave_sim.swtpm`"
            ) from None

    # -- handles ------------------------------------------------------------------------------------------

    def _flush(self, handle: ESYS_TR) -> None:
        """Flush a transient object or session; a failure here must not mask the caller's own error."""
        try:
            self._ectx.flush_context(handle)
        except TSS2_Exception:
            pass

    @contextmanager
    def _primary(self, template: TPM2B_PUBLIC, hierarchy: ESYS_TR) -> Iterator[tuple[ESYS_TR, TPM2B_PUBLIC]]:
        """Re-derive a primary key (same template + same TPM seed = same key) for the duration of a call."""
        handle, public, *_ = self._ectx.create_primary(None, template, hierarchy)
        try:
            yield handle, public
        finally:
            self._flush(handle)

    @contextmanager
    def _session(self, kind: TPM2_SE, salt_key: ESYS_TR, attributes: TPMA_SESSION | int = 0) -> Iterator[ESYS_TR]:
        """A session salted with `salt_key`, so the data key crosses the TPM interface encrypted (AES-128-CFB).
        continueSession keeps it alive after use, so the finally-flush always has something to flush."""
        session = self._ectx.start_auth_session(salt_key, ESYS_TR.NONE, kind, "aes128cfb", TPM2_ALG.SHA256)
        try:
            self._ectx.trsess_set_attributes(session, attributes | TPMA_SESSION.CONTINUESESSION)
            yield session
        finally:
            self._flush(session)

    def _read_chain(self) -> bytes:
        _, _, values = self._ectx.pcr_read(_pcr_selection())
        if len(values) != 1:
            raise KeystoreError(f"the TPM has no sha256 PCR {PCR_INDEX} (is the sha256 bank allocated?)")
        return bytes(values[0])

    def _policy_digest(self, chain: bytes) -> bytes:
        """PolicyPCR(sha256:16 == chain) computed in a trial session: the PCR need not hold `chain` now."""
        trial = self._ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256)
        try:
            self._ectx.policy_pcr(trial, hashlib.sha256(chain).digest(), _pcr_selection())
            return bytes(self._ectx.policy_get_digest(trial))
        finally:
            self._flush(trial)

    # -- Keystore -----------------------------------------------------------------------------------------

    def extend(self, measurements: list[Measurement]) -> bytes:
        for item in measurements:
            if len(item.sha256) != 32:
                raise KeystoreError(f"measurement {item.name!r} is not a sha256 digest ({len(item.sha256)} bytes)")
        try:
            self._ectx.pcr_reset(ESYS_TR.PCR16)
            for item in measurements:
                digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=item.sha256))
                self._ectx.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([digest]))
            chain = self._read_chain()
        except TSS2_Exception as exc:
            raise KeystoreError(f"extending PCR {PCR_INDEX} failed: {exc}") from None
        if chain != chain_of(measurements):
            raise KeystoreError(
                f"PCR {PCR_INDEX} does not hold the expected chain after extending; another process is using it"
            )
        return chain

    def seal(self, plaintext: bytes, *, chain: bytes, label: str) -> bytes:
        if len(chain) != 32:
            raise KeystoreError("seal needs a 32-byte sha256 chain value")
        data_key = os.urandom(_DATA_KEY)
        try:
            policy = self._policy_digest(chain)
            sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=data_key))
            with self._primary(_storage_template(), ESYS_TR.OWNER) as (parent, _):
                with self._session(TPM2_SE.HMAC, parent, TPMA_SESSION.DECRYPT) as session:
                    private, public, *_ = self._ectx.create(
                        parent, sensitive, _sealed_template(policy), session1=session
                    )
        except TSS2_Exception as exc:
            raise KeystoreError(f"seal failed in the TPM: {exc}") from None
        header = MAGIC + b"".join(struct.pack(">H", len(raw)) + raw for raw in (private.marshal(), public.marshal()))
        nonce = os.urandom(_NONCE)
        return header + nonce + AESGCM(data_key).encrypt(nonce, plaintext, _aad(header, label, chain))

    def unseal(self, blob: bytes, *, label: str) -> bytes:
        header, private, public, nonce, ciphertext = _parse_blob(blob)
        try:
            chain = self._read_chain()
            with self._primary(_storage_template(), ESYS_TR.OWNER) as (parent, _):
                try:
                    sealed = self._ectx.load(parent, private, public)
                except TSS2_Exception:
                    raise KeystoreError(
                        "unseal refused: the TPM would not load the sealed key: the sealed file was modified, "
                        "or it was sealed by another TPM (or this TPM's owner hierarchy was cleared)"
                    ) from None
                try:
                    with self._session(TPM2_SE.POLICY, parent, TPMA_SESSION.ENCRYPT) as session:
                        self._ectx.policy_pcr(session, None, _pcr_selection())
                        data_key = bytes(self._ectx.unseal(sealed, session1=session))
                finally:
                    self._flush(sealed)
        except TSS2_Exception as exc:
            if exc.error == TPM2_RC.POLICY_FAIL:
                raise KeystoreError(
                    f"unseal refused: PCR {PCR_INDEX} does not hold the chain this was sealed to: the trusted-module "
                    "code or bundle manifest differ from those it was sealed to (or extend() was not called)"
                ) from None
            raise KeystoreError(f"unseal refused: TPM error: {exc}") from None
        if len(data_key) != _DATA_KEY:
            raise KeystoreError("unseal refused: the sealed object does not hold a sealnet data key")
        try:
            return AESGCM(data_key).decrypt(nonce, ciphertext, _aad(header, label, chain))
        except InvalidTag:
            raise KeystoreError(
                "unseal refused: the sealed file was modified or was sealed for another label (bundle)"
            ) from None

    def quote(self, nonce: bytes) -> Evidence:
        if len(nonce) > _MAX_QUALIFYING_DATA:
            raise KeystoreError(f"a TPM quote nonce is at most {_MAX_QUALIFYING_DATA} bytes, got {len(nonce)}")
        try:
            chain = self._read_chain()
            with self._primary(_attestation_template(), ESYS_TR.ENDORSEMENT) as (key, public):
                attest, signature = self._ectx.quote(key, _pcr_selection(), nonce)
        except TSS2_Exception as exc:
            raise KeystoreError(f"quote failed in the TPM: {exc}") from None
        quoted = bytes(attest)
        parsed, _ = TPMS_ATTEST.unmarshal(quoted)
        if bytes(parsed.attested.quote.pcrDigest) != hashlib.sha256(chain).digest():
            raise KeystoreError(f"PCR {PCR_INDEX} changed while quoting (another process is using it); retry")
        return Evidence(TPM_QUOTE_FORMAT, chain, quoted, bytes(signature), _spki(public))

    def attestation_public_key(self) -> bytes:
        try:
            with self._primary(_attestation_template(), ESYS_TR.ENDORSEMENT) as (_, public):
                return _spki(public)
        except TSS2_Exception as exc:
            raise KeystoreError(f"reading the attestation key failed: {exc}") from None

    def close(self) -> None:
        """Close the ESAPI context; no key material is held in this process between calls."""
        self._ectx.close()
