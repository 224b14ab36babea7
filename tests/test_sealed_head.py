"""Sealed head: public backbones (ONNX names, digest), head training with the backbone frozen, the guard, CLI."""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sealnet.cli.sealed_head import BACKBONES as CLI_BACKBONES
from sealnet.protect.backbones import (
    BACKBONES,
    backbone_digest,
    build_backbone,
    load_backbone_weights,
    make_public_backbone,
    public_digits,
    train_on_public_digits,
)
from sealnet.protect.checkpoint import load_checkpoint, save_checkpoint
from sealnet.protect.heads import flops
from sealnet.protect.models import create_model
from sealnet.protect.sealed_head import SealedHeadConfig, SealedHeadTrainingError, protect_sealed_head
from sealnet.protect.train import TrainConfig, train_new_model

TINY_BACKBONE = {"widths": [16, 32], "tap_grid": [2, 2]}  # 1x8x8 digits: stage maps 4x4 and 2x2
HEAD = SealedHeadConfig(hidden=(64,), epochs=30, batch_size=64, lr=3e-3, max_flops_ratio=10.0, attempts=1)


def _export(model: nn.Module, shape: tuple[int, ...], path: Path) -> onnx.ModelProto:
    """The export the deployment side uses: TorchScript exporter, opset 17, dynamic batch, no folding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, *shape),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["input"], output_names=["features"],
                          dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}})
    return onnx.load(str(path))


def _weights(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


# torchvision's resnet18 state_dict, written out (torchvision is not a dependency): 122 keys.
def _torchvision_resnet18_keys() -> list[str]:
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{s}" for s in bn)]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{s}" for s in bn), f"{p}.conv2.weight",
                     *(f"{p}.bn2.{s}" for s in bn)]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{s}" for s in bn)]
    return [*keys, "fc.weight", "fc.bias"]


def test_backbones_registered_and_listed_by_the_cli():
    assert set(BACKBONES) == set(CLI_BACKBONES)


@pytest.mark.parametrize(("arch", "shape", "config"), [("tap_cnn", (1, 28, 28), {}), ("resnet18", (3, 32, 32), {})])
def test_backbone_onnx_keeps_weight_names_and_matches_torch(tmp_path, arch, shape, config):
    torch.manual_seed(0)
    model = create_model(arch, shape, 0, **config).eval()
    # Distinct values everywhere (as in trained weights): the exporter merges initializers that are equal, such
    # as freshly initialised BatchNorm ones and zeros, and a folded or renamed weight must show.
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and t.ndim == 1:  # BatchNorm scale, shift and statistics
                t.uniform_(0.5, 1.5) if name.endswith(("running_var", "weight")) else t.uniform_(-0.1, 0.1)
    graph = _export(model, shape, tmp_path / "b.onnx")
    init = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    for name, w in _weights(model.state_dict()).items():
        assert name in init, f"{name} not kept under its name"
        np.testing.assert_array_equal(init[name], w)
    x = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape and want.ndim == 2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_resnet18_loads_a_torchvision_state_dict_minus_fc(tmp_path):
    model = create_model("resnet18", (3, 32, 32), 0)
    expected = _torchvision_resnet18_keys()
    assert len(expected) == 122
    assert sorted(model.state_dict()) == sorted(k for k in expected if not k.startswith("fc."))
    torch.manual_seed(1)
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()}
    state |= {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    torch.save(state, tmp_path / "tv.pt")
    loaded = load_backbone_weights(tmp_path / "tv.pt", "resnet18", (3, 32, 32))
    assert "fc.weight" not in loaded and len(loaded) == 120
    build_backbone("resnet18", (3, 32, 32), loaded)  # strict load
    torch.save({**state, "layer9.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="layer9.weight"):
        load_backbone_weights(tmp_path / "bad.pt", "resnet18", (3, 32, 32))


def test_digest_names_every_weight():
    state = create_model("tap_cnn", (1, 28, 28), 0).state_dict()
    d = backbone_digest(state)
    assert len(d) == 64 and d == backbone_digest(dict(reversed(list(state.items()))))
    changed = {k: v.clone() for k, v in state.items()}
    changed["stages.1.0.weight"].view(-1)[7] += 1e-3
    assert backbone_digest(changed) != d
    renamed = {("x" + k if k == "stages.0.1.bias" else k): v for k, v in state.items()}
    assert backbone_digest(renamed) != d
    assert backbone_digest({**state, "stages.0.1.num_batches_tracked": torch.tensor(99)}) == d  # a counter
    assert backbone_digest({k: v.double() if v.is_floating_point() else v for k, v in state.items()}) != d


def test_flops_counts_conv_and_linear_macs():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 5))
    assert flops(conv, (1, 4, 4)) == 4 * 4 * 2 * 9 + 8 * 5
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert flops(grouped, (4, 5, 5)) == 3 * 3 * 4 * 2 * 9


def test_public_digits_backbone_learns_only_public_data():
    x, y = public_digits((1, 28, 28))
    assert x.shape == (1797, 1, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert x[:, :, :4].max() == 0 and x[:, :, :, -4:].max() == 0  # placed like MNIST: a 20x20 digit, centred
    torch.manual_seed(0)
    model = create_model("tap_cnn", (1, 8, 8), 0, **TINY_BACKBONE)
    assert train_on_public_digits(model, (1, 8, 8), seed=0, epochs=3) >= 0.1 + 0.5  # learnt digits; chance 10%
    with pytest.raises(ValueError, match="unknown backbone source"):
        make_public_backbone("tap_cnn", 0, Path("unused.pt"), kind="imagenet")


@pytest.fixture(scope="module")
def teacher(digits):
    model, _ = train_new_model(digits, TrainConfig(epochs=10, batch_size=64, lr=2e-3, progress=False), "simple_cnn",
                               {"hidden": 128})
    return model


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory):
    return make_public_backbone("tap_cnn", 0, tmp_path_factory.mktemp("bb") / "random.pt", kind="random",
                                input_shape=(1, 8, 8), model_config=TINY_BACKBONE)


def test_head_learns_with_the_backbone_frozen_and_round_trips(tmp_path, digits, teacher, random_backbone):
    given = torch.load(random_backbone, weights_only=True)
    before = backbone_digest(given)
    ckpt = protect_sealed_head(digits, random_backbone, "tap_cnn", HEAD, teacher=teacher, progress=False,
                               model_config=TINY_BACKBONE)
    m = ckpt.metrics
    assert m["authorized_acc"] >= 0.1 + 0.6, m  # chance is 10%
    assert m["authorized_acc"] >= m["baseline_acc"] - HEAD.max_drop
    assert backbone_digest(torch.load(random_backbone, weights_only=True)) == before  # file untouched
    assert ckpt.secret["backbone_sha256"] == before == backbone_digest(ckpt.public_state)
    assert all(torch.equal(ckpt.public_state[k], given[k]) for k in given)
    assert ckpt.method == "sealed-head" and ckpt.model_name == "tap_cnn" and ckpt.secret["output_policy"] == "label"
    assert 0 < m["head_flops"] and 0 < m["backbone_flops"]

    path = save_checkpoint(ckpt, tmp_path / "sh.pt")
    back = load_checkpoint(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    backbone, head = back.build_public_model(), back.build_head()
    assert not head.training and not backbone.training
    x = torch.from_numpy(digits.x_test)
    with torch.no_grad():
        logits = head(backbone(x))
    assert logits.shape == (len(x), 10)
    assert float((logits.argmax(1).numpy() == digits.y_test).mean()) == pytest.approx(m["authorized_acc"])
    assert backbone_digest(backbone.state_dict()) == before  # training left the backbone unchanged
    with pytest.raises(ValueError, match="not 'sealed-head'"):
        replace(back, method="transform").build_head()


def test_guard_refuses_a_head_below_the_baseline(digits, teacher, random_backbone):
    demanding = replace(HEAD, max_drop=-0.5, attempts=2, epochs=2, kd_weight=0.5)  # beat the baseline by 50 pts?
    with pytest.raises(SealedHeadTrainingError, match="in all 2 attempts"):
        protect_sealed_head(digits, random_backbone, "tap_cnn", demanding, teacher=teacher, progress=False,
                            model_config=TINY_BACKBONE, log=lambda _: None)
    with pytest.raises(SealedHeadTrainingError, match="of the backbone"):
        protect_sealed_head(digits, random_backbone, "tap_cnn", replace(HEAD, max_drop=1.0, max_flops_ratio=0.01,
                                                                        epochs=1),
                            teacher=teacher, progress=False, model_config=TINY_BACKBONE)


def _fake_cifar(directory: Path, per_batch: int = 20) -> Path:
    """CIFAR-10 python batches (the pickle format sealnet.data reads) with random images: a tiny stand-in."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        d = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, per_batch).tolist()}
        with open(directory / name, "wb") as f:
            pickle.dump(d, f)
    return directory


