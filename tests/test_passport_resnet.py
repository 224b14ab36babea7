"""Scheme V1 on networks with skip connections: ResNet_p-18 (and AlexNet_p) export, serve and verify.

ResNet_p-18's passport layers sit in Conv5_x. If a path around them stayed plain (the 1x1 downsample shortcut),
public.onnx with the shipped zero gamma/beta would still carry layer3's features to the classifier; the
shortcut is a passport layer, so the shipped network answers the same logits for every input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sealnet.bundle import PUBLIC_ONNX
from sealnet.enclave_sim.secrets.passport import derive_params
from sealnet.export.build_engine import build_bundle
from sealnet.licenses import issue_license
from sealnet.protect.methods.passport import _layer_spec
from sealnet.protect.models import create_model
from sealnet.protect.passport import PassportConv2d, compute_params, passport_layers, random_passports, set_passports
from sealnet.protect.passport_train import PassportConfig, default_passport_path, protect_passport
from sealnet.protect.train import TrainConfig
from tests.conftest import PASSPORT_SIGNATURE, kserve_infer, serving

MODEL_ID = "digits-resnet-passport"
RESNET_TINY = {"width": 8}  # capacity 5 layers x 64 channels = 320 bits; Conv5_x sees 2x2 maps of the 8x8 digits


@pytest.fixture(scope="module")
def resnet_v1(tmp_path_factory, digits, artefacts):
    """A tiny V1 ResNet_p-18 (random passports), exported with the session's owner key and keystore."""
    root = tmp_path_factory.mktemp("resnet-passport")
    cfg = TrainConfig(epochs=10, batch_size=64, lr=3e-3, seed=0, progress=False)
    ckpt = protect_passport(digits, root / "r.pt", cfg, PassportConfig(scheme="v1", signature=PASSPORT_SIGNATURE),
                            model_name="resnet18_p", model_config=RESNET_TINY, baseline=False)
    manifest = build_bundle(root / "r.pt", root / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], model_id=MODEL_ID, log=lambda *_: None)
    return {"ckpt": ckpt, "path": root / "r.pt", "passport_path": default_passport_path(root / "r.pt"),
            "bundle": root / "bundle", "manifest": manifest}


def test_every_conv_of_conv5_x_is_a_passport_layer_the_shortcut_included():
    model = create_model("resnet18_p", (3, 32, 32), 10, width=8)
    layers = passport_layers(model)
    assert list(layers) == ["body.0.0.convbnrelu_1", "body.0.0.convbn_2", "body.0.0.shortcut",
                            "body.0.1.convbnrelu_1", "body.0.1.convbn_2"]
    shortcut = layers["body.0.0.shortcut"].conv
    assert (shortcut.kernel_size, shortcut.stride, shortcut.padding) == ((1, 1), (2, 2), (0, 0))
    assert isinstance(model.body[0][1].shortcut, torch.nn.Identity)  # block 2: identity, nothing to protect
    assert not any(isinstance(m, PassportConv2d) for m in model.stem.modules())


