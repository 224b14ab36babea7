"""Bring your own model and data: a torch model defined here (not in sealnet's registry) and an ONNX file this
test exports, protected with the sealed head from an ImageFolder of PNG files and from an .npz, then served."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from sealnet.bundle import PUBLIC_ONNX
from sealnet.cli import main
from sealnet.data import DataError, ImageOptions, load_dataset
from sealnet.export.build_engine import build_bundle
from sealnet.licenses import issue_license
from sealnet.onnx_session import ort_session
from sealnet.protect.checkpoint import load_checkpoint, save_checkpoint
from sealnet.protect.sealed_head import UserHeadConfig, protect_user_sealed_head
from sealnet.protect.user_model import ModelError, open_user_model
from tests.conftest import kserve_infer, serving

MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn


    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)


    class TinyNet(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
            self.block = Residual(16)
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

        def forward(self, x):
            return self.head(self.pool(self.block(self.stem(x))))


    def tiny(num_classes=10):
        return TinyNet(num_classes)


    def ten_classes():
        return TinyNet(10)


    def not_a_module():
        return "a string"
""")
FAST = UserHeadConfig(epochs=15, baseline_epochs=10, batch_size=64, lr=3e-3, max_drop=0.1)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user-code") / "tiny_net.py"
    path.write_text(MODEL_FILE)
    return path


def _write_png_folder(root, digits, per_class: int | None = None):
    """The digits as an ImageFolder of 8-bit grayscale PNGs: ROOT/<class>/<i>.png."""
    x = np.concatenate([digits.x_train, digits.x_test])
    y = np.concatenate([digits.y_train, digits.y_test])
    for label in range(10):
        (root / f"class_{label}").mkdir(parents=True)
        for i in np.flatnonzero(y == label)[:per_class]:
            Image.fromarray((x[i, 0] * 255).round().astype(np.uint8)).save(root / f"class_{label}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, digits):
    return _write_png_folder(tmp_path_factory.mktemp("images") / "digits", digits)


# -- data --------------------------------------------------------------------------------------------------------
def test_image_folder_reads_classes_in_sorted_order_and_holds_out_a_test_split(image_folder, digits):
    data = load_dataset(f"imagefolder:{image_folder}")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.x_train) + len(data.x_test) == len(digits.x_train) + len(digits.x_test)
    assert set(np.unique(data.y_test)) == set(range(10))
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    again = load_dataset(f"imagefolder:{image_folder}")
    assert np.array_equal(again.y_test, data.y_test)  # the split is fixed by its seed


def test_image_options_resize_and_normalise_and_are_recorded(image_folder):
    data = load_dataset(f"imagefolder:{image_folder}", options=ImageOptions((12, 12), (0.5,), (0.25,)))
    assert data.input_shape == (1, 12, 12)
    assert data.x_train.min() < -1.5  # (0 - 0.5) / 0.25 = -2
    assert data.options == {"image_size": [12, 12], "mean": [0.5], "std": [0.25]}
    with pytest.raises(DataError, match="--mean has 3 values for 1-channel"):
        load_dataset(f"imagefolder:{image_folder}", options=ImageOptions(mean=(0.5, 0.5, 0.5)))


