import json
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealnet.bundle import MANIFEST, SECRETS, BundleError, load_bundle, sign_manifest
from sealnet.enclave_sim.keystore import KeystoreError
from sealnet.enclave_sim.service import TrustedModule
from sealnet.export.build_engine import ExportError, build_bundle, tensorrt_available


def test_bundle_contents_and_recorded_checks(artefacts):
    bundle = load_bundle(artefacts["bundle"])
    m = bundle.manifest
    assert set(m["files"]) == {"public.onnx"} and set(m["sealed"]) == {SECRETS}
    assert m["checks"]["onnx_max_abs_diff"] < 1e-4
    assert m["checks"]["public_raw_acc"] <= 0.2
    assert m["checks"]["authorized_acc"] == pytest.approx(artefacts["checkpoint"].metrics["authorized_acc"], abs=0.01)
    assert m["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    # no transform parameter appears in clear anywhere in the bundle
    generator_weights = artefacts["checkpoint"].secret["state"]["conv.weight"].numpy().astype(np.float32).tobytes()
    for path in artefacts["bundle"].iterdir():
        assert generator_weights[:64] not in path.read_bytes(), path.name


def test_tampered_manifest_is_refused(bundle_copy):
    path = bundle_copy / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["model_id"] = "renamed"
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="signature does not verify"):
        load_bundle(bundle_copy)


def test_tampered_sealed_file_is_refused(bundle_copy, artefacts):
    blob = bytearray((bundle_copy / SECRETS).read_bytes())
    blob[-5] ^= 0x01
    (bundle_copy / SECRETS).write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="secrets.sealed does not match its sha256"):
        load_bundle(bundle_copy)
    # even with a manifest re-signed by the owner, the keystore refuses the flipped blob
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    from sealnet.bundle import sha256_file

    manifest["sealed"][SECRETS] = sha256_file(bundle_copy / SECRETS)
    (bundle_copy / MANIFEST).write_text(json.dumps(sign_manifest(manifest, artefacts["owner_key"])))
    with pytest.raises(KeystoreError, match="unseal refused"):
        TrustedModule(load_bundle(bundle_copy), artefacts["keystore"].open())


def test_changed_measurement_is_refused(bundle_copy, artefacts):
    """A manifest whose measured core changed (even re-signed by the owner) no longer unseals the secrets."""
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["max_batch"] = 7
    (bundle_copy / MANIFEST).write_text(json.dumps(sign_manifest(manifest, artefacts["owner_key"])))
    with pytest.raises(KeystoreError, match="unseal refused"):
        TrustedModule(load_bundle(bundle_copy), artefacts["keystore"].open())


def test_swapped_owner_key_is_refused(bundle_copy, artefacts):
    """An attacker who re-signs the manifest with a key of their own cannot unseal: the key is measured."""
    from sealnet.bundle import owner_key_field

    attacker = Ed25519PrivateKey.generate()
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["owner_public_key"] = owner_key_field(attacker)
    (bundle_copy / MANIFEST).write_text(json.dumps(sign_manifest(manifest, attacker)))
    with pytest.raises(KeystoreError, match="unseal refused"):
        TrustedModule(load_bundle(bundle_copy), artefacts["keystore"].open())


def test_export_refuses_a_public_network_that_works_on_raw_inputs(tmp_path, artefacts):
    with pytest.raises(ExportError, match="max-raw-acc"):
        build_bundle(
            artefacts["checkpoint_path"],
            tmp_path / "b",
            owner_key=artefacts["owner_key_path"],
            keystore=artefacts["keystore"],
            max_raw_acc=0.0,
            log=lambda *_: None,
        )
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".sealnet-export-*"))


def test_export_refuses_a_model_useless_even_with_its_secret(tmp_path, artefacts):
    """A collapsed training run (constant outputs) passes the raw-input gate; it must not ship."""
    from dataclasses import replace

    import torch

    from sealnet.protect.checkpoint import save_checkpoint

    ckpt = artefacts["checkpoint"]
    dead = replace(ckpt, public_state={k: torch.zeros_like(v) for k, v in ckpt.public_state.items()})
    save_checkpoint(dead, tmp_path / "dead.pt")
    with pytest.raises(ExportError, match="even with its secret"):
        build_bundle(tmp_path / "dead.pt", tmp_path / "b", owner_key=artefacts["owner_key_path"],
                     keystore=artefacts["keystore"], log=lambda *_: None)
    assert not (tmp_path / "b").exists()


def test_export_refuses_to_overwrite_without_force(tmp_path, artefacts):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--force"):
        build_bundle(
            artefacts["checkpoint_path"],
            tmp_path / "b",
            owner_key=artefacts["owner_key_path"],
            keystore=artefacts["keystore"],
            log=lambda *_: None,
        )
    assert (tmp_path / "b" / "keep.txt").exists()


@pytest.mark.skipif(tensorrt_available() is None, reason="TensorRT and a GPU are present: covered by the GPU test")
def test_tensorrt_without_tensorrt_stops_with_a_clear_message(tmp_path, artefacts):
    with pytest.raises(ExportError, match="cannot build a TensorRT engine here"):
        build_bundle(
            artefacts["checkpoint_path"],
            tmp_path / "b",
            owner_key=artefacts["owner_key_path"],
            keystore=artefacts["keystore"],
            tensorrt=True,
        )
    assert not (tmp_path / "b").exists()


def test_build_engine_script_runs_as_documented(tmp_path, artefacts):
    out = tmp_path / "bundle"
    command = [sys.executable, "-m", "sealnet.export.build_engine", str(artefacts["checkpoint_path"]), str(out),
               "--owner-key", str(artefacts["owner_key_path"]), "--keystore-dir", str(artefacts["keystore"].directory)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load_bundle(out).model_id == "simple_cnn-generator"
    proc = subprocess.run([*command, "--tensorrt"], capture_output=True, text=True, timeout=300)
    if tensorrt_available() is not None:
        assert proc.returncode == 2 and "TensorRT" in proc.stderr
