"""The TPM backend end to end: export sealed to a software TPM, trusted module on it, runtime attesting it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sealnet.enclave_sim.swtpm import SwtpmProcess, swtpm_unavailable

reason = swtpm_unavailable()
if reason:
    pytest.skip(f"TPM backend not testable here: {reason}", allow_module_level=True)

from sealnet.bundle import MANIFEST, load_bundle, sign_manifest  # noqa: E402
from sealnet.deployment import LocalDeployment  # noqa: E402
from sealnet.enclave_sim import service as enclave_service  # noqa: E402
from sealnet.enclave_sim.keystore import KeystoreError  # noqa: E402
from sealnet.enclave_sim.keystore_spec import KeystoreSpec  # noqa: E402
from sealnet.export.build_engine import build_bundle  # noqa: E402
from sealnet.licenses import issue_license  # noqa: E402
from sealnet.runtime.enclave_client import EnclaveClient  # noqa: E402


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    with SwtpmProcess(tmp_path_factory.mktemp("swtpm")) as proc:
        yield proc


def test_tpm_bundle_serves_attests_and_refuses_changes(tpm, artefacts, tmp_path, short_tmp, digits):
    spec = KeystoreSpec("tpm", tcti=tpm.tcti)
    manifest = build_bundle(artefacts["checkpoint_path"], tmp_path / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=spec, model_id="tpm-model", log=lambda *_: None)
    expected = json.loads((tmp_path / "bundle" / "expected-measurements.json").read_text())
    assert expected["backend"] == "tpm"
    addr = f"unix:{short_tmp / 'tpm.sock'}"
    with LocalDeployment(tmp_path / "bundle", keystore=spec, enclave_address=addr):
        token = issue_license(artefacts["owner_key"], customer_id="c", model_id=manifest["model_id"],
                              serial_number="s", valid_seconds=60)
        client = EnclaveClient(addr)
        processed = client.preprocess(token, digits.x_test[:8])
        ckpt = artefacts["checkpoint"]
        import torch

        with torch.no_grad():
            assert np.allclose(processed, ckpt.build_transform()(torch.from_numpy(digits.x_test[:8])).numpy(),
                               atol=1e-6)
        att = client.attest(b"n" * 32)
        assert att.format == "tpm2-quote-v1"
        client.close()
    # a changed measurement (manifest re-signed by the owner) no longer unseals on the TPM either
    manifest = json.loads((tmp_path / "bundle" / MANIFEST).read_text())
    manifest["max_batch"] = 3
    (tmp_path / "bundle" / MANIFEST).write_text(json.dumps(sign_manifest(manifest, artefacts["owner_key"])))
    store = spec.open()
    try:
        with pytest.raises(KeystoreError, match="unseal refused"):
            enclave_service.TrustedModule(load_bundle(tmp_path / "bundle"), store)
    finally:
        store.close()
