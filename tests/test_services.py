"""Both services on real sockets (trusted module on a Unix socket, runtime on loopback TCP), queried by a
stock tritonclient and by the raw stubs."""

from __future__ import annotations

import os
import stat
import time

import grpc
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tritonclient.utils import InferenceServerException

from sealnet._grpc import enclave_pb2, enclave_pb2_grpc
from sealnet.evidence import EMBEDDED_QUOTE_CONTEXT
from sealnet.licenses import issue_license
from sealnet.runtime import server as runtime_server
from sealnet.runtime.enclave_client import EnclaveClient
from tests.conftest import MODEL_ID, kserve_infer, serving


@pytest.fixture
def stack(artefacts, short_tmp):
    """Trusted module + runtime, torn down after the test."""
    with serving(artefacts["bundle"], artefacts["keystore"], short_tmp) as services:
        yield services


def _license(artefacts, **kw) -> str:
    args = {"customer_id": "acme", "model_id": MODEL_ID, "serial_number": "SN-1", "valid_seconds": 600} | kw
    return issue_license(artefacts["owner_key"], **args)


def _infer(client, x: np.ndarray, token: str | None, name: str = "input", datatype: str = "FP32"):
    return kserve_infer(client, MODEL_ID, x, token, name, datatype)


def test_tritonclient_gets_the_authorized_accuracy(stack, artefacts, digits):
    client = stack["client"]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_ID)
    meta = client.get_model_metadata(MODEL_ID)
    assert meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, 1, 8, 8]
    token = _license(artefacts)
    logits = np.concatenate([_infer(client, digits.x_test[i : i + 64], token).as_numpy("logits")
                             for i in range(0, len(digits.x_test), 64)])
    grpc_acc = float((logits.argmax(1) == digits.y_test).mean())
    ckpt = artefacts["checkpoint"]
    model, transform = ckpt.build_public_model(), ckpt.build_transform()
    with torch.no_grad():
        torch_logits = model(transform(torch.from_numpy(digits.x_test))).numpy()
    assert np.abs(logits - torch_logits).max() < 1e-3
    assert grpc_acc == pytest.approx(ckpt.metrics["authorized_acc"], abs=0.005)
    assert grpc_acc > 0.85


@pytest.mark.parametrize(
    ("kwargs", "code", "text"),
    [
        ({"token": None}, "StatusCode.UNAUTHENTICATED", "sealnet-license"),
        ({"name": "image"}, "StatusCode.INVALID_ARGUMENT", "inputs[0].name"),
        ({"datatype": "FP64"}, "StatusCode.INVALID_ARGUMENT", "inputs[0].datatype"),
        ({"x": np.zeros((2, 1, 9, 8), np.float32)}, "StatusCode.INVALID_ARGUMENT", "inputs[0].shape"),
        ({"x": np.zeros((2000, 1, 8, 8), np.float32)}, "StatusCode.INVALID_ARGUMENT", "batch size"),
        ({"x": np.full((1, 1, 8, 8), np.nan, np.float32)}, "StatusCode.INVALID_ARGUMENT", "NaN"),
    ],
)
def test_bad_requests_get_a_status_naming_the_problem(stack, artefacts, kwargs, code, text):
    x = kwargs.pop("x", np.zeros((2, 1, 8, 8), np.float32))
    token = kwargs.pop("token", _license(artefacts))
    if kwargs.get("datatype") == "FP64":
        x = x.astype(np.float64)
    with pytest.raises(InferenceServerException) as err:
        _infer(stack["client"], x, token, **kwargs)
    assert err.value.status() == code
    assert text in err.value.message()


def test_raw_byte_count_mismatch_is_refused(stack, artefacts):
    stub = runtime_server.inference_pb2_grpc.GRPCInferenceServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{stack['service'].port}"))
    req = runtime_server.inference_pb2.ModelInferRequest(model_name=MODEL_ID)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    req.raw_input_contents.append(b"\x00" * 10)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, metadata=[("sealnet-license", _license(artefacts))], timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents[0]" in err.value.details()
    req.model_name = "other"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model_name" in err.value.details()


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"model_id": "another-model"}, "is for model 'another-model'"),
        ({"not_before": int(time.time()) - 1000}, "expired"),
    ],
)
def test_wrong_or_expired_license_is_permission_denied(stack, artefacts, kwargs, text):
    with pytest.raises(InferenceServerException) as err:
        _infer(stack["client"], np.zeros((1, 1, 8, 8), np.float32), _license(artefacts, **kwargs))
    assert err.value.status() == "StatusCode.PERMISSION_DENIED" and text in err.value.message()


