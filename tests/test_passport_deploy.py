"""Scheme V1 through the deployment path: export with zero gamma/beta, the trusted module's PassportParams,
the runtime's session built with them, queried by a stock tritonclient on real sockets."""

from __future__ import annotations

import grpc
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tritonclient.utils import InferenceServerException

from sealnet._grpc import enclave_pb2, enclave_pb2_grpc
from sealnet.bundle import PUBLIC_ONNX
from sealnet.deployment import LocalDeployment
from sealnet.enclave_sim.secrets.passport import derive_params, mean_conv_response
from sealnet.export import ExportError
from sealnet.export.build_engine import build_bundle
from sealnet.licenses import issue_license
from sealnet.protect.passport import compute_params, passport_layers
from tests.conftest import PASSPORT_MODEL_ID as MODEL_ID
from tests.conftest import kserve_infer, serving


@pytest.fixture
def stack(passport_bundle, artefacts, short_tmp):
    with serving(passport_bundle["bundle"], artefacts["keystore"], short_tmp) as services:
        yield services


def _license(artefacts, model_id: str = MODEL_ID) -> str:
    return issue_license(artefacts["owner_key"], customer_id="acme", model_id=model_id, serial_number="SN-1",
                         valid_seconds=600)


def _infer(client, x: np.ndarray, token: str | None) -> np.ndarray:
    return kserve_infer(client, MODEL_ID, x, token).as_numpy("logits")


def test_export_ships_zero_gamma_beta_and_records_the_checks(passport_bundle, passport_v1):
    manifest = passport_bundle["manifest"]
    assert manifest["method"] == "passport" and manifest["scheme"] == "v1"
    names = manifest["passport_params"]
    assert names == ["gamma_0", "beta_0", "gamma_1", "beta_1", "gamma_2", "beta_2"]
    model = onnx.load(str(passport_bundle["bundle"] / PUBLIC_ONNX))
    shipped = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in names}
    assert set(shipped) == set(names) and all(not v.any() for v in shipped.values())
    assert [i.name for i in model.graph.input] == ["input"]
    checks = manifest["checks"]
    assert checks["public_raw_acc"] <= 0.2 and checks["public_unit_params_acc"] <= 0.2
    assert checks["authorized_acc"] == pytest.approx(passport_v1["ckpt"].metrics["valid_acc"], abs=0.005)


def test_trusted_module_derives_the_same_gamma_beta_as_torch(passport_v1):
    model = passport_v1["ckpt"].build_passport_model()
    want = compute_params(model)
    from sealnet.protect.methods.passport import _layer_spec

    arrays: dict[str, np.ndarray] = {}
    passports = passport_v1["ckpt"].secret["passports"]
    layers = passport_layers(model)
    specs = [_layer_spec(n, layer, i, arrays, passports[n]) for i, (n, layer) in enumerate(layers.items())]
    got = derive_params({"layers": specs}, arrays)
    for i, name in enumerate(passport_layers(model)):
        for j, key in enumerate(("gamma", "beta")):
            np.testing.assert_allclose(got[f"{key}_{i}"], want[name][j].detach().numpy(), atol=1e-5)


def test_mean_conv_response_with_stride_and_padding():
    rng = np.random.default_rng(0)
    p, w = rng.normal(size=(3, 7, 7)).astype(np.float32), rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    for stride, padding in ((1, 1), (2, 0), (2, 1)):
        want = torch.nn.functional.conv2d(torch.from_numpy(p)[None], torch.from_numpy(w), stride=stride,
                                          padding=padding).mean(dim=(2, 3))[0].numpy()
        np.testing.assert_allclose(mean_conv_response(p, w, [stride] * 2, [padding] * 2), want, atol=1e-5)


def test_deployed_accuracy_equals_torch(stack, artefacts, passport_v1, digits):
    client = stack["client"]
    assert client.is_server_ready()
    token = _license(artefacts)
    logits = np.concatenate([_infer(client, digits.x_test[i : i + 64], token)
                             for i in range(0, len(digits.x_test), 64)])
    with torch.no_grad():
        want = passport_v1["ckpt"].build_passport_model()(torch.from_numpy(digits.x_test)).numpy()
    assert np.abs(logits - want).max() < 1e-3
    grpc_acc = float((logits.argmax(1) == digits.y_test).mean())
    assert grpc_acc == pytest.approx(passport_v1["ckpt"].metrics["valid_acc"], abs=0.002)


def test_no_or_wrong_license_gets_no_answer(stack, artefacts, digits):
    x = digits.x_test[:4]
    with pytest.raises(InferenceServerException) as err:
        _infer(stack["client"], x, None)
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as err:
        _infer(stack["client"], x, _license(artefacts, model_id="another-model"))
    assert err.value.status() == "StatusCode.PERMISSION_DENIED"