def test_cli_cifar10_path_on_a_random_resnet18(tmp_path, capsys):
    from sealnet.cli import main

    data_dir = _fake_cifar(tmp_path / "cifar")
    weights = tmp_path / "r18.pt"
    assert main(["backbone", "make", "--arch", "resnet18", "--source", "random", "--out", str(weights)]) == 0
    assert "sha256" in capsys.readouterr().out
    out = tmp_path / "sh.pt"
    argv = ["protect", "sealed-head", "--backbone-weights", str(weights), "--dataset", "cifar10",
            "--data-dir", str(data_dir), "--epochs", "1", "--head-epochs", "2", "--head-hidden", "32",
            "--out", str(out)]
    assert main([*argv, "--max-drop", "1"]) == 0  # random labels: only the plumbing is under test
    text = capsys.readouterr().out
    assert "authorized accuracy" in text and "head =" in text
    ckpt = load_checkpoint(out)
    assert ckpt.model_name == "resnet18" and ckpt.metrics["flops_ratio"] < 0.15
    assert main([*argv, "--max-drop", "-1"]) == 2  # the guard: exit 2, no checkpoint claimed as a success
    assert "below baseline" in capsys.readouterr().err
    assert main(["protect", "sealed-head", "--dataset", "digits", "--out", str(out)]) == 2
    assert "needs --backbone-weights FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_cifar10_resnet18_full_size(tmp_path):
    """`sealnet protect --method sealed-head --dataset cifar10 --data-dir DIR --backbone-weights W`: needs
    SEALNET_CIFAR10_DIR and SEALNET_RESNET18_WEIGHTS (a torchvision resnet18 state_dict)."""
    data_dir, weights = os.environ.get("SEALNET_CIFAR10_DIR"), os.environ.get("SEALNET_RESNET18_WEIGHTS")
    if not data_dir or not Path(data_dir).is_dir() or not weights or not Path(weights).is_file():
        pytest.skip("set SEALNET_CIFAR10_DIR (python batches) and SEALNET_RESNET18_WEIGHTS (torchvision weights)")
    from sealnet.cli import main

    out = tmp_path / "sh.pt"
    assert main(["protect", "sealed-head", "--backbone", "resnet18", "--backbone-weights", weights,
                 "--dataset", "cifar10", "--data-dir", data_dir, "--epochs", "30", "--max-drop", "1",
                 "--out", str(out)]) == 0
    m = load_checkpoint(out).metrics
    assert m["authorized_acc"] > 0.5 and m["flops_ratio"] <= 0.15
