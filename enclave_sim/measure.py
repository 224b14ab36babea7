"""Measurements: a TPM-style hash chain over the trusted module's code and the bundle manifest.

chain_0 = 32 zero bytes; chain_i = sha256(chain_{i-1} || sha256(item_i)), in a fixed order. Secrets are
sealed to the final chain value, so a changed trusted-module file or manifest yields a different key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

# Every file whose code runs inside the trusted module, in measurement order.
TRUSTED_CODE: tuple[str, ...] = (
    "enclave_sim/__init__.py",
    "enclave_sim/measure.py",
    "enclave_sim/keystore.py",
    "enclave_sim/payload.py",
    "enclave_sim/policy.py",
    "enclave_sim/tpm.py",
    "enclave_sim/transform_graph.py",
    "enclave_sim/passport_params.py",
    "enclave_sim/sealed_head.py",
    "enclave_sim/service.py",
    "sealnet/licenses.py",
    "sealnet/serial.py",
    "sealnet/bundle.py",
    "sealnet/rpc.py",
    "sealnet/outputs.py",
)


MANIFEST_MEASUREMENT = "bundle:manifest"  # the name the manifest's core digest is measured under


@dataclass(frozen=True)
class Measurement:
    name: str
    sha256: bytes


def extend(chain: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(chain + digest).digest()


def measure_code(root: Path = _ROOT) -> list[Measurement]:
    out = []
    for rel in TRUSTED_CODE:
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"trusted-module file {rel} is missing; cannot measure the module")
        out.append(Measurement(f"code:{rel}", hashlib.sha256(path.read_bytes()).digest()))
    return out


def chain_of(measurements: list[Measurement]) -> bytes:
    """The chain value after extending a zeroed register with each measurement (= a TPM PCR, sha256 bank)."""
    chain = bytes(32)
    for item in measurements:
        chain = extend(chain, item.sha256)
    return chain


def measurement_chain(manifest_digest: bytes, root: Path = _ROOT) -> tuple[list[Measurement], bytes]:
    """All measurements (code first, then the manifest) and the resulting chain value."""
    items = measure_code(root) + [Measurement(MANIFEST_MEASUREMENT, manifest_digest)]
    return items, chain_of(items)