@pytest.mark.parametrize("input_shape", [(3, 32, 32), (1, 28, 28)])  # Conv5_x input 8x8 (even) and 7x7 (odd)
def test_trusted_module_derivation_equals_torch_on_the_resnet_layers(input_shape):
    """3x3 stride 2 padding 1, 1x1 stride 2 padding 0 (the shortcut) and 3x3 stride 1: numpy == torch."""
    model = create_model("resnet18_p", input_shape, 10, width=4)
    passports = random_passports(model, torch.Generator().manual_seed(0))
    set_passports(model, passports)
    want = compute_params(model)
    arrays: dict[str, np.ndarray] = {}
    layers = passport_layers(model)
    specs = [_layer_spec(n, layer, i, arrays, passports[n]) for i, (n, layer) in enumerate(layers.items())]
    assert [(s["stride"], s["padding"]) for s in specs] == [([2, 2], [1, 1]), ([1, 1], [1, 1]), ([2, 2], [0, 0]),
                                                            ([1, 1], [1, 1]), ([1, 1], [1, 1])]
    got = derive_params({"layers": specs}, arrays)
    for i, name in enumerate(layers):
        for j, key in enumerate(("gamma", "beta")):
            np.testing.assert_allclose(got[f"{key}_{i}"], want[name][j].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_export_is_accepted_and_public_onnx_is_useless_alone(resnet_v1, digits):
    m, checks = resnet_v1["ckpt"].metrics, resnet_v1["manifest"]["checks"]
    assert m["valid_acc"] >= 0.85 and m["signature_match"] and m["capacity_bits"] == 320
    assert checks["public_raw_acc"] <= 0.2 and checks["public_unit_params_acc"] <= 0.2
    assert checks["authorized_acc"] == pytest.approx(m["valid_acc"], abs=0.005)
    assert resnet_v1["manifest"]["passport_params"] == [f"{k}_{i}" for i in range(5) for k in ("gamma", "beta")]
    # No path around the passport layers: with the shipped zeros every input gets the same logits.
    session = ort.InferenceSession(str(resnet_v1["bundle"] / PUBLIC_ONNX), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": digits.x_test})[0]
    assert np.abs(logits - logits[0]).max() == 0.0


def test_served_accuracy_equals_torch_and_verify_passes(resnet_v1, artefacts, digits, short_tmp, tmp_path):
    from sealnet.cli import main

    token = issue_license(artefacts["owner_key"], customer_id="acme", model_id=MODEL_ID, serial_number="SN-1",
                          valid_seconds=600)
    with serving(resnet_v1["bundle"], artefacts["keystore"], short_tmp) as services:
        logits = np.concatenate([kserve_infer(services["client"], MODEL_ID, digits.x_test[i : i + 100], token)
                                 .as_numpy("logits") for i in range(0, len(digits.x_test), 100)])
    with torch.no_grad():
        want = resnet_v1["ckpt"].build_passport_model()(torch.from_numpy(digits.x_test)).numpy()
    assert np.abs(logits - want).max() < 1e-3
    assert float((logits.argmax(1) == digits.y_test).mean()) == pytest.approx(resnet_v1["ckpt"].metrics["valid_acc"])
    base = ["verify", "--bundle", str(resnet_v1["bundle"]), "--passport", str(resnet_v1["passport_path"]),
            "--dataset", "digits"]
    assert main([*base, "--signature", PASSPORT_SIGNATURE, "--json", str(tmp_path / "v.json")]) == 0
    res = json.loads((tmp_path / "v.json").read_text())
    assert res["signature_match"] and res["accuracy"] == pytest.approx(resnet_v1["ckpt"].metrics["valid_acc"])
    assert main([*base, "--signature", "tiny-sih"]) == 1  # one bit off


def test_alexnet_p_exports(tmp_path, digits, artefacts):
    """AlexNet_p has no skip path: two epochs on the digits already export with public.onnx at chance."""
    cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, seed=0, progress=False)
    ckpt = protect_passport(digits, tmp_path / "a.pt", cfg, PassportConfig(scheme="v1", signature="alex"),
                            model_name="alexnet_p", baseline=False)
    manifest = build_bundle(tmp_path / "a.pt", tmp_path / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], model_id="digits-alexnet-passport", log=lambda *_: None)
    checks = manifest["checks"]
    assert ckpt.metrics["valid_acc"] >= 0.5
    assert checks["public_raw_acc"] <= 0.2 and checks["public_unit_params_acc"] <= 0.2
    assert checks["authorized_acc"] == pytest.approx(ckpt.metrics["valid_acc"], abs=0.005)


def test_cli_width_is_resnet_only(tmp_path):
    from sealnet.cli import main

    assert main(["protect", "passport", "--model", "cnn_p", "--width", "8", "--dataset", "digits",
                 "--epochs", "1", "--no-baseline", "--out", str(tmp_path / "c.pt")]) == 2
    assert not (tmp_path / "c.pt").exists()


# -- full size (not run by default) -----------------------------------------------------------------------------
@pytest.mark.slow
def test_cifar10_resnet18_p_exports_and_serves(tmp_path):
    """ResNet_p-18 (width 64) on CIFAR-10 with the papers' recipe (SGD, momentum 0.9, lr 0.01, batch 64, 200
    epochs; SEALNET_CIFAR10_EPOCHS for fewer), exported and served: needs SEALNET_CIFAR10_DIR (the python
    batches); days on a CPU-only host (training runs on the CPU)."""
    data_dir = os.environ.get("SEALNET_CIFAR10_DIR")
    if not data_dir or not Path(data_dir).is_dir():
        pytest.skip("set SEALNET_CIFAR10_DIR to a directory holding the CIFAR-10 python batches "
                    "(data_batch_1..5, test_batch)")
    from sealnet.cli import main

    epochs = os.environ.get("SEALNET_CIFAR10_EPOCHS", "200")
    out = tmp_path / "resnet18_p.pt"
    assert main(["protect", "passport", "--model", "resnet18_p", "--dataset", "cifar10", "--data-dir",
                 data_dir, "--epochs", epochs, "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.01",
                 "--scheme", "v1", "--passport-type", "random", "--out", str(out)]) == 0
    skip = ("svd", "reverse", "reverse_svd", "insider", "pruning", "finetune", "image_fakes")  # fakes + deploy only
    assert main(["passport-eval", "--checkpoint", str(out), "--data-dir", data_dir, "--out", str(tmp_path / "eval"),
                 *(f"--skip={s}" for s in skip)]) == 0
    r = json.loads((tmp_path / "eval" / "passport_eval.json").read_text())
    assert r["valid_acc"] >= r["baseline_acc"] - 0.03 and r["signature_match"]
    # deploy: exported (so the --max-raw-acc gates passed), served over gRPC through the trusted module
    assert r["deployed_acc"] == pytest.approx(r["valid_acc"], abs=0.002)
    assert r["public_onnx_acc"] <= 0.15 and r["public_unit_params_acc"] <= 0.2
    assert r["fake_max_acc"] <= r["valid_acc"] - 0.5 and r["fake_mean_acc"] <= 0.2  # the maximum, not the mean
