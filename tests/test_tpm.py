"""The `tpm` keystore on a software TPM (swtpm on loopback), and its contract parity with the embedded one."""

import os
import random
import socket
from collections.abc import Iterator

import pytest

from sealnet.enclave_sim.keystore import EmbeddedKeystore, Keystore, KeystoreError, init_keystore
from sealnet.enclave_sim.keystore_spec import KeystoreSpec
from sealnet.enclave_sim.swtpm import SwtpmProcess, swtpm_unavailable
from sealnet.evidence import Evidence, EvidenceError, Measurement, chain_of, verify_tpm_quote

_REASON = swtpm_unavailable()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_der_public_key  # noqa: E402
from tpm2_pytss import ESAPI  # noqa: E402
from tpm2_pytss.constants import TPM2_CAP, TPM2_HT  # noqa: E402

from sealnet.enclave_sim.tpm import MAGIC, TpmKeystore  # noqa: E402

MEASURED = [Measurement("code:a.py", b"\x01" * 32), Measurement("bundle:manifest", b"\x02" * 32)]
CHANGED = MEASURED[:1] + [Measurement("bundle:manifest", b"\x03" * 32)]
NONCE = b"n" * 32


@pytest.fixture
def swtpm(tmp_path) -> Iterator[SwtpmProcess]:
    with SwtpmProcess(tmp_path / "tpm-state") as tpm:
        yield tpm


@pytest.fixture
def store(swtpm) -> Iterator[TpmKeystore]:
    ks = TpmKeystore(swtpm.tcti)
    yield ks
    ks.close()


def _loaded_handles(tcti: str) -> int:
    """Transient objects plus sessions currently loaded in the TPM (each is a scarce slot)."""
    with ESAPI(tcti) as ectx:
        total = 0
        for kind in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION):
            _, cap = ectx.get_capability(TPM2_CAP.HANDLES, kind << 24, 64)
            total += len(list(cap.data.handles))
        return total


def test_extend_resets_pcr16_and_returns_the_chain(store):
    assert store.extend(MEASURED) == chain_of(MEASURED)
    assert store.extend(MEASURED) == chain_of(MEASURED)  # reset first: extending twice does not accumulate
    assert store.extend([]) == bytes(32)
    with pytest.raises(KeystoreError, match="not a sha256 digest"):
        store.extend([Measurement("short", b"\x01" * 20)])


def test_seal_round_trip_and_binding(store, swtpm):
    chain = chain_of(MEASURED)
    blob = store.seal(b"secret parameters", chain=chain, label="bundle-1")  # PCR 16 does not hold `chain` yet
    assert blob.startswith(MAGIC) and b"secret parameters" not in blob
    with pytest.raises(KeystoreError, match="unseal refused: PCR 16 does not hold"):
        store.unseal(blob, label="bundle-1")
    assert store.extend(MEASURED) == chain
    assert store.unseal(blob, label="bundle-1") == b"secret parameters"
    with pytest.raises(KeystoreError, match="unseal refused:.*another label"):
        store.unseal(blob, label="bundle-2")
    store.extend(CHANGED)
    with pytest.raises(KeystoreError, match="unseal refused: PCR 16 does not hold") as refused:
        store.unseal(blob, label="bundle-1")
    assert "secret" not in str(refused.value)
    store.extend(MEASURED)
    assert store.unseal(blob, label="bundle-1") == b"secret parameters"
    assert _loaded_handles(swtpm.tcti) == 0


def test_every_sampled_bit_flip_is_rejected(store, swtpm):
    plaintext = os.urandom(300)
    blob = store.seal(plaintext, chain=store.extend(MEASURED), label="b")
    rng = random.Random(0)
    for bit in rng.sample(range(len(blob) * 8), 200):
        tampered = bytearray(blob)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(KeystoreError, match="unseal refused"):
            store.unseal(bytes(tampered), label="b")
    for cut in (0, 7, 20, 100, 200):  # inside the sealed-object header
        with pytest.raises(KeystoreError, match="unseal refused: .*truncated"):
            store.unseal(blob[:cut], label="b")
    for cut in (len(blob) // 2, len(blob) - 1):  # inside the ciphertext: only AES-GCM can tell
        with pytest.raises(KeystoreError, match="unseal refused: the sealed file was modified"):
            store.unseal(blob[:cut], label="b")
    assert _loaded_handles(swtpm.tcti) == 0  # every refusal flushed its primary, object and session
    assert store.unseal(blob, label="b") == plaintext


def test_another_tpm_cannot_unseal(store):
    blob = store.seal(b"x", chain=store.extend(MEASURED), label="b")
    with SwtpmProcess() as other_tpm:
        other = TpmKeystore(other_tpm.tcti)
        try:
            other.extend(MEASURED)
            with pytest.raises(KeystoreError, match="unseal refused: the TPM would not load"):
                other.unseal(blob, label="b")
            assert other.attestation_public_key() != store.attestation_public_key()
        finally:
            other.close()


def test_state_survives_a_swtpm_restart(tmp_path):
    state = tmp_path / "persistent"
    with SwtpmProcess(state) as tpm:
        ks = TpmKeystore(tpm.tcti)
        blob = ks.seal(b"kept", chain=chain_of(MEASURED), label="b")
        key = ks.attestation_public_key()
        ks.close()
    assert state.stat().st_mode & 0o777 == 0o700
    with SwtpmProcess(state) as tpm:
        ks = TpmKeystore(tpm.tcti)
        try:
            assert ks.attestation_public_key() == key
            ks.extend(MEASURED)  # PCRs start from zero again after a restart
            assert ks.unseal(blob, label="b") == b"kept"
        finally:
            ks.close()


def test_attestation_key_is_stable_across_instances(store, swtpm):
    key = store.attestation_public_key()
    second = KeystoreSpec("tpm", tcti=swtpm.tcti).open()
    try:
        assert isinstance(second, TpmKeystore) and second.attestation_public_key() == key
    finally:
        second.close()
    public = load_der_public_key(key)
    assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1)


