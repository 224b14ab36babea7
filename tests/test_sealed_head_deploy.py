"""Sealed-head bundles end to end: the export gate on the published backbone, the head inside the trusted module,
its output policy on the v2 endpoint, and what the module tells an insider."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import onnx
import pytest
import torch
from tritonclient.utils import InferenceServerException

from sealnet.bundle import PUBLIC_ONNX
from sealnet.export import ExportError
from sealnet.export.build_engine import build_bundle
from sealnet.licenses import issue_license
from sealnet.outputs import OutputPolicy, apply_policy
from sealnet.protect.checkpoint import save_checkpoint
from sealnet.runtime.enclave_client import EnclaveClient
from sealnet.runtime.errors import EnclaveError
from tests.conftest import SEALED_HEAD_MODEL_ID, kserve_infer, serving


def _license(owner_key, model_id: str = SEALED_HEAD_MODEL_ID) -> str:
    return issue_license(owner_key, customer_id="acme", model_id=model_id, serial_number="SN-1", valid_seconds=600)


def test_bundle_ships_the_published_backbone_and_describes_the_policy(sealed_head):
    m = sealed_head["manifest"]
    assert m["method"] == "sealed-head" and m["output_policy"] == "label"
    assert m["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1, 1]}]
    assert m["backbone"]["sha256"] == sealed_head["ckpt"].secret["backbone_sha256"]
    graph = onnx.load(str(sealed_head["bundle"] / PUBLIC_ONNX)).graph
    assert [o.name for o in graph.output] == ["features"]
    shipped = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    given = torch.load(sealed_head["weights"], weights_only=True)
    assert all(np.array_equal(shipped[k], v.numpy()) for k, v in given.items() if k in shipped)
    assert m["checks"]["authorized_acc"] >= 0.7


def test_export_refuses_backbone_weights_that_are_not_the_published_ones(sealed_head, artefacts, tmp_path):
    ckpt = sealed_head["ckpt"]
    state = {k: v.clone() for k, v in ckpt.public_state.items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[name].view(-1)[0] += 1e-3  # e.g. a backbone fine-tuned on the owner's data
    save_checkpoint(dataclasses.replace(ckpt, public_state=state), tmp_path / "tampered.pt")
    with pytest.raises(ExportError, match="differ from the published backbone"):
        build_bundle(tmp_path / "tampered.pt", tmp_path / "bundle", owner_key=artefacts["owner_key_path"],
                     keystore=artefacts["keystore"], model_id="x", log=lambda *_: None)
    assert not (tmp_path / "bundle").exists()


def test_label_policy_over_grpc_and_in_the_module(sealed_head, artefacts, digits, short_tmp):
    token = _license(artefacts["owner_key"])
    x, y = digits.x_test, digits.y_test
    with serving(sealed_head["bundle"], artefacts["keystore"], short_tmp) as s:
        client = s["client"]
        meta = client.get_model_metadata(SEALED_HEAD_MODEL_ID)
        assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [("label", "INT64", [-1, 1])]
        labels = np.concatenate([kserve_infer(client, SEALED_HEAD_MODEL_ID, x[i : i + 64], token).as_numpy("label")
                                 for i in range(0, len(x), 64)])
        assert labels.shape == (len(x), 1) and labels.dtype == np.int64
        assert float((labels[:, 0] == y).mean()) == pytest.approx(sealed_head["manifest"]["checks"]["authorized_acc"],
                                                                   abs=1e-6)
        with pytest.raises(InferenceServerException, match="sealnet-license"):
            kserve_infer(client, SEALED_HEAD_MODEL_ID, x[:2], None)
        # the insider's view: the module answers the same label and nothing more, and checks what it is sent
        module = EnclaveClient(s["enclave_addr"])
        try:
            feats = np.random.default_rng(0).random((5, sealed_head["manifest"]["backbone"]["num_features"]),
                                                    dtype=np.float32)
            answer = module.classify(token, feats, sealed_head["manifest"]["outputs"], client="insider")
            assert list(answer) == ["label"] and answer["label"].shape == (5, 1)
            with pytest.raises(EnclaveError, match="features.shape") as err:
                module.classify(token, feats[:, :-1], sealed_head["manifest"]["outputs"])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(EnclaveError, match="Preprocess is for dsn, transform bundles") as err:
                module.preprocess(token, x[:2])
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            module.close()


def test_topk_policy_answers_rounded_probabilities(sealed_head, artefacts, digits, tmp_path, short_tmp):
    manifest = build_bundle(sealed_head["path"], tmp_path / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], model_id="digits-topk", output_policy="topk:3",
                            log=lambda *_: None)
    assert [o["name"] for o in manifest["outputs"]] == ["classes", "probs"]
    token = _license(artefacts["owner_key"], "digits-topk")
    with serving(tmp_path / "bundle", artefacts["keystore"], short_tmp) as s:
        res = kserve_infer(s["client"], "digits-topk", digits.x_test[:20], token)
        classes, probs = res.as_numpy("classes"), res.as_numpy("probs")
    assert classes.shape == probs.shape == (20, 3) and classes.dtype == np.int64
    assert np.array_equal(probs, probs.round(2)) and (np.diff(probs, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="K must be an integer"):
        build_bundle(sealed_head["path"], tmp_path / "b2", owner_key=artefacts["owner_key_path"],
                     keystore=artefacts["keystore"], model_id="x", output_policy="topk:11", log=lambda *_: None)
    with pytest.raises(ExportError, match="sealed-head"):
        build_bundle(artefacts["checkpoint_path"], tmp_path / "b3", owner_key=artefacts["owner_key_path"],
                     keystore=artefacts["keystore"], model_id="x", output_policy="label", log=lambda *_: None)


def test_apply_policy_shapes():
    logits = np.array([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]], np.float32)
    assert apply_policy(logits, OutputPolicy("label"))["label"].tolist() == [[1], [0]]
    top = apply_policy(logits, OutputPolicy("topk", 2))
    assert top["classes"].tolist() == [[1, 0], [0, 2]] and top["probs"].dtype == np.float32
    assert np.array_equal(apply_policy(logits, OutputPolicy("logits"))["logits"], logits)
