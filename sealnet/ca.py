"""A certification authority for serial numbers (Xu & Yuan, Sec. II): a registry of owner claims, CA-signed.

The registry is one JSON file: `entries` (each an owner's claim from sealnet/serial.py plus when it was
endorsed) and an Ed25519 signature by the CA key over everything else. Endorsing checks the owner's
signatures on the claim, refuses a serial number already endorsed for another owner (first come, first
served: this is what defeats a forger who copies a model's serial number), appends and re-signs. Anyone holding
the CA public key can check whether a serial number is endorsed for a claimed owner. Torch-free.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealnet.canonical import canonical_json
from sealnet.errors import InvalidArgument
from sealnet.licenses import key_id, public_raw, read_private_key, write_key_pair
from sealnet.serial import DSN_CLAIM, WATERMARK_CLAIM, verify_claim

REGISTRY_FORMAT = "sealnet-ca-registry/1"
_REGISTRY_CONTEXT = b"sealnet-ca-registry-v1\x00"
CA_KEY, CA_PUB, REGISTRY = "ca.key", "ca.pub", "registry.json"


class CAError(InvalidArgument, ValueError):
    """A CA key, registry or endorsement request is wrong; the message names the file or field."""


# -- keys -----------------------------------------------------------------------------------------------------
def init_ca(directory: Path, *, force: bool = False) -> tuple[Path, Path, Path]:
    """Create DIR/ca.key (Ed25519, PKCS#8 PEM, 0600), DIR/ca.pub and an empty signed DIR/registry.json."""
    directory = Path(directory)
    key_path, pub_path, reg_path = directory / CA_KEY, directory / CA_PUB, directory / REGISTRY
    if key_path.exists() and not force:
        raise FileExistsError(f"{key_path} exists; refusing to overwrite a CA key (pass --force to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    write_key_pair(key, key_path, pub_path)
    _write_registry(reg_path, _sign({"format": REGISTRY_FORMAT, "ca_key_id": key_id(key.public_key()),
                                     "entries": []}, key))
    return key_path, pub_path, reg_path


def load_ca_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    if path.is_dir():
        path = path / CA_KEY
    if not path.is_file():
        raise FileNotFoundError(f"CA key {path} not found; `sealnet ca init --out DIR` creates one")
    return read_private_key(path, "CA", CAError)


def load_ca_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    if path.is_dir():
        path = path / CA_PUB
    if not path.is_file():
        raise FileNotFoundError(f"CA public key {path} not found (`sealnet ca init` writes DIR/{CA_PUB})")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise CAError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CAError(f"{path}: CA keys are Ed25519; this is a {type(key).__name__}")
    return key


# -- the registry -----------------------------------------------------------------------------------------------
def _payload(registry: dict[str, Any]) -> bytes:
    return _REGISTRY_CONTEXT + canonical_json({k: v for k, v in registry.items() if k != "signature"})


def _sign(registry: dict[str, Any], ca_key: Ed25519PrivateKey) -> dict[str, Any]:
    body = {k: v for k, v in registry.items() if k != "signature"}
    return body | {"signature": ca_key.sign(_payload(body)).hex()}


def _write_registry(path: Path, registry: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_registry(path: Path, ca_public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Read a registry and check the CA's signature over it; any edit to any entry makes this fail."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"registry {path} not found; `sealnet ca init` creates DIR/{REGISTRY}")
    try:
        registry = json.loads(path.read_text())
    except ValueError as exc:
        raise CAError(f"{path}: not JSON ({exc})") from None
    if not isinstance(registry, dict) or registry.get("format") != REGISTRY_FORMAT:
        raise CAError(f"{path}: not a {REGISTRY_FORMAT} file (field format)")
    if registry.get("ca_key_id") != key_id(ca_public_key):
        raise CAError(f"{path}: signed by CA key {registry.get('ca_key_id')!r}, not by the given CA key "
                      f"{key_id(ca_public_key)!r}")
    try:
        ca_public_key.verify(bytes.fromhex(str(registry.get("signature", ""))), _payload(registry))
    except (InvalidSignature, ValueError):
        raise CAError(f"{path}: field signature: the CA signature does not verify (registry tampered with?)") from None
    if not isinstance(registry.get("entries"), list):
        raise CAError(f"{path}: field entries must be a list")
    return registry


def _serial_of(claim: dict[str, Any]) -> tuple[str, Any]:
    """What makes a serial number unique: the commitment (dsn) or the vector (watermark)."""
    return (claim["kind"], claim["commitment"] if claim["kind"] == DSN_CLAIM else tuple(claim["serial"]))


def endorse(registry_path: Path, ca_key: Ed25519PrivateKey, claim: dict[str, Any], *,
            now: int | None = None) -> tuple[dict[str, Any], bool]:
    """Append `claim` to the registry (after checking the owner's signatures) and re-sign it.

    Returns (entry, added); added is False when the same claim was already endorsed. Raises CAError when the
    serial number is endorsed for a different owner or the same owner's model id and customer already have one.
    """
    registry_path = Path(registry_path)
    registry = load_registry(registry_path, ca_key.public_key())
    verify_claim(claim)
    serial = _serial_of(claim)
    for entry in registry["entries"]:
        old = entry["claim"]
        if old == claim:
            return entry, False
        if _serial_of(old) == serial:
            raise CAError(f"{claim['kind']} serial number already endorsed for owner {old['owner_key_id']} "
                          f"(model {old['record']['model_id']!r}, entry {entry['index']}); refusing to endorse it "
                          f"for owner {claim['owner_key_id']}")
        if (old["kind"], old["owner_key_id"], old["record"]["model_id"], old["record"]["customer_id"]) == (
                claim["kind"], claim["owner_key_id"], claim["record"]["model_id"], claim["record"]["customer_id"]):
            raise CAError(f"owner {claim['owner_key_id']} already has a {claim['kind']} serial number for model "
                          f"{claim['record']['model_id']!r} and customer {claim['record']['customer_id']!r} "
                          f"(entry {entry['index']})")
    entry = {"index": len(registry["entries"]), "endorsed_at": int(time.time() if now is None else now),
             "claim": claim}
    registry["entries"].append(entry)
    _write_registry(registry_path, _sign(registry, ca_key))
    return entry, True


def find_endorsement(registry: dict[str, Any], *, kind: str, owner_public_key: Ed25519PublicKey | None = None,
                     claim: dict[str, Any] | None = None, serial: list[float] | None = None,
                     model_id: str | None = None) -> dict[str, Any] | None:
    """The registry entry that endorses a serial number (by claim, or by vector for watermarks) for the
    claimed owner and model, or None."""
    owner_hex = None if owner_public_key is None else public_raw(owner_public_key).hex()
    for entry in registry["entries"]:
        c = entry["claim"]
        if c.get("kind") != kind:
            continue
        if claim is not None and c != claim:
            continue
        if serial is not None and (kind != WATERMARK_CLAIM
                                   or [float(v) for v in c["serial"]] != list(map(float, serial))):
            continue
        if owner_hex is not None and c["owner_public_key"] != owner_hex:
            continue
        if model_id is not None and c["record"]["model_id"] != model_id:
            continue
        return entry
    return None
