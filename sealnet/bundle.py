"""The bundle: a directory with public.onnx, secrets.sealed and a signed manifest.json.

The manifest lists the sha256 of every file and is signed by the owner key whose public half it carries.
Its "measured core" (everything but the sealed-file and expected-measurement hashes and the signature) is
measured into the keystore chain, so swapping the owner key or the public network makes the secrets unsealable.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealnet.canonical import canonical_json
from sealnet.errors import InvalidArgument
from sealnet.licenses import public_from_raw, public_raw

FORMAT = "sealnet-bundle/2"  # /2: the manifest names its module step
MANIFEST = "manifest.json"
PUBLIC_ONNX = "public.onnx"
SECRETS = "secrets.sealed"
EXPECTED_MEASUREMENTS = "expected-measurements.json"
_SIGNING_CONTEXT = b"sealnet-manifest-v1\x00"
# Manifest sections that depend on the measurement itself, so they are signed but not measured.
UNMEASURED = ("sealed", "attestation", "signature")

# What the trusted module does for a bundle (manifest field `module_step`), by data call of proto/enclave.proto.
# The runtime's order follows from it, so neither the runtime nor Triton's repository needs the method's name.
PREPROCESS = "preprocess"  # raw -> module (Preprocess) -> public network: input transform, DSN stamp
PARAMS = "params"  # module (PassportParams) gives the public network its parameters; it then runs on raw inputs
CLASSIFY = "classify"  # raw -> public network -> features -> module (Classify) -> answer: sealed head
MODULE_STEPS = (PREPROCESS, PARAMS, CLASSIFY)


class BundleError(InvalidArgument):
    """The bundle is incomplete, tampered with, or not signed by its owner key."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def measured_core(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in UNMEASURED}


def core_digest(manifest: dict[str, Any]) -> bytes:
    """sha256 of the manifest's measured core: what the keystore chain binds the secrets to."""
    return hashlib.sha256(canonical_json(measured_core(manifest))).digest()


def sign_manifest(manifest: dict[str, Any], owner_key: Ed25519PrivateKey) -> dict[str, Any]:
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    signature = owner_key.sign(_SIGNING_CONTEXT + canonical_json(unsigned))
    return {**unsigned, "signature": base64.b64encode(signature).decode()}


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: dict[str, Any]

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def owner_public_key(self) -> Ed25519PublicKey:
        return public_from_raw(base64.b64decode(self.manifest["owner_public_key"]))

    def require_method(self, method: str) -> None:
        """For code that applies to one method's bundles: a clear error for any other."""
        if self.manifest["method"] != method:
            raise BundleError(f"{self.directory}: a {self.manifest['method']!r} bundle, not a {method!r} bundle")

    def path(self, name: str) -> Path:
        return self.directory / name


def owner_key_field(owner_key: Ed25519PrivateKey) -> str:
    return base64.b64encode(public_raw(owner_key.public_key())).decode()


def load_bundle(directory: Path, *, expected_owner: Ed25519PublicKey | None = None) -> Bundle:
    """Read and check a bundle: format, owner signature, and the sha256 of every listed file."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"{directory} is not a bundle: {MANIFEST} not found")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        hint = "; re-export it with this version's `sealnet export`" if str(found).startswith("sealnet-bundle/") else ""
        raise BundleError(f"{path}: not a {FORMAT} manifest (format {found!r}){hint}")
    if manifest.get("module_step") not in MODULE_STEPS:
        raise BundleError(f"{path}: module_step must be one of {', '.join(MODULE_STEPS)}")
    try:
        owner = public_from_raw(base64.b64decode(manifest["owner_public_key"], validate=True))
        signature = base64.b64decode(manifest["signature"], validate=True)
    except (KeyError, ValueError):
        raise BundleError(f"{path}: owner_public_key or signature missing or malformed") from None
    if expected_owner is not None and public_raw(owner) != public_raw(expected_owner):
        raise BundleError(f"{path}: signed by a different owner key than expected")
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    try:
        owner.verify(signature, _SIGNING_CONTEXT + canonical_json(unsigned))
    except InvalidSignature:
        raise BundleError(f"{path}: manifest signature does not verify (the manifest was modified)") from None
    for section in ("files", "sealed", "attestation"):
        for name, digest in manifest.get(section, {}).items():
            file = directory / name
            if Path(name).name != name:
                raise BundleError(f"{path}: file entry {name!r} must be a plain file name")
            if not file.is_file():
                raise BundleError(f"{directory}: {name} listed in the manifest is missing")
            if sha256_file(file) != digest:
                raise BundleError(f"{directory}: {name} does not match its sha256 in the manifest (tampered?)")
    return Bundle(directory, manifest)