def test_image_folder_errors_name_the_problem(tmp_path, digits):
    one = tmp_path / "one"
    (one / "cats").mkdir(parents=True)
    Image.new("L", (8, 8)).save(one / "cats" / "a.png")
    with pytest.raises(DataError, match="at least 2 classes, found 1: cats"):
        load_dataset(f"imagefolder:{one}")
    broken = _write_png_folder(tmp_path / "broken", digits, per_class=3)
    (broken / "class_3" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*class_3/bad\.png"):
        load_dataset(f"imagefolder:{broken}")
    mixed = _write_png_folder(tmp_path / "mixed", digits, per_class=3)
    Image.new("L", (9, 9)).save(mixed / "class_0" / "big.png")
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        load_dataset(f"imagefolder:{mixed}")
    assert load_dataset(f"imagefolder:{mixed}", options=ImageOptions((8, 8))).input_shape == (1, 8, 8)


def test_npz_layouts_and_errors(tmp_path, digits):
    nhwc = (digits.x_train.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    np.savez(tmp_path / "ok.npz", x=nhwc, y=digits.y_train)
    data = load_dataset(f"npz:{tmp_path / 'ok.npz'}")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    np.savez(tmp_path / "split.npz", x=digits.x_train, y=digits.y_train, x_test=digits.x_test, y_test=digits.y_test)
    assert np.array_equal(load_dataset(f"npz:{tmp_path / 'split.npz'}").y_test, digits.y_test)
    np.savez(tmp_path / "nolabels.npz", images=digits.x_train)
    with pytest.raises(DataError, match=r"missing array\(s\) \['x', 'y'\]"):
        load_dataset(f"npz:{tmp_path / 'nolabels.npz'}")
    np.savez(tmp_path / "float_labels.npz", x=digits.x_train, y=digits.y_train.astype(np.float32))
    with pytest.raises(DataError, match="y must be .* integer labels"):
        load_dataset(f"npz:{tmp_path / 'float_labels.npz'}")


# -- models ------------------------------------------------------------------------------------------------------
def test_torch_model_cuts_and_default(model_file):
    user = open_user_model(f"{model_file}:tiny", input_shape=(1, 8, 8), num_classes=10)
    names = [c.name for c in user.cuts()]
    assert names[:4] == ["stem.0", "stem", "block", "pool"]
    assert user.find_cut("stem.1").name == "stem"  # the same tensor: the outer module's name is listed
    assert "block.conv" not in names  # the residual connection jumps over it: two tensors cross there
    assert user.default_cut().name == "head.2"  # before the classifier (the last Linear)
    cut = user.find_cut("block")
    assert cut.shape == (16, 8, 8) and cut.public_macs > 0 and cut.head_macs > 0
    split = user.split("block")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(split.head(split.public(x)), user.module(x), atol=1e-6)
    with pytest.raises(ModelError, match=r"--split-at 'block.conv' .*valid names: stem.0, stem, block, pool"):
        user.find_cut("block.conv")


def test_torch_model_errors(model_file, tmp_path):
    with pytest.raises(ModelError, match=r"not_a_module\(\) returned str, not a torch.nn.Module"):
        open_user_model(f"{model_file}:not_a_module", input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="has no function 'missing'"):
        open_user_model(f"{model_file}:missing", input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="outputs 10 scores but the data has 3 classes"):
        open_user_model(f"{model_file}:ten_classes", input_shape=(1, 8, 8), num_classes=3)
    assert open_user_model(f"{model_file}:tiny", input_shape=(1, 8, 8), num_classes=3).num_outputs == 3
    with pytest.raises(ModelError, match=r"does not run on inputs of shape \[3, 8, 8\]"):
        open_user_model(f"{model_file}:tiny", input_shape=(3, 8, 8))
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelError, match=r"do not match the model: missing \[.*unexpected"):
        open_user_model(f"{model_file}:tiny", input_shape=(1, 8, 8), weights=tmp_path / "other.pt")
    good = open_user_model(f"{model_file}:tiny", input_shape=(1, 8, 8), seed=5).module
    torch.save(good.state_dict(), tmp_path / "good.pt")
    loaded = open_user_model(f"{model_file}:tiny", input_shape=(1, 8, 8), weights=tmp_path / "good.pt", seed=9)
    assert all(torch.equal(a, b) for a, b in zip(good.state_dict().values(), loaded.module.state_dict().values(),
                                                 strict=True))


def _export_user_onnx(model_file, path, *, dynamic_size: bool = False):
    module = open_user_model(f"{model_file}:tiny", input_shape=(1, 8, 8), seed=3).module.eval()
    axes = {"image": {0: "n", 2: "h", 3: "w"} if dynamic_size else {0: "n"}, "scores": {0: "n"}}
    torch.onnx.export(module, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["image"],
                      output_names=["scores"], dynamic_axes=axes)
    return module


def test_onnx_model_cuts_with_the_extractor_and_keeps_names_the_runtime_expects(model_file, tmp_path):
    reference = _export_user_onnx(model_file, tmp_path / "m.onnx")
    user = open_user_model(str(tmp_path / "m.onnx"), num_classes=10)
    assert user.input_shape == (1, 8, 8)
    cut = user.default_cut()
    assert cut.shape == (64,)
    split = user.split(cut.name)
    public = ort_session(split.public_onnx())
    head = ort_session(split.head_onnx())
    assert [i.name for i in public.get_inputs()] == ["input"] and [o.name for o in public.get_outputs()] == ["features"]
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    logits = head.run(None, {"features": public.run(None, {"input": x})[0]})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, reference(torch.from_numpy(x)).numpy(), atol=1e-5)
    with pytest.raises(ModelError, match="valid names"):
        user.find_cut("nope")


