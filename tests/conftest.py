"""Shared fixtures: a tiny Generator-protected model on the 8x8 digits, exported once per test session."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealnet.data import digits_tiny
from sealnet.enclave_sim.keystore import init_keystore
from sealnet.enclave_sim.keystore_spec import KeystoreSpec
from sealnet.export.build_engine import build_bundle
from sealnet.licenses import load_owner_key, write_key_pair
from sealnet.protect.pipeline import protect_transform
from sealnet.protect.train import TrainConfig

TINY = {"hidden": 128}
TINY_TRAIN = TrainConfig(epochs=10, batch_size=64, lr=2e-3, seed=0, progress=False)
MODEL_ID = "digits-generator"


# A fixed owner key keeps the session reproducible: DSN stamps are derived from the owner's signature, and how
# much of a tiny 8x8 student the stamp-agnostic attacks recover varies from stamp to stamp.
OWNER_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"sealnet tests: session owner key").digest())


@pytest.fixture(scope="session")
def digits():
    return digits_tiny()


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory, digits):
    """Checkpoint, owner key, keystore and bundle of a tiny Generator-protected CNN."""
    root = tmp_path_factory.mktemp("artefacts")
    ckpt = protect_transform(digits, "generator", root / "protected.pt", TINY_TRAIN, model_config=TINY)
    key_path, pub_path = root / "owner.key", root / "owner.key.pub"
    write_key_pair(OWNER_KEY, key_path, pub_path)
    init_keystore(root / "keystore")
    manifest = build_bundle(
        root / "protected.pt",
        root / "bundle",
        owner_key=key_path,
        keystore=KeystoreSpec("embedded", root / "keystore"),
        model_id=MODEL_ID,
        log=lambda *_: None,
    )
    return {
        "root": root,
        "checkpoint": ckpt,
        "checkpoint_path": root / "protected.pt",
        "owner_key_path": key_path,
        "owner_pub_path": pub_path,
        "owner_key": load_owner_key(key_path),
        "keystore": KeystoreSpec("embedded", root / "keystore"),
        "bundle": root / "bundle",
        "manifest": manifest,
    }


PASSPORT_WIDTHS = {"widths": [8, 16, 32, 32, 64]}  # capacity 128 bits on 8x8 digits
PASSPORT_TRAIN = TrainConfig(epochs=15, batch_size=64, lr=3e-3, seed=0, progress=False)
PASSPORT_SIGNATURE = "tiny-sig"  # 64 bits
PASSPORT_MODEL_ID = "digits-passport"
DSN_MODEL_ID = "digits-dsn"
DSN_TRAIN = TrainConfig(epochs=30, batch_size=64, lr=2e-3, seed=0, progress=False)
DSN_TEACHER_TRAIN = TrainConfig(epochs=20, batch_size=64, lr=2e-3, seed=0, progress=False)


@pytest.fixture(scope="session")
def passport_v1(tmp_path_factory, digits):
    """A tiny V1 passport CNN (random passports) and its plain baseline, trained once per test session."""
    from sealnet.protect.passport_train import PassportConfig, default_passport_path, protect_passport

    root = tmp_path_factory.mktemp("passport")
    ckpt = protect_passport(digits, root / "v1.pt", PASSPORT_TRAIN,
                            PassportConfig(scheme="v1", signature=PASSPORT_SIGNATURE), model_config=PASSPORT_WIDTHS)
    return {"ckpt": ckpt, "path": root / "v1.pt", "passport_path": default_passport_path(root / "v1.pt")}


@pytest.fixture(scope="session")
def passport_bundle(tmp_path_factory, passport_v1, artefacts):
    """The V1 passport model exported with the session's owner key and keystore."""
    root = tmp_path_factory.mktemp("passport-bundle")
    manifest = build_bundle(passport_v1["path"], root / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], model_id=PASSPORT_MODEL_ID, log=lambda *_: None)
    return {"bundle": root / "bundle", "manifest": manifest}