def test_quote_verifies_only_for_its_nonce_and_chain(store):
    chain = store.extend(MEASURED)
    ev = store.quote(NONCE)
    assert ev.format == "tpm2-quote-v1" and ev.chain == chain
    assert ev.public_key == store.attestation_public_key()
    assert verify_tpm_quote(ev, NONCE) == chain
    with pytest.raises(EvidenceError, match="attestation refused: .*nonce"):
        verify_tpm_quote(ev, b"m" * 32)
    tampered = bytearray(ev.quoted)
    tampered[-1] ^= 1
    with pytest.raises(EvidenceError, match="attestation refused: .*signature"):
        verify_tpm_quote(Evidence(ev.format, ev.chain, bytes(tampered), ev.signature, ev.public_key), NONCE)
    with pytest.raises(EvidenceError, match="attestation refused: .*chain"):
        verify_tpm_quote(Evidence(ev.format, chain_of(CHANGED), ev.quoted, ev.signature, ev.public_key), NONCE)
    with pytest.raises(EvidenceError, match="attestation refused: .*format"):
        verify_tpm_quote(Evidence("sealnet-ed25519-v1", ev.chain, ev.quoted, ev.signature, ev.public_key), NONCE)
    store.extend(CHANGED)  # the quote follows the PCR
    changed = store.quote(NONCE)
    assert verify_tpm_quote(changed, NONCE) == chain_of(CHANGED)
    with pytest.raises(EvidenceError, match="attestation refused: .*signature"):
        verify_tpm_quote(Evidence(ev.format, ev.chain, ev.quoted, changed.signature, ev.public_key), NONCE)


def test_swtpm_refuses_an_open_state_dir_and_a_busy_port(tmp_path):
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(RuntimeError, match="chmod 700"):
        SwtpmProcess(tmp_path / "open").start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(RuntimeError, match="swtpm exited"):
            SwtpmProcess(port=busy.getsockname()[1]).start()


def test_unreachable_tpm_is_a_clear_error():
    with SwtpmProcess() as tpm:
        tcti = tpm.tcti
    with pytest.raises(KeystoreError, match="cannot open the TPM.*python -m sealnet.enclave_sim.swtpm"):
        TpmKeystore(tcti)


@pytest.fixture(params=["embedded", "tpm"])
def any_store(request, tmp_path) -> Iterator[Keystore]:
    if request.param == "embedded":
        init_keystore(tmp_path / "ks")
        ks: Keystore = EmbeddedKeystore.open(tmp_path / "ks")
        yield ks
        ks.close()
    else:
        with SwtpmProcess() as tpm:
            ks = TpmKeystore(tpm.tcti)
            yield ks
            ks.close()


def test_backends_honour_the_same_contract(any_store):
    """The same calls, with the same outcomes, on both backends: the runtime need not know which it has."""
    assert any_store.backend in ("embedded", "tpm")
    chain = chain_of(MEASURED)
    blob = any_store.seal(b"params", chain=chain, label="bundle-1")
    assert any_store.extend(MEASURED) == chain
    assert any_store.unseal(blob, label="bundle-1") == b"params"
    with pytest.raises(KeystoreError, match="unseal refused"):
        any_store.unseal(blob, label="bundle-2")
    with pytest.raises(KeystoreError, match="unseal refused.*truncated"):
        any_store.unseal(blob[:20], label="bundle-1")
    assert any_store.extend(CHANGED) == chain_of(CHANGED)
    with pytest.raises(KeystoreError, match="unseal refused"):
        any_store.unseal(blob, label="bundle-1")
    ev = any_store.quote(NONCE)
    assert ev.chain == chain_of(CHANGED) and ev.public_key == any_store.attestation_public_key()
    assert NONCE in ev.quoted


def test_blobs_do_not_cross_backends(store, tmp_path):
    init_keystore(tmp_path / "ks")
    embedded = EmbeddedKeystore.open(tmp_path / "ks")
    chain = chain_of(MEASURED)
    store.extend(MEASURED)
    embedded.extend(MEASURED)
    with pytest.raises(KeystoreError, match="unseal refused: not a sealnet TPM-sealed blob"):
        store.unseal(embedded.seal(b"x", chain=chain, label="b"), label="b")
    with pytest.raises(KeystoreError, match="unseal refused"):
        embedded.unseal(store.seal(b"x", chain=chain, label="b"), label="b")