def test_onnx_with_dynamic_image_size_cannot_be_split(model_file, tmp_path):
    _export_user_onnx(model_file, tmp_path / "dyn.onnx", dynamic_size=True)
    with pytest.raises(ModelError, match="only the batch dimension may be dynamic"):
        open_user_model(str(tmp_path / "dyn.onnx"))


# -- protect, export, serve --------------------------------------------------------------------------------------
def _protect_export(user_spec, data_spec, split_at, root, artefacts, model_id):
    data = load_dataset(data_spec)
    user = open_user_model(user_spec, input_shape=data.input_shape, num_classes=data.num_classes)
    ckpt = protect_user_sealed_head(user.split(split_at), data, FAST, progress=False, log=lambda _: None)
    save_checkpoint(ckpt, root / "protected.pt")
    manifest = build_bundle(root / "protected.pt", root / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], model_id=model_id, log=lambda *_: None)
    return data, load_checkpoint(root / "protected.pt"), manifest


def _serve_and_check(root, data, ckpt, manifest, artefacts, model_id, short_tmp, attacks: bool = False):
    assert manifest["checks"]["authorized_acc"] >= 0.6
    assert manifest["checks"]["authorized_acc"] >= manifest["checks"]["baseline_acc"] - FAST.max_drop
    # public.onnx alone: features, not labels
    public = ort_session(root / "bundle" / PUBLIC_ONNX)
    out = public.get_outputs()[0]
    assert out.name == "features" and out.shape[1:] == list(ckpt.secret["features_shape"])
    token = issue_license(artefacts["owner_key"], customer_id="acme", model_id=model_id, serial_number="SN-1",
                          valid_seconds=600)
    with serving(root / "bundle", artefacts["keystore"], short_tmp) as s:
        labels = kserve_infer(s["client"], model_id, data.x_test, token).as_numpy("label")[:, 0]
        assert abs(float((labels == data.y_test).mean()) - manifest["checks"]["authorized_acc"]) < 1e-9
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            kserve_infer(s["client"], model_id, data.x_test[:4], None)
        if attacks:  # the model suite reads the user's data from the manifest and the feature maps as they are
            import dataclasses

            from sealnet.attacks.base import BUDGETS, Target
            from sealnet.attacks.teeslice import insider_imitation, teeslice_stealing

            d = s["deployment"]
            target = Target(root / "bundle", endpoint=d.endpoint, enclave=d.enclave, license=token, seed=0)
            assert target.data.x_test.shape == data.x_test.shape
            budget = dataclasses.replace(BUDGETS["small"], steal_steps=40)
            (root / "report").mkdir()
            steal = teeslice_stealing(target, budget, root / "report")
            insider = insider_imitation(target, budget, root / "report")
            ratios = [m.value for m in (*steal.metrics, *insider.metrics) if "ratio" in m.name]
            assert len(ratios) == 4 and all(0 < r < 5 for r in ratios)


def test_torch_model_on_an_image_folder_end_to_end(model_file, image_folder, artefacts, tmp_path, short_tmp):
    data, ckpt, manifest = _protect_export(f"{model_file}:tiny", f"imagefolder:{image_folder}", "pool", tmp_path,
                                           artefacts, "tiny-byo")
    assert ckpt.user_model and ckpt.secret["features_shape"] == [16, 4, 4]
    assert manifest["backbone"]["split_at"] == "pool" and not manifest["backbone"]["public_trained_on_private_data"]
    _serve_and_check(tmp_path, data, ckpt, manifest, artefacts, "tiny-byo", short_tmp, attacks=True)