@pytest.fixture(scope="session")
def dsn_student(tmp_path_factory, digits, artefacts):
    """A tiny DSN student for customer "acme", exported with the session's owner key and keystore."""
    from sealnet.protect.serial import protect_dsn
    from sealnet.serial import SerialRecord, license_serial_number

    root = tmp_path_factory.mktemp("dsn")
    record = SerialRecord("sealnet-tests", DSN_MODEL_ID, 1_700_000_000, "acme")
    ckpt = protect_dsn(digits, root / "student.pt", DSN_TRAIN, artefacts["owner_key"], record,
                       teacher_path=root / "teacher.pt", teacher_cfg=DSN_TEACHER_TRAIN, model_config={"hidden": 128})
    manifest = build_bundle(root / "student.pt", root / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], model_id=DSN_MODEL_ID, log=lambda *_: None)
    return {"ckpt": ckpt, "path": root / "student.pt", "teacher": root / "teacher.pt", "root": root,
            "bundle": root / "bundle", "manifest": manifest,
            "serial_number": license_serial_number(ckpt.secret["commitment"])}


SEALED_HEAD_MODEL_ID = "digits-sealed-head"
SEALED_HEAD_BACKBONE = {"widths": [16, 32], "tap_grid": [2, 2]}  # 1x8x8 digits: stage maps 4x4 and 2x2


@pytest.fixture(scope="session")
def sealed_head(tmp_path_factory, digits, artefacts):
    """A tiny sealed-head model (seeded random public backbone, head trained on the digits), its teacher and
    its bundle (default `label` policy), exported with the session's owner key and keystore."""
    from sealnet.protect.backbones import make_public_backbone
    from sealnet.protect.checkpoint import save_checkpoint
    from sealnet.protect.sealed_head import SealedHeadConfig, protect_sealed_head
    from sealnet.protect.train import train_new_model

    root = tmp_path_factory.mktemp("sealed-head")
    weights = make_public_backbone("tap_cnn", 0, root / "backbone.pt", kind="random", input_shape=(1, 8, 8),
                                   model_config=SEALED_HEAD_BACKBONE)
    teacher, _ = train_new_model(digits, TINY_TRAIN, "simple_cnn", TINY)
    cfg = SealedHeadConfig(hidden=(64,), epochs=30, batch_size=64, lr=3e-3, max_flops_ratio=10.0, max_drop=0.1)
    ckpt = protect_sealed_head(digits, weights, "tap_cnn", cfg, teacher=teacher, progress=False,
                               model_config=SEALED_HEAD_BACKBONE, log=lambda _: None)
    save_checkpoint(ckpt, root / "sealed.pt")
    manifest = build_bundle(root / "sealed.pt", root / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], model_id=SEALED_HEAD_MODEL_ID, log=lambda *_: None)
    return {"root": root, "ckpt": ckpt, "path": root / "sealed.pt", "weights": weights, "teacher": teacher,
            "bundle": root / "bundle", "manifest": manifest}


@pytest.fixture
def bundle_copy(tmp_path, artefacts):
    """A private copy of the session bundle that a test may tamper with."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(artefacts["bundle"], dst)
    return dst


@contextlib.contextmanager
def serving(bundle: Path, keystore, sock_dir: Path) -> Iterator[dict]:
    """The trusted module on a Unix socket in `sock_dir` and the runtime on loopback TCP for `bundle` (a
    LocalDeployment in this process), with a stock tritonclient; everything is stopped on exit."""
    import tritonclient.grpc as triton

    from sealnet.deployment import LocalDeployment

    with LocalDeployment(bundle, keystore=keystore, enclave_address=f"unix:{sock_dir / 'enclave.sock'}") as d:
        client = triton.InferenceServerClient(url=d.endpoint)
        try:
            yield {"client": client, "enclave": d.enclave_server, "module": d.module, "enclave_addr": d.enclave,
                   "socket": sock_dir / "enclave.sock", "service": d.service, "deployment": d}
        finally:
            client.close()


def kserve_infer(client, model_id: str, x, token: str | None, name: str = "input", datatype: str = "FP32"):
    """One KServe v2 request through tritonclient, with the license header when a token is given."""
    import tritonclient.grpc as triton

    inp = triton.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return client.infer(model_id, [inp], headers={"sealnet-license": token} if token else None)


@pytest.fixture
def short_tmp():
    """A short directory for Unix sockets (paths are limited to ~100 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sn-", dir="/tmp") as d:
        os.chmod(d, 0o700)
        yield Path(d)
