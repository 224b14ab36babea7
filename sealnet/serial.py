"""Serial numbers, the owner's side: owner-signed serial records, DSN patterns and watermark serial vectors,
claims and trigger files. Stamping inputs (what the trusted module runs) is in sealnet/stamp.py.

- A serial record (company, model id, timestamp, customer id) is signed by the owner's Ed25519 key. Ed25519
  signatures are deterministic (RFC 8032), so the owner can re-derive everything below from the key and the
  record at any time.
- DSN (Deep Serial Number): the 0/1 stamp pattern k = HKDF-SHA256(signature) bits. The signature is therefore
  a secret of the owner; what is published (to the CA) is a commitment sha256(context || signature).
- Serial-number watermark (Xu & Yuan): the serial vector i = HKDF-SHA256(signature) mapped to a grid of
  levels, one per output logit; the signature is published with i so that anyone can check that i is the
  owner's.
- A claim (the `*.serial.json` file) states what the owner asks a certification authority to endorse; it is
  signed by the owner (`request_signature`) so the CA can check who asks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealnet.canonical import canonical_json
from sealnet.licenses import key_id, public_from_raw, public_raw
from sealnet.stamp import SerialError

CLAIM_FORMAT = "sealnet-serial/1"
TRIGGER_FORMAT = "sealnet-trigger/1"
DSN_CLAIM, WATERMARK_CLAIM = "dsn", "watermark"  # a claim's kind: what the serial number is carried by
KINDS = (DSN_CLAIM, WATERMARK_CLAIM)
_RECORD_CONTEXT = b"sealnet-serial-record-v1\x00"
_CLAIM_CONTEXT = b"sealnet-serial-claim-v1\x00"
_COMMIT_CONTEXT = b"sealnet-dsn-commitment-v1\x00"
_PATTERN_INFO = b"sealnet-dsn-pattern-v1"
_VECTOR_INFO = b"sealnet-watermark-vector-v1"
SERIAL_LEVELS = 9  # watermark serial vector entries take one of 9 levels: -8, -6, ..., 8
SERIAL_STEP = 2.0
DEFAULT_TOLERANCE = SERIAL_STEP / 2  # half a level: the nearest level decodes unambiguously


# -- serial records ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SerialRecord:
    company: str
    model_id: str
    timestamp: int
    customer_id: str

    def __post_init__(self) -> None:
        for name in ("company", "model_id", "customer_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 1 <= len(value) <= 256:
                raise SerialError(f"serial record field {name} must be a string of 1-256 characters")
        if not isinstance(self.timestamp, int) or isinstance(self.timestamp, bool) or self.timestamp < 0:
            raise SerialError("serial record field timestamp must be a non-negative integer (Unix seconds)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> SerialRecord:
        if not isinstance(d, dict):
            raise SerialError("serial record must be an object with company, model_id, timestamp, customer_id")
        missing = {"company", "model_id", "timestamp", "customer_id"} - set(d)
        if missing:
            raise SerialError(f"serial record is missing field(s): {', '.join(sorted(missing))}")
        return cls(d["company"], d["model_id"], d["timestamp"], d["customer_id"])

    def payload(self) -> bytes:
        return _RECORD_CONTEXT + canonical_json(self.to_dict())


def sign_record(owner_key: Ed25519PrivateKey, record: SerialRecord) -> bytes:
    """The owner's signature over the record; every serial number is derived from it."""
    return owner_key.sign(record.payload())


def verify_record(owner_public_key: Ed25519PublicKey, record: SerialRecord, signature: bytes) -> None:
    try:
        owner_public_key.verify(signature, record.payload())
    except InvalidSignature:
        raise SerialError("record_signature: not the owner's signature over this serial record") from None