def test_onnx_model_on_an_npz_end_to_end(model_file, digits, artefacts, tmp_path, short_tmp):
    _export_user_onnx(model_file, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=digits.x_train, y=digits.y_train, x_test=digits.x_test, y_test=digits.y_test)
    user = open_user_model(str(tmp_path / "m.onnx"))
    pool = next(c.name for c in user.cuts() if "MaxPool" in c.name)
    data, ckpt, manifest = _protect_export(str(tmp_path / "m.onnx"), f"npz:{tmp_path / 'd.npz'}", pool, tmp_path,
                                           artefacts, "tiny-onnx-byo")
    assert ckpt.secret["features_shape"] == [16, 4, 4]
    # the public part keeps exactly the ONNX file's weights: the user declared them public
    given = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    shipped = onnx.load(str(tmp_path / "bundle" / PUBLIC_ONNX)).graph.initializer
    assert shipped and all(np.array_equal(onnx.numpy_helper.to_array(i), given[i.name]) for i in shipped)
    _serve_and_check(tmp_path, data, ckpt, manifest, artefacts, "tiny-onnx-byo", short_tmp)


# -- the command line: clear errors, exit 2 ----------------------------------------------------------------------
def test_cli_inspect_lists_cuts(model_file, capsys):
    assert main(["inspect", "--model", f"{model_file}:tiny", "--input-shape", "1", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert "block" in out and "[16, 8, 8]" in out and "<- default" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--model", "{file}:tiny", "--input-shape", "1", "8", "8", "--split-at", "nope"], "valid names"),
    (["inspect", "--model", "{file}:not_a_module", "--input-shape", "1", "8", "8"], "not a torch.nn.Module"),
    (["protect", "sealed-head", "--model", "{file}:tiny", "--data", "npz:{tmp}/missing.npz"], "file not found"),
    (["protect", "sealed-head", "--model", "{file}:tiny", "--data", "imagefolder:{tmp}"], "at least 2 classes"),
    (["demo", "--method", "transform", "--model", "{file}:tiny", "--data", "digits"], "does not take your own model"),
])
def test_cli_bad_inputs_exit_2(model_file, tmp_path, capsys, argv, message):
    argv = [a.format(file=model_file, tmp=tmp_path) for a in argv]
    assert main([*argv, "--workdir", str(tmp_path / "w")] if argv[0] == "demo" else argv) == 2
    assert message in capsys.readouterr().err


def test_transform_on_a_users_torch_model_exports_its_network(model_file, digits, artefacts, tmp_path):
    from sealnet.protect.pipeline import protect_transform
    from sealnet.protect.train import TrainConfig

    user = open_user_model(f"{model_file}:tiny", input_shape=digits.input_shape, num_classes=10)
    cfg = TrainConfig(epochs=6, batch_size=64, lr=3e-3, progress=False)
    ckpt = protect_transform(digits, "generator", tmp_path / "t.pt", cfg, user=user)
    assert ckpt.user_model and ckpt.model_name == "tiny_net-tiny" and ckpt.public_state == {}
    manifest = build_bundle(tmp_path / "t.pt", tmp_path / "bundle", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], model_id="tiny-transform", max_raw_acc=1.0,
                            log=lambda *_: None)
    assert (tmp_path / "bundle" / PUBLIC_ONNX).read_bytes() == ckpt.public_onnx.numpy().tobytes()
    assert abs(manifest["checks"]["authorized_acc"] - ckpt.metrics["authorized_acc"]) < 0.02
    assert abs(manifest["checks"]["public_raw_acc"] - ckpt.metrics["raw_acc"]) < 0.02
    with pytest.raises(ModelError, match="an .onnx file carries its own weights"):
        open_user_model(str(tmp_path / "m.onnx"), weights=tmp_path / "t.pt")


@pytest.mark.slow
def test_torchvision_resnet18_through_inspect_protect_export_serve(tmp_path):
    """scripts/byo_real_model.sh (its own virtualenv with torchvision; minutes): the served accuracy is the one
    export measured, and far above chance."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    work = tmp_path / "resnet18"
    run = subprocess.run(["bash", "scripts/byo_real_model.sh", str(work)], cwd=root, capture_output=True, text=True,
                         timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    served = float(re.search(r"accuracy on 1000 test images: ([0-9.]+)%", run.stdout).group(1)) / 100
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    assert abs(served - manifest["checks"]["authorized_acc"]) < 1e-6 and served > 0.5
    assert manifest["backbone"]["split_at"] == "layer3" and 0.1 < manifest["checks"]["head_share"] < 0.4
