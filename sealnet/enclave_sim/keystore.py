"""Keystores: where the trusted module's secrets are sealed, measured and attested.

Every backend offers the same TPM-shaped interface (`Keystore`): `extend` records the measurement chain
(a PCR), `seal` binds data to an expected chain, `unseal` opens it only under the current chain, `quote`
signs the chain over a verifier's nonce. `EmbeddedKeystore` simulates a TPM on pyca/cryptography: a 32-byte
root key (a file of mode 0600, or $SEALNET_ROOT_KEY for tests) never leaves it; sealing keys are
HKDF(root, salt=chain, info=label) and blobs are AES-256-GCM with the label and chain as associated data.
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealnet.errors import FailedPrecondition
from sealnet.evidence import EMBEDDED_FORMAT, EMBEDDED_QUOTE_CONTEXT, Evidence, Measurement, chain_of

ROOT_KEY_FILE = "root.key"
ROOT_KEY_ENV = "SEALNET_ROOT_KEY"
_MAGIC = b"SNSEAL1\x00"
_NONCE = 12


class KeystoreError(FailedPrecondition):
    """The keystore is missing, unsafe, or refused to unseal; the message says what to do."""


class Keystore(ABC):
    """The TPM-shaped interface every backend implements."""

    backend: str

    @abstractmethod
    def extend(self, measurements: list[Measurement]) -> bytes:
        """Reset the chain and extend it with each measurement in order; return the final value."""

    @abstractmethod
    def seal(self, plaintext: bytes, *, chain: bytes, label: str) -> bytes:
        """Encrypt so that only this keystore, once extended to `chain`, can unseal (for `label`)."""

    @abstractmethod
    def unseal(self, blob: bytes, *, label: str) -> bytes:
        """Decrypt under the current chain; KeystoreError on any tampering or measurement mismatch."""

    @abstractmethod
    def quote(self, nonce: bytes) -> Evidence:
        """Sign the current chain over `nonce` with the attestation key."""

    @abstractmethod
    def attestation_public_key(self) -> bytes:
        """The attestation key's public half, to pin in expected-measurements.json."""

    @abstractmethod
    def close(self) -> None:
        """Forget key material held in this process (best effort)."""


def _hkdf(root: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(root)


def init_keystore(directory: Path) -> Path:
    """Create a keystore directory with a fresh root key (0600). Refuses to replace an existing key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / ROOT_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: never overwrite a root key
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return path


class EmbeddedKeystore(Keystore):
    """Seal / unseal / attestation key, keyed by a root key that stays inside this object."""

    backend = "embedded"

    def __init__(self, root_key: bytes):
        if len(root_key) != 32:
            raise KeystoreError("the root key must be exactly 32 bytes")
        self._root = bytearray(root_key)
        self._chain = bytes(32)

    @classmethod
    def open(cls, directory: Path | None) -> EmbeddedKeystore:
        """Open the keystore in `directory`, or from $SEALNET_ROOT_KEY (64 hex digits) when directory is None."""
        if directory is None:
            hex_key = os.environ.get(ROOT_KEY_ENV)
            if not hex_key:
                raise KeystoreError(f"no keystore: pass --keystore DIR or set {ROOT_KEY_ENV}")
            try:
                return cls(bytes.fromhex(hex_key))
            except ValueError:
                raise KeystoreError(f"{ROOT_KEY_ENV} must be 64 hex digits") from None
        path = Path(directory) / ROOT_KEY_FILE
        if not path.is_file():
            raise KeystoreError(f"{path} not found; create a keystore with `sealnet keystore init {directory}`")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeystoreError(f"{path} is readable by others (mode {mode:o}); run chmod 600 {path}")
        return cls(path.read_bytes())

    def extend(self, measurements: list[Measurement]) -> bytes:
        self._chain = chain_of(measurements)
        return self._chain

    def seal(self, plaintext: bytes, *, chain: bytes, label: str) -> bytes:
        key = _hkdf(bytes(self._root), chain, b"sealnet-seal-v1|" + label.encode())
        nonce = os.urandom(_NONCE)
        aad = _MAGIC + label.encode() + b"|" + chain
        return _MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)

    def unseal(self, blob: bytes, *, label: str) -> bytes:
        chain = self._chain
        if len(blob) < len(_MAGIC) + _NONCE + 16 or not blob.startswith(_MAGIC):
            raise KeystoreError("unseal refused: not a sealnet sealed blob (bad header or truncated)")
        key = _hkdf(bytes(self._root), chain, b"sealnet-seal-v1|" + label.encode())
        nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE]
        aad = _MAGIC + label.encode() + b"|" + chain
        try:
            return AESGCM(key).decrypt(nonce, blob[len(_MAGIC) + _NONCE :], aad)
        except InvalidTag:
            raise KeystoreError(
                "unseal refused: the sealed file was modified, or the trusted-module code or bundle manifest "
                "differ from those it was sealed to, or it was sealed by another keystore"
            ) from None

    def _attestation_key(self) -> Ed25519PrivateKey:
        """A stable Ed25519 key derived from the root key; its public half identifies this keystore."""
        return Ed25519PrivateKey.from_private_bytes(_hkdf(bytes(self._root), b"", b"sealnet-attestation-v1"))

    def quote(self, nonce: bytes) -> Evidence:
        quoted = EMBEDDED_QUOTE_CONTEXT + nonce + self._chain
        key = self._attestation_key()
        return Evidence(EMBEDDED_FORMAT, self._chain, quoted, key.sign(quoted), self.attestation_public_key())

    def attestation_public_key(self) -> bytes:
        return self._attestation_key().public_key().public_bytes_raw()

    def close(self) -> None:
        """Overwrite the root key in memory (best effort: Python may hold other copies)."""
        for i in range(len(self._root)):
            self._root[i] = 0