def test_license_signed_by_another_key_is_refused(stack, artefacts):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    forged = issue_license(Ed25519PrivateKey.generate(), customer_id="acme", model_id=MODEL_ID,
                           serial_number="SN-1", valid_seconds=600)
    with pytest.raises(InferenceServerException) as err:
        _infer(stack["client"], np.zeros((1, 1, 8, 8), np.float32), forged)
    assert err.value.status() == "StatusCode.PERMISSION_DENIED" and "bad signature" in err.value.message()


def test_trusted_module_down_means_unavailable_never_an_answer(stack, artefacts):
    token = _license(artefacts)
    x = np.zeros((1, 1, 8, 8), np.float32)
    _infer(stack["client"], x, token)
    stack["enclave"].stop(0).wait()
    with pytest.raises(InferenceServerException) as err:
        _infer(stack["client"], x, token)
    assert err.value.status() == "StatusCode.UNAVAILABLE" and "trusted module" in err.value.message()
    time.sleep(1.1)  # readiness is cached for one second
    assert not stack["client"].is_server_ready()


def test_trusted_module_direct_protocol(stack, artefacts):
    assert stat.S_IMODE(os.stat(stack["socket"]).st_mode) == 0o600
    channel = grpc.insecure_channel(stack["enclave_addr"])
    stub = enclave_pb2_grpc.TrustedModuleStub(channel)
    shape, data = [1, 1, 8, 8], np.zeros(64, np.float32).tobytes()
    with pytest.raises(grpc.RpcError) as err:
        stub.Preprocess(enclave_pb2.PreprocessRequest(session_id="guess", input=enclave_pb2.Tensor(
            shape=shape, data=data)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.OpenSession(enclave_pb2.OpenSessionRequest(license=""), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "license" in err.value.details()
    session = stub.OpenSession(enclave_pb2.OpenSessionRequest(license=_license(artefacts)), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        stub.Preprocess(enclave_pb2.PreprocessRequest(session_id=session.session_id, input=enclave_pb2.Tensor(
            shape=shape, data=data[:-4])), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input.data" in err.value.details()
    reply = stub.Preprocess(enclave_pb2.PreprocessRequest(session_id=session.session_id, input=enclave_pb2.Tensor(
        shape=shape, data=data)), timeout=5)
    out = np.frombuffer(reply.output.data, np.float32)
    assert out.shape == (64,) and np.abs(out).max() > 0  # the transform perturbs a blank image
    channel.close()


def test_attestation_is_signed_over_the_nonce(stack):
    client = EnclaveClient(stack["enclave_addr"])
    nonce = os.urandom(32)
    att = client.attest(nonce)
    key = Ed25519PublicKey.from_public_bytes(att.attestation_public_key)
    assert att.format == "sealnet-ed25519-v1" and att.quoted == EMBEDDED_QUOTE_CONTEXT + nonce + att.chain
    key.verify(att.signature, att.quoted)
    assert att.chain == stack["module"].chain
    assert [m.name for m in att.measurements][-1] == "bundle:manifest"
    with pytest.raises(Exception, match="nonce"):
        client.attest(b"short")
    client.close()


def test_unparseable_requests_are_invalid_argument_on_both_services(stack):
    garbage = b"\xff\x13not a protobuf\x00" * 3
    for address, path in ((f"127.0.0.1:{stack['service'].port}", "/inference.GRPCInferenceService/ModelInfer"),
                          (stack["enclave_addr"], "/sealnet.enclave.TrustedModule/OpenSession")):
        channel = grpc.insecure_channel(address)
        call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            call(garbage, timeout=5)
        channel.close()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert err.value.details().startswith("request: not a valid"), err.value.details()
        assert "DecodeError" not in err.value.details()
