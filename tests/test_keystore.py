import os
import random

import pytest

from sealnet.enclave_sim.keystore import EmbeddedKeystore, KeystoreError, init_keystore
from sealnet.enclave_sim.measure import measurement_chain
from sealnet.evidence import Measurement, chain_of


@pytest.fixture
def store(tmp_path):
    init_keystore(tmp_path / "ks")
    return EmbeddedKeystore.open(tmp_path / "ks")


MEASURED = [Measurement("code:a.py", b"\x01" * 32), Measurement("bundle:manifest", b"\x02" * 32)]


def test_seal_round_trip_and_binding(store, tmp_path):
    chain = chain_of(MEASURED)
    blob = store.seal(b"secret parameters", chain=chain, label="bundle-1")
    assert b"secret parameters" not in blob
    assert store.extend(MEASURED) == chain
    assert store.unseal(blob, label="bundle-1") == b"secret parameters"
    with pytest.raises(KeystoreError, match="unseal refused"):
        store.unseal(blob, label="bundle-2")
    store.extend(MEASURED[:1] + [Measurement("bundle:manifest", b"\x03" * 32)])
    with pytest.raises(KeystoreError, match="unseal refused"):
        store.unseal(blob, label="bundle-1")
    init_keystore(tmp_path / "other")
    foreign = EmbeddedKeystore.open(tmp_path / "other")
    foreign.extend(MEASURED)
    with pytest.raises(KeystoreError, match="unseal refused"):
        foreign.unseal(blob, label="bundle-1")


def test_every_sampled_bit_flip_is_rejected(store):
    blob = store.seal(os.urandom(300), chain=store.extend(MEASURED), label="b")
    rng = random.Random(0)
    positions = rng.sample(range(len(blob) * 8), 200)
    for bit in positions:
        tampered = bytearray(blob)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(KeystoreError):
            store.unseal(bytes(tampered), label="b")
    with pytest.raises(KeystoreError, match="truncated"):
        store.unseal(blob[:20], label="b")


def test_root_key_file_rules(tmp_path):
    path = init_keystore(tmp_path / "ks")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        init_keystore(tmp_path / "ks")
    os.chmod(path, 0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        EmbeddedKeystore.open(tmp_path / "ks")
    with pytest.raises(KeystoreError, match="sealnet keystore init"):
        EmbeddedKeystore.open(tmp_path / "missing")


def test_root_key_from_environment(monkeypatch):
    monkeypatch.setenv("SEALNET_ROOT_KEY", "11" * 32)
    a = EmbeddedKeystore.open(None)
    assert a.unseal(a.seal(b"x", chain=bytes(32), label="l"), label="l") == b"x"  # nothing extended yet
    monkeypatch.setenv("SEALNET_ROOT_KEY", "zz")
    with pytest.raises(KeystoreError, match="64 hex digits"):
        EmbeddedKeystore.open(None)


def test_chain_covers_code_interpreter_distributions_and_manifest(tmp_path):
    items, chain = measurement_chain(b"\x01" * 32)
    names = [i.name for i in items]
    assert names[-1] == "bundle:manifest" and "code:sealnet/enclave_sim/service.py" in names
    assert "code:sealnet/_grpc/enclave_pb2.py" in names and "code:sealnet/__init__.py" in names
    assert any(n.startswith("python:cpython-") for n in names)
    for dist in ("grpcio", "cryptography", "protobuf", "numpy", "onnxruntime"):
        assert any(n.startswith(f"dist:{dist}==") for n in names), dist
    assert not any(n.startswith(tuple(f"code:sealnet/{stage}/" for stage in ("runtime", "protect", "export", "cli")))
                   for n in names)
    assert measurement_chain(b"\x02" * 32)[1] != chain
    # a copy of the trusted code with one changed byte measures differently
    import shutil

    from sealnet.enclave_sim.measure import _ROOT, import_closure

    for rel in import_closure()[0]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_ROOT / rel, tmp_path / rel)
    assert measurement_chain(b"\x01" * 32, root=tmp_path)[1] == chain
    with open(tmp_path / "sealnet/enclave_sim/secrets/transform.py", "a") as f:
        f.write("\n# changed\n")
    assert measurement_chain(b"\x01" * 32, root=tmp_path)[1] != chain
    # a file that the module's code starts to import is measured without editing any list
    (tmp_path / "sealnet/extra.py").write_text("X = 1\n")
    with open(tmp_path / "sealnet/enclave_sim/policy.py", "a") as f:
        f.write("\n\ndef _lazy():\n    from sealnet.extra import X\n\n    return X\n")
    assert "code:sealnet/extra.py" in [m.name for m in measurement_chain(b"\x01" * 32, root=tmp_path)[0]]


def test_quote_signs_the_chain_over_the_nonce(store):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    chain = store.extend(MEASURED)
    ev = store.quote(b"n" * 32)
    assert ev.chain == chain and ev.quoted.endswith(b"n" * 32 + chain)
    Ed25519PublicKey.from_public_bytes(store.attestation_public_key()).verify(ev.signature, ev.quoted)
