"""Deep Serial Number through the deployment path: the trusted module stamps inputs only for the student's own
customer and serial number; stock tritonclient over real sockets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from sealnet.licenses import issue_license
from sealnet.stamp import StampSpec
from tests.conftest import DSN_MODEL_ID as MODEL_ID
from tests.conftest import kserve_infer, serving


@pytest.fixture(scope="module")
def dsn(dsn_student):
    return dsn_student


@pytest.fixture
def stack(dsn, artefacts, short_tmp):
    with serving(dsn["bundle"], artefacts["keystore"], short_tmp) as services:
        yield services["client"]


def _infer(client, x: np.ndarray, token: str) -> np.ndarray:
    return kserve_infer(client, MODEL_ID, x, token).as_numpy("logits")


def _license(artefacts, customer_id: str, serial_number: str) -> str:
    return issue_license(artefacts["owner_key"], customer_id=customer_id, model_id=MODEL_ID,
                         serial_number=serial_number, valid_seconds=600)


def test_export_records_the_serial_number_and_gates_raw_accuracy(dsn):
    manifest = dsn["manifest"]
    assert manifest["method"] == "dsn" and manifest["customer_id"] == "acme"
    assert manifest["serial_number"] == dsn["serial_number"]
    assert "pattern" not in str(manifest)  # the stamp itself never leaves the sealed part
    assert manifest["checks"]["public_raw_acc"] <= 0.2
    assert manifest["checks"]["authorized_acc"] > 0.8


def test_own_license_gets_the_torch_accuracy(stack, dsn, artefacts, digits):
    token = _license(artefacts, "acme", dsn["serial_number"])
    x = digits.x_test
    logits = np.concatenate([_infer(stack, x[i : i + 100], token) for i in range(0, len(x), 100)])
    spec = StampSpec.from_secret(dsn["ckpt"].secret)
    with torch.no_grad():
        want = dsn["ckpt"].build_public_model()(torch.from_numpy(spec.apply(digits.x_test))).numpy()
    assert np.abs(logits - want).max() < 1e-3
    assert float((logits.argmax(1) == digits.y_test).mean()) == pytest.approx(dsn["ckpt"].metrics["student_sn_acc"],
                                                                              abs=0.002)


@pytest.mark.parametrize(("customer", "serial"), [("other", None), ("acme", "DSN-0000000000000000"),
                                                  ("other", "DSN-0000000000000000")])
def test_another_customers_license_is_rejected(stack, dsn, artefacts, digits, customer, serial):
    token = _license(artefacts, customer, serial or dsn["serial_number"])
    with pytest.raises(InferenceServerException) as err:
        _infer(stack, digits.x_test[:4], token)
    assert err.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "serial number" in err.value.message()