def _hkdf(signature: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(signature)


# -- DSN stamp patterns -------------------------------------------------------------------------------------------
def derive_pattern(signature: bytes, size: tuple[int, int] = (3, 3)) -> np.ndarray:
    """The DSN serial number: a deterministic 0/1 pattern (uint8, `size`) from the owner's signature.

    Patterns with fewer than a quarter or more than three quarters ones are skipped (the next HKDF counter is
    tried), so that a stamp never coincides with a blank or saturated corner of a raw image.
    """
    h, w = int(size[0]), int(size[1])
    n = h * w
    if h < 1 or w < 1 or n < 4 or n > 1024:
        raise SerialError(f"pattern size {h}x{w}: needs 4 to 1024 bits")
    lo, hi = -(-n // 4), (3 * n) // 4
    for counter in range(256):
        raw = _hkdf(signature, _PATTERN_INFO + b"|%d|%dx%d" % (counter, h, w), -(-n // 8))
        bits = np.unpackbits(np.frombuffer(raw, np.uint8))[:n]
        if lo <= int(bits.sum()) <= hi:
            return bits.reshape(h, w).astype(np.uint8)
    raise SerialError("no balanced pattern in 256 HKDF blocks")  # probability ~0: 256 independent draws


def commitment(signature: bytes) -> str:
    """What a CA may publish for a DSN serial number: it binds the secret pattern without revealing it."""
    return hashlib.sha256(_COMMIT_CONTEXT + signature).hexdigest()


def license_serial_number(commitment_hex: str) -> str:
    """The serial number a customer's license carries for a DSN student: public, derived from the commitment
    (so it names the pattern without revealing it)."""
    if not re.fullmatch(r"[0-9a-f]{64}", commitment_hex):
        raise SerialError("commitment must be 64 lower-case hex digits (sha256)")
    return f"dsn-{commitment_hex[:16]}"


# -- watermark serial vectors and trigger sets -------------------------------------------------------------------
def derive_serial_vector(signature: bytes, length: int) -> np.ndarray:
    """The watermark serial number i: one level in {-8, -6, ..., 8} per output logit, from HKDF bytes by
    rejection sampling (bytes >= 252 are skipped, so every level is equally likely)."""
    if not 1 <= length <= 1000:
        raise SerialError(f"serial vector length must be 1-1000 (got {length})")
    limit = 256 - 256 % SERIAL_LEVELS
    raw = np.frombuffer(_hkdf(signature, _VECTOR_INFO + b"|%d" % length, 2 * length + 64), np.uint8)
    kept = raw[raw < limit]
    if len(kept) < length:
        raise SerialError("HKDF output too short for the serial vector")  # probability ~0
    levels = kept[:length].astype(np.int64) % SERIAL_LEVELS - SERIAL_LEVELS // 2
    return (levels * SERIAL_STEP).astype(np.float32)


def make_trigger(input_shape: tuple[int, int, int], n: int, seed: int, amplitude: float = 0.3) -> np.ndarray:
    """The trigger set T: n uniform-noise images in [0, amplitude] (float32 NCHW) from a seeded PCG64 stream.

    Dim noise: at full intensity every convolution filter fires on it, and fitting T slowed the task's training
    (measured on MNIST: 61% instead of 72% test accuracy after one epoch)."""
    if n < 1:
        raise SerialError(f"trigger set size must be >= 1 (got {n})")
    return (np.random.default_rng(seed).random((n, *input_shape), dtype=np.float32) * np.float32(amplitude))


def trigger_digest(trigger: np.ndarray) -> str:
    t = np.ascontiguousarray(trigger, dtype="<f4")
    return hashlib.sha256(repr(t.shape).encode() + t.tobytes()).hexdigest()


@dataclass(frozen=True)
class SerialMatch:
    """query(T) against i: per trigger image, all outputs within `tolerance` of the serial vector."""

    rate: float  # fraction of trigger images whose output matches i
    matched: bool  # rate >= min_rate
    max_deviation: float  # worst |output - i| over all images and logits
    median_deviation: float  # median over images of max |output - i|
    decoded: list[float]  # per-logit median output, rounded to the nearest level

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def match_serial(outputs: np.ndarray, serial: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                 min_rate: float = 1.0) -> SerialMatch:
    out = np.asarray(outputs, dtype=np.float64)
    serial = np.asarray(serial, dtype=np.float64).reshape(-1)
    if out.ndim != 2 or out.shape[1] != serial.shape[0]:
        raise SerialError(f"outputs of shape {out.shape} do not fit a serial vector of length {serial.shape[0]}")
    dev = np.abs(out - serial).max(axis=1)
    rate = float((dev <= tolerance).mean())
    med = np.median(out, axis=0)
    decoded = np.clip(np.round(med / SERIAL_STEP), -(SERIAL_LEVELS // 2), SERIAL_LEVELS // 2) * SERIAL_STEP
    return SerialMatch(rate=rate, matched=rate >= min_rate, max_deviation=float(dev.max()),
                       median_deviation=float(np.median(dev)), decoded=[float(v) + 0.0 for v in decoded])  # no -0.0


# -- claims (what the owner asks the CA to endorse) --------------------------------------------------------------
def _claim_payload(claim: dict[str, Any]) -> bytes:
    return _CLAIM_CONTEXT + canonical_json({k: v for k, v in claim.items() if k != "request_signature"})


def make_claim(owner_key: Ed25519PrivateKey, kind: str, record: SerialRecord, signature: bytes, *,
               pattern_size: tuple[int, int] | None = None, serial: np.ndarray | None = None,
               trigger: np.ndarray | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """The public statement for the CA. dsn: the record and a commitment to the pattern (not the pattern, not
    the signature); watermark: the record, its signature, the serial vector and the trigger set's sha256."""
    if kind not in KINDS:
        raise SerialError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    pub = owner_key.public_key()
    claim: dict[str, Any] = {"format": CLAIM_FORMAT, "kind": kind, "owner_public_key": public_raw(pub).hex(),
                             "owner_key_id": key_id(pub), "record": record.to_dict()}
    if kind == DSN_CLAIM:
        if pattern_size is None:
            raise SerialError("a dsn claim needs pattern_size")
        claim |= {"commitment": commitment(signature), "pattern_size": [int(pattern_size[0]), int(pattern_size[1])]}
    else:
        if serial is None or trigger is None:
            raise SerialError("a watermark claim needs the serial vector and the trigger set")
        claim |= {"record_signature": signature.hex(), "serial": [float(v) for v in serial],
                  "trigger_sha256": trigger_digest(trigger), "tolerance": float(tolerance)}
    claim["request_signature"] = owner_key.sign(_claim_payload(claim)).hex()
    return claim


def _hex_field(claim: dict[str, Any], name: str) -> bytes:
    value = claim.get(name)
    if not isinstance(value, str) or not re.fullmatch(r"(?:[0-9a-f]{2})+", value):
        raise SerialError(f"claim field {name}: missing or not lower-case hex")
    return bytes.fromhex(value)


def verify_claim(claim: Any) -> Ed25519PublicKey:
    """Check a claim's shape and signatures; returns the owner's public key. Watermark claims must also carry
    the owner's record signature and the serial vector derived from it."""
    if not isinstance(claim, dict) or claim.get("format") != CLAIM_FORMAT:
        raise SerialError(f"not a {CLAIM_FORMAT} claim (field format)")
    kind = claim.get("kind")
    if kind not in KINDS:
        raise SerialError(f"claim field kind must be one of {', '.join(KINDS)} (got {kind!r})")
    raw = _hex_field(claim, "owner_public_key")
    if len(raw) != 32:
        raise SerialError("claim field owner_public_key: not a 32-byte Ed25519 public key")
    pub = public_from_raw(raw)
    if claim.get("owner_key_id") != key_id(pub):
        raise SerialError("claim field owner_key_id does not match owner_public_key")
    record = SerialRecord.from_dict(claim.get("record"))
    try:
        pub.verify(_hex_field(claim, "request_signature"), _claim_payload(claim))
    except InvalidSignature:
        raise SerialError("claim field request_signature: not signed by owner_public_key (tampered claim?)") from None
    if kind == DSN_CLAIM:
        _hex_field(claim, "commitment")
    else:
        signature = _hex_field(claim, "record_signature")
        verify_record(pub, record, signature)
        serial = claim.get("serial")
        if not isinstance(serial, list) or not serial:
            raise SerialError("claim field serial: missing")
        if not np.array_equal(np.asarray(serial, np.float32), derive_serial_vector(signature, len(serial))):
            raise SerialError("claim field serial is not the vector derived from record_signature")
    return pub


def serial_path(checkpoint: Path) -> Path:
    """Where `sealnet protect --method dsn|watermark` writes the claim: CHECKPOINT.serial.json."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".serial.json")


def trigger_path(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".trigger.npz")


def write_claim(claim: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(claim, indent=2, sort_keys=True) + "\n")
    return path


def load_claim(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serial claim {path} not found; `sealnet protect --method dsn|watermark` writes one")
    try:
        claim = json.loads(path.read_text())
    except ValueError as exc:
        raise SerialError(f"{path}: not JSON ({exc})") from None
    if not isinstance(claim, dict) or claim.get("format") != CLAIM_FORMAT:
        raise SerialError(f"{path}: not a {CLAIM_FORMAT} claim")
    return claim


# -- trigger files (the watermark owner's verification secret) --------------------------------------------------
def write_trigger_file(path: Path, trigger: np.ndarray, claim: dict[str, Any], min_rate: float = 1.0) -> Path:
    """Trigger set + the watermark claim in one .npz (mode 0600, atomic): all `sealnet verify --trigger` needs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = json.dumps({"format": TRIGGER_FORMAT, "claim": claim, "min_rate": float(min_rate)})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, trigger=np.ascontiguousarray(trigger, np.float32), meta=np.array(meta))
    os.replace(tmp, path)
    return path


@dataclass(frozen=True, eq=False)
class TriggerFile:
    trigger: np.ndarray
    claim: dict[str, Any]
    serial: np.ndarray
    tolerance: float
    min_rate: float


def load_trigger_file(path: Path) -> TriggerFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trigger file {path} not found; `sealnet protect --method watermark` writes one")
    try:
        with np.load(path, allow_pickle=False) as z:
            trigger, meta = z["trigger"], json.loads(str(z["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise SerialError(f"{path}: not a {TRIGGER_FORMAT} file ({exc})") from None
    if meta.get("format") != TRIGGER_FORMAT:
        raise SerialError(f"{path}: not a {TRIGGER_FORMAT} file")
    claim = meta["claim"]
    if claim.get("kind") != WATERMARK_CLAIM:
        raise SerialError(f"{path}: the claim inside is not a watermark claim")
    if trigger_digest(trigger) != claim.get("trigger_sha256"):
        raise SerialError(f"{path}: trigger set does not match the claim's trigger_sha256")
    return TriggerFile(trigger=trigger.astype(np.float32), claim=claim,
                       serial=np.asarray(claim["serial"], np.float32), tolerance=float(claim["tolerance"]),
                       min_rate=float(meta.get("min_rate", 1.0)))