def test_runtime_fails_closed_without_the_trusted_module(stack, artefacts, digits):
    token = _license(artefacts)
    _infer(stack["client"], digits.x_test[:4], token)  # the runtime now holds gamma/beta
    stack["enclave"].stop(0)
    with pytest.raises(InferenceServerException) as err:
        _infer(stack["client"], digits.x_test[:4], token)
    assert err.value.status() == "StatusCode.UNAVAILABLE"


def test_passport_params_rpc_checks_its_arguments(stack, artefacts):
    with grpc.insecure_channel(stack["enclave_addr"]) as channel:
        stub = enclave_pb2_grpc.TrustedModuleStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.PassportParams(enclave_pb2.PassportParamsRequest(session_id="nope", items=1))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "session_id" in err.value.details()
        sid = stub.OpenSession(enclave_pb2.OpenSessionRequest(license=_license(artefacts))).session_id
        with pytest.raises(grpc.RpcError) as err:
            stub.PassportParams(enclave_pb2.PassportParamsRequest(session_id=sid, items=0))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "items" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Preprocess(enclave_pb2.PreprocessRequest(session_id=sid))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "PassportParams" in err.value.details()
        reply = stub.PassportParams(enclave_pb2.PassportParamsRequest(session_id=sid, items=8))
        assert [p.name for p in reply.params] == ["gamma_0", "beta_0", "gamma_1", "beta_1", "gamma_2", "beta_2"]


def test_transform_bundle_refuses_passport_params(artefacts, short_tmp):
    addr = f"unix:{short_tmp / 'enclave.sock'}"
    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"], runtime=False, enclave_address=addr):
        with grpc.insecure_channel(addr) as channel:
            stub = enclave_pb2_grpc.TrustedModuleStub(channel)
            with pytest.raises(grpc.RpcError) as err:  # no session: nothing is said about the bundle
                stub.PassportParams(enclave_pb2.PassportParamsRequest(session_id="x", items=1))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            sid = stub.OpenSession(enclave_pb2.OpenSessionRequest(license=_license(artefacts, "digits-generator")))
            with pytest.raises(grpc.RpcError) as err:
                stub.PassportParams(enclave_pb2.PassportParamsRequest(session_id=sid.session_id, items=1))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_v2_is_not_exported(tmp_path, digits, artefacts):
    from sealnet.protect.passport_train import PassportConfig, protect_passport
    from sealnet.protect.train import TrainConfig
    from tests.conftest import PASSPORT_WIDTHS

    cfg = TrainConfig(epochs=1, batch_size=64, lr=3e-3, seed=0, progress=False)
    protect_passport(digits, tmp_path / "v2.pt", cfg, PassportConfig(scheme="v2", signature="s"),
                     model_config=PASSPORT_WIDTHS, baseline=False)
    with pytest.raises(ExportError, match="scheme 'v2'"):
        build_bundle(tmp_path / "v2.pt", tmp_path / "bundle", owner_key=artefacts["owner_key_path"],
                     keystore=artefacts["keystore"], log=lambda *_: None)
    assert not (tmp_path / "bundle").exists()


def test_verify_a_deployed_bundle(passport_bundle, passport_v1, tmp_path):
    from sealnet.cli import main
    from tests.conftest import PASSPORT_SIGNATURE

    base = ["verify", "--bundle", str(passport_bundle["bundle"]), "--passport", str(passport_v1["passport_path"]),
            "--dataset", "digits"]
    assert main([*base, "--signature", PASSPORT_SIGNATURE, "--json", str(tmp_path / "v.json")]) == 0
    import json

    res = json.loads((tmp_path / "v.json").read_text())
    assert res["signature_match"] and res["accuracy"] == pytest.approx(passport_v1["ckpt"].metrics["valid_acc"])
    assert main([*base, "--signature", "tiny-sih"]) == 1  # one bit off
    from sealnet.protect.passport import random_passports
    from sealnet.protect.passport_train import load_passport_file, save_passport_file

    secret = load_passport_file(passport_v1["passport_path"])
    model = passport_v1["ckpt"].build_public_model()
    secret["passports"] = random_passports(model, torch.Generator().manual_seed(3))
    fake = save_passport_file(secret, tmp_path / "fake.passport.pt")
    assert main(["verify", "--bundle", str(passport_bundle["bundle"]), "--passport", str(fake), "--dataset", "digits",
                 "--signature", PASSPORT_SIGNATURE]) == 1
