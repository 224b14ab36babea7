"""Licenses: owner-signed (Ed25519) statements binding a customer, a model, a serial number and an expiry.

A license travels as one ASCII token, `sn1.<payload>.<signature>` (base64url), so it fits a gRPC metadata
value. The trusted module verifies it against the owner public key pinned in the sealed bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealnet.canonical import canonical_json
from sealnet.errors import PermissionDenied

TOKEN_PREFIX = "sn1"
_SIGNING_CONTEXT = b"sealnet-license-v1\x00"
MAX_TOKEN_CHARS = 4096


class LicenseError(PermissionDenied):
    """A license was malformed, forged, expired or issued for something else; the message says which.

    `license_id` is set only when the owner's signature verified (expired, other model, ...): then the id is
    the owner's, not whatever a forger wrote, and may be counted against that license."""

    def __init__(self, message: str, license_id: str | None = None):
        super().__init__(message)
        self.license_id = license_id


@dataclass(frozen=True)
class License:
    license_id: str
    customer_id: str
    model_id: str
    serial_number: str
    issued_at: int
    not_before: int
    expires_at: int
    owner_key_id: str


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str, field: str) -> bytes:
    """Decode unpadded base64url, accepting only the one canonical spelling: the decoder ignores the unused low
    bits of the last character, so without the re-encoding check one token would have up to 16 spellings
    (and anything keyed on the token string, e.g. a session cache or a deny-list, would see 16 licenses)."""
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (ValueError, TypeError):
        raise LicenseError(f"license {field} is not valid base64url") from None
    if _b64e(data) != text:
        raise LicenseError(f"license {field} is not canonical base64url (unused bits set, or padding)")
    return data


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of an owner public key: the first 16 hex digits of sha256 of its raw bytes."""
    return hashlib.sha256(public_raw(public_key)).hexdigest()[:16]


def public_raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def write_owner_key(path: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create an owner signing key at `path` (PKCS#8 PEM, mode 0600) and its public key at `path`.pub."""
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite an owner key (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_key_pair(Ed25519PrivateKey.generate(), path, pub_path)
    return path, pub_path


def write_key_pair(key: Ed25519PrivateKey, path: Path, pub_path: Path) -> None:
    """`key` at `path` (PKCS#8 PEM, mode 0600 from the moment it exists) and its public key at `pub_path` (PEM).
    Owner and CA keys are both written this way."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(path, 0o600)
    Path(pub_path).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))


def read_private_key(path: Path, role: str, error: type[Exception]) -> Ed25519PrivateKey:
    """The Ed25519 key in the unencrypted PEM file `path`; anything else raises `error` naming the file and what
    `role` keys must be."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise error(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise error(f"{path}: {role} keys are Ed25519; this is a {type(key).__name__}")
    return key


def load_owner_key(path: Path) -> Ed25519PrivateKey:
    return read_private_key(path, "owner", LicenseError)


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise LicenseError(f"{path}: owner keys are Ed25519; this is a {type(key).__name__}")
    return key


def issue_license(owner_key: Ed25519PrivateKey, *, customer_id: str, model_id: str, serial_number: str,
                  valid_seconds: int, not_before: int | None = None) -> str:
    """Sign a license token; `valid_seconds` counts from `not_before` (default: now)."""
    for name, value in (("customer_id", customer_id), ("model_id", model_id), ("serial_number", serial_number)):
        if not value or len(value) > 256:
            raise LicenseError(f"{name} must be 1-256 characters")
    if valid_seconds <= 0:
        raise LicenseError("valid_seconds must be positive")
    now = int(time.time())
    start = now if not_before is None else int(not_before)
    lic = License(
        license_id=secrets.token_hex(16), customer_id=customer_id, model_id=model_id,
        serial_number=serial_number, issued_at=now, not_before=start, expires_at=start + int(valid_seconds),
        owner_key_id=key_id(owner_key.public_key()),
    )
    payload = canonical_json(asdict(lic))
    signature = owner_key.sign(_SIGNING_CONTEXT + payload)
    return f"{TOKEN_PREFIX}.{_b64e(payload)}.{_b64e(signature)}"


def _split(token: str) -> tuple[bytes, bytes]:
    if not isinstance(token, str) or not token:
        raise LicenseError("license is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise LicenseError(f"license is longer than {MAX_TOKEN_CHARS} characters")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise LicenseError(f"license is not a sealnet token (expected '{TOKEN_PREFIX}.<payload>.<signature>')")
    return _b64d(parts[1], "payload"), _b64d(parts[2], "signature")


def _decode_payload(payload: bytes) -> License:
    try:
        fields = json.loads(payload)
        lic = License(**fields)
    except (ValueError, TypeError):
        raise LicenseError("license payload is not a valid license record") from None
    for name in ("issued_at", "not_before", "expires_at"):
        if not isinstance(getattr(lic, name), int):
            raise LicenseError(f"license field {name} must be an integer")
    return lic


def inspect_license(token: str) -> License:
    """Decode a token WITHOUT verifying it (for display); never use the result for a decision."""
    payload, _ = _split(token)
    return _decode_payload(payload)


def verify_license(token: str, owner_public_key: Ed25519PublicKey, *, model_id: str,
                   now: float | None = None) -> License:
    """Return the license if the owner signed it for `model_id` and it is valid now; else raise LicenseError."""
    payload, signature = _split(token)
    try:
        owner_public_key.verify(signature, _SIGNING_CONTEXT + payload)
    except InvalidSignature:
        raise LicenseError("bad signature: license was not issued by this model's owner key") from None
    lic = _decode_payload(payload)
    t = time.time() if now is None else now
    if lic.model_id != model_id:
        raise LicenseError(f"license is for model {lic.model_id!r}, this trusted module serves {model_id!r}",
                           lic.license_id)
    if t < lic.not_before:
        raise LicenseError("license is not valid yet", lic.license_id)
    if t >= lic.expires_at:
        raise LicenseError(f"license expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(lic.expires_at))}",
                           lic.license_id)
    return lic
